"""The refiner's training maps as `fica generate` gives it its input (ours): the DiT's sample of
each identity (`fica sample` maps) with its geometry fitted to the identity's portrait landmarks
(`generate.fit_shape`), the step `fica generate` runs between the DiT and the refiner.

Without it the refiner trains on the DiT's raw geometry and meets the fitted one only at
inference: on the demo's held-out identities the geometry it is given is then better registered
than anything it trained on (0.4 vs 0.8 px off in the portrait), and its geometry update moves
it away again. Trained on fitted maps (7 held-out identities x 2 samples, the demo's run): dome
frames 16.19 vs 16.18 dB, visible texels 19.64 vs 19.47, geometry RMS error 3.4 vs 3.6 mm.

A training identity is fitted in the shape space of the training identities outside its fold,
never with its own shape in it: `fica generate` fits a new face in a space that does not hold
it, and a space that holds the face can express it exactly, which it cannot do for a new one
(`FOLDS`; with fewer identities than that, leave-one-out). A held-out identity is fitted in the
whole training space, as the refiner's export holds it.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fica_jax.files import atomic_file

FOLDS = 32  # training identities in at most this many folds; each fitted without its own fold


def record_pose(rec) -> tuple:
    """A capture record's portrait (view 0) as `generate._pose` gives a pose at the record's own
    image size: (K, viewmat, expression, (landmarks px, visible))."""
    get = lambda k: np.asarray(rec[f"view_{k}"][0], np.float32)
    return get("K"), get("viewmat"), get("expression"), (get("kpts"), get("kpts_visible") > 0)


def training_geometries(train) -> tuple[np.ndarray, np.ndarray]:
    """The training captures' geometry maps a shape space is built from (the first
    `SHAPE_RECORDS`, [N, R, R, 3]) and the atlas mask of the first [R, R]."""
    from fica_jax.geometry.shape_fit import SHAPE_RECORDS

    n = min(len(train), SHAPE_RECORDS)
    geos = np.stack([np.asarray(train[i]["uv_geometry"], np.float32) for i in range(n)])
    return geos, np.asarray(train[0]["uv_mask"])


def space_at(geometries: np.ndarray, atlas: np.ndarray, r: int) -> dict:
    """`shape_space` of geometry maps resized to r texels: the refiner export's
    (`stages.refiner.export_stats`) and each fold's of `fit_sample_maps`."""
    from data_pipelines import transforms as T
    from fica_jax.geometry.shape_fit import SHAPE_COMPONENTS, shape_space

    g = np.stack([T.resize_uv(x, r) for x in geometries])
    return shape_space(g, T.resize_uv(atlas, r), SHAPE_COMPONENTS)


def fit_sample_maps(maps: str | os.PathLike, captures: str | os.PathLike, keep: float,
                    splits=("train", "test")) -> dict:  # fmt: skip
    """Rewrites `maps`/<identity>_geometry.npy of every identity of `splits` in the captures
    with its landmark fit (`keep`: `generate.fit_shape`'s share of the part outside the space;
    the refiner config's `model.shape_fit_residual`). Idempotent: the fit's coordinates come from
    the landmarks, the part outside the space from the input's. -> {"fitted", "skipped": {identity:
    why}, "rms_px": mean landmark residual}."""
    from data_pipelines import transforms as T
    from data_pipelines.pipeline import open_source
    from data_pipelines.shards import dataset_template
    from fica_jax.geometry import template_store
    from fica_jax.infer.generate import fit_shape

    maps = pathlib.Path(maps)
    head = dataset_template(captures)
    key = template_store.key(head) if head is not None else ""
    train = open_source(captures, "train")
    geos, atlas = training_geometries(train)  # as the refiner's export builds its space
    n = len(geos)
    fold_of = {str(train[i]["identity"]): i % min(n, FOLDS) for i in range(n)}
    spaces: dict = {}

    def space_for(name: str, r: int) -> dict:
        fold = fold_of.get(name, -1)  # -1: not a training identity, the whole space
        if (fold, r) not in spaces:
            rows = [i for i in range(n) if i % min(n, FOLDS) != fold]
            spaces[fold, r] = space_at(geos[rows], atlas, r)
        return spaces[fold, r]

    fitted, skipped, rms = 0, {}, []
    for split in splits:
        src = open_source(captures, split)
        for i in range(len(src)):
            rec = src[i]
            name = str(rec["identity"])
            path = maps / f"{name}_geometry.npy"
            if not path.is_file():
                continue
            geo = np.load(path)
            mask = T.resize_uv(np.asarray(rec["uv_mask"], np.float32), geo.shape[0])
            size = int(rec["view_image"].shape[1])
            space = space_for(name, geo.shape[0])
            out, info = fit_shape(space, key, geo, mask, record_pose(rec), size, keep)
            if out is None:
                skipped[name] = info["skipped"]
                continue
            with atomic_file(path) as tmp:
                np.save(tmp, out.astype(geo.dtype))
            fitted += 1
            rms.append(info["rms_px"])
    return {"fitted": fitted, "skipped": skipped, "rms_px": float(np.mean(rms)) if rms else None}
