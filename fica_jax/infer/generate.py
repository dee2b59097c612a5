"""`fica generate`: one portrait in, a drivable avatar bundle out (FiCA Sec. 2, no optimisation).

image -> face found and framed like a training portrait (`data_pipelines.align`; `--no-align`:
the centred square) -> portrait -> dense predictor (UV, vertices, normals, mask) -> partial UV
maps + image embedding -> VAE-encoded control latents -> DiT + ControlMLP, `--steps` Euler steps
with guidance `--cfg` -> VAE decode -> complete UV texture + geometry -> landmark shape fit,
refiner and visible-texel transfer (when `MODELS/refiner` exists; they need the portrait's
camera: `--pose JSON` from the user's tracker, else the dense predictor's pose regressor; the
shape fit also its landmarks, from the JSON or the dense predictor's landmark branch) -> UPM
identity encoder -> avatar bundle.

`--models DIR` holds one `fica export` folder per stage: `dense/`, `vae/`, `dit/`, `upm/` and
optionally `refiner/` (`fica export --run RUN --out DIR/NAME`). The DiT's export carries the
latent statistics of the cache it was trained on, and names the VAE that cache was built with:
another VAE is refused.

The bundle (a temp folder renamed at the end): `avatar.safetensors` + `avatar.json`
(`fica_jax.avatar.bundle`), `avatar.ply` (the neutral frame, standard 3DGS layout), `maps.npz`
(generated and refined UV maps) and `preview.png` (portrait | front | side | back).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax.errors import UserError
from fica_jax.geometry import template_store

REQUIRED, OPTIONAL = ("dense", "vae", "dit", "upm"), ("refiner", "dit-rgb", "dit-maps")
MIN_HEAD = 0.05  # fraction of the portrait the dense predictor's mask must cover


@dataclasses.dataclass
class Exported:
    cfg: object
    model: object
    stats: dict
    meta: dict


def load_models(models_dir: str | os.PathLike) -> dict[str, Exported]:
    from fica_jax.export.model_export import load_exported

    d = pathlib.Path(models_dir)
    if not d.is_dir():
        raise UserError(f"--models {d}: no such folder")
    out = {}
    for name in REQUIRED + OPTIONAL:
        if not (d / name).is_dir():
            if name in OPTIONAL:
                continue
            raise UserError(
                f"--models {d}: no {name}/ export; expected `fica export --run RUN --out "
                f"{d}/{name}` for each of {', '.join(REQUIRED)} (refiner optional)"
            )
        out[name] = Exported(*load_exported(d / name, stage=name.split("-")[0]))
    ref = out.get("refiner")
    if ref is not None and ref.model.cfg.evidence and "transfer_gain" not in ref.meta["stats"]:
        raise UserError(
            f"--models {d / 'refiner'}: the refiner reads the portrait's de-lit colours "
            "(model.evidence) but model.json has no stats.transfer_gain, the training portraits' "
            "shading level; re-export it with `fica export` beside its training captures"
        )
    seen = [(n, t) for n, m in out.items() if (t := m.meta.get("stats", {}).get("template"))]
    for name, t in seen[1:]:  # exports that record their template must all name the same one
        template_store.check_same(seen[0][1], t, f"--models {d / seen[0][0]}", f"{d / name}")
    return out


def template_key(models: dict[str, Exported]) -> str:
    """The key of the head template the avatar's maps lie on: the UPM export's, else (older
    exports) its eye template's."""
    upm = models["upm"]
    return upm.meta.get("stats", {}).get("template", {}).get("key") or upm.model.cfg.eye_template


def frame_portrait(path: str | os.PathLike, *, align: bool = True) -> tuple[np.ndarray, dict]:
    """An image file -> (the image [H, W, 3] uint8, upright by its EXIF turn; framing).

    framing = {"crop_box": [x0, y0, x1, y1] in those pixels, "aligned": bool, "image_size":
    [H, W]}. `align`: the square that frames the largest face found like a training portrait
    (`data_pipelines.align`; it may reach past the image, where cropping repeats the edge pixels);
    else the centred square. An unreadable, tiny or blank image, or (aligning) one without a
    face, is one `UserError` line naming the file. Cheap: `fica generate` calls it before it
    loads any model."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from data_pipelines import align as align_lib

    try:
        with Image.open(path) as im:
            # phones store portraits sideways with an EXIF turn: the detector needs them upright
            img = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"--image {path}: not a readable image ({e})") from None
    where = f"--image {path}"
    align_lib.check_portrait(img, where)
    box = align_lib.centre_box(*img.shape[:2])
    if align:
        try:
            box = align_lib.find_crop(img, where)
        except align_lib.NoFace as e:
            raise UserError(f"{e}; pass --no-align to use the centre square") from None
    framing = {"crop_box": [int(v) for v in box], "aligned": bool(align),
               "image_size": [int(img.shape[0]), int(img.shape[1])]}  # fmt: skip
    return img, framing


def read_portrait(
    path: str | os.PathLike, size: int, *, align: bool = True
) -> tuple[np.ndarray, dict]:
    """An image file -> ([size, size, 3] float in [0, 1], framing): `frame_portrait`'s square
    cut out and resized (`cut_portrait`)."""
    img, framing = frame_portrait(path, align=align)
    return cut_portrait(img, framing, size), framing


def cut_portrait(img: np.ndarray, framing: dict, size: int) -> np.ndarray:
    """`frame_portrait`'s square of `img` resized to [size, size, 3] float in [0, 1]."""
    from data_pipelines.align import crop_square

    return crop_square(img, framing["crop_box"], size).astype(np.float32) / 255.0


def vae_bundle(models: dict[str, Exported], dit_name: str = "dit"):
    """The exported VAE set up as the DiT's cache used it (statistics, latent scale, packing)."""
    from fica_jax.infer import latents
    from fica_jax.models import uv_latent

    dit, vae = models[dit_name], models["vae"]
    st = dit.meta["stats"]
    stats = uv_latent.MapStats.from_dict(st["map_stats"], dit.stats.get("position_reference"))
    bundle = latents.VAEBundle(vae.model, stats, int(st["unshuffle"]), {})
    want = st.get("vae", {}).get("fingerprint")
    got = latents.fingerprint(vae.model)
    if want and want != got:
        raise UserError(
            f"--models: the DiT's latent cache was built with VAE {want}, but vae/ holds {got}; "
            "export the VAE run that built the cache"
        )
    return latents.with_scale(bundle, float(st["latent_scale"]))


def _pose(models, portrait, pose_path, size: int, framing: dict | None = None):
    """(K [3, 3] at `size` px, viewmat [4, 4], expression [E] or None, landmarks: (pixels [L, 2]
    at `size` px, visible [L]) or None) of the portrait: from the user's JSON (its K and
    landmarks refer to the image as given: rescaled to `framing`'s image size, then shifted and
    scaled by the crop `read_portrait` took, the centred square without `framing`) or from the
    dense predictor's pose regressor and landmark branch."""
    from data_pipelines.align import centre_box
    from fica_jax.infer import pose as pose_lib

    if pose_path:
        p = pose_path if isinstance(pose_path, dict) else pose_lib.load_pose_json(pose_path)
        h, w = p["image_size"]
        K = np.asarray(p["K"], np.float64).copy()
        if framing:
            ih, iw = framing["image_size"]
            K = np.diag([iw / w, ih / h, 1.0]) @ K
            x0, y0, x1, _ = framing["crop_box"]
        else:
            x0, y0, x1, _ = centre_box(h, w)
        side = x1 - x0
        K[0, 2] -= x0
        K[1, 2] -= y0
        K = np.diag([size / side, size / side, 1.0]) @ K
        lm = p.get("landmarks")
        if lm is not None:
            if framing:
                lm = np.asarray(lm, np.float64) * [iw / w, ih / h]
            lm = ((lm - [x0, y0]) * (size / side), np.asarray(p["landmarks_visible"], bool))
        return K.astype(np.float32), p["viewmat"], p["expression"], lm
    # the regressor head when the dense model has one (its held-out error is in the dense
    # stage's eval), else PnP on the predicted vertex map (`pose.pose_from_vertices`)
    dense = models["dense"].model
    method = "regressor" if getattr(dense, "pose", None) is not None else "pnp"
    p = pose_lib.predict_pose(dense, jnp.asarray(portrait)[None], method=method)
    s = size / portrait.shape[0]
    K = np.diag([s, s, 1.0]).astype(np.float32) @ np.asarray(p["K"][0])
    lm = p["landmarks"]
    lm = None if lm is None else (np.asarray(lm[0]) * s, np.ones(lm.shape[1], bool))
    expr = None if p["expression"] is None else np.asarray(p["expression"][0])
    return K, np.asarray(p["viewmat"][0]), expr, lm


@functools.lru_cache(maxsize=4)
def _template_raster(template_key: str, r: int):
    from fica_jax.geometry.uvmaps import uv_raster

    t = template_store.resolve(template_key)
    return t, uv_raster(t.uvs, t.faces, r)


def expression_offset(template_key: str, expression, r: int) -> np.ndarray:
    """An expression code as a UV offset map [R, R, 3] through the expression basis of the
    template `template_key` (`template_store.resolve`; zero without a template or expression)."""
    if expression is None or not template_key:
        return np.zeros((r, r, 3), np.float32)
    return _expression_offset(template_key, tuple(np.asarray(expression, np.float32).tolist()), r)


@functools.lru_cache(maxsize=8)
def _expression_offset(template_key: str, expression: tuple, r: int) -> np.ndarray:
    """`expression_offset`, once per (template, code, size): `generate_maps` poses the maps by
    the portrait's expression for the shape fit, the refiner and the transfer. Read-only."""
    from fica_jax.geometry.uvmaps import position_map

    t, raster = _template_raster(template_key, r)
    e = np.asarray(expression, np.float32)[: t.n_expr]
    delta = np.einsum("e,evc->vc", e, t.expr_basis[: len(e)])
    out = np.asarray(position_map(raster, jnp.asarray(delta)), np.float32)
    out.flags.writeable = False
    return out


@functools.cache
def _refine_jit():
    from fica_jax.infer import refine as refine_lib

    return nnx.jit(refine_lib.refine)  # traced once per shape, not per call


def _portrait_batch(models, portrait, head_mask, size: int, mask, pose) -> dict:
    """The portrait's `portrait_*` entries at `size` px as `infer.refine` reads them: image,
    head mask, camera, and the UV offset map of its expression on the maps' `mask`. `pose`:
    `_pose` at the portrait's own size (K scales with the image)."""
    img = np.asarray(jax.image.resize(jnp.asarray(portrait), (size, size, 3), "bilinear"))
    hm = np.asarray(jax.image.resize(jnp.asarray(head_mask), (size, size), "bilinear"))
    K, viewmat, expression, _ = pose
    s = size / portrait.shape[0]
    K = np.diag([s, s, 1.0]).astype(np.float32) @ np.asarray(K, np.float32)
    offset = expression_offset(template_key(models), expression, mask.shape[0])
    return {"portrait_image": img[None], "portrait_mask": hm[None], "portrait_K": K[None],
            "portrait_viewmat": np.asarray(viewmat, np.float32)[None],
            "portrait_offset": (offset * mask[..., None])[None]}  # fmt: skip


def _delighting(ref: Exported) -> tuple[np.ndarray | None, float]:
    """What the refiner's evidence and the transfer de-light the portrait with, from the
    refiner export: the training portraits' shading level `stats.transfer_gain` [3] (None in
    exports from before it) and the visibility tolerance of its config."""
    gain = ref.meta["stats"].get("transfer_gain")
    tol = float(ref.cfg.model.get("visibility_tolerance", 0.01))
    return (None if gain is None else np.asarray(gain, np.float32)), tol


def _refine(models, texture, geometry, mask, portrait, head_mask, pose):
    ref = models["refiner"]
    s, n_kpts = int(ref.cfg.data.image_size), int(ref.cfg.data.landmarks)
    batch = _portrait_batch(models, portrait, head_mask, s, mask, pose)
    batch |= {"input_texture": texture, "input_geometry": geometry, "uv_mask": mask[None],
              "landmark_uv": np.zeros((1, n_kpts, 2), np.float32)}  # fmt: skip
    gain, tol = _delighting(ref)
    if ref.model.cfg.evidence:  # `load_models` checked that the export has the gain
        batch["exposure_gain"] = gain[None]
    out = _refine_jit()(ref.model, {k: jnp.asarray(v) for k, v in batch.items()}, tol)
    return out["texture"], out["geometry"]


def fit_shape(space: dict, key: str, geometry, mask, pose, size: int, keep: float
              ) -> tuple[np.ndarray | None, dict]:  # fmt: skip
    """`geometry.shape_fit` of a DiT geometry map [R, R, 3] to a portrait's landmarks in `space`
    (`shape_space`) on head template `key`; `pose` as `_pose` gives it at `size` px; `keep`:
    the share of the geometry's part outside the space kept -> (the fitted geometry or None,
    info: why not, or the landmarks used and their residual). `fica generate` runs it before
    the refiner, `infer.shape_samples` on the refiner's training maps."""
    from fica_jax.geometry.shape_fit import fit_landmarks, replace_coordinates

    landmarks = pose[3]
    if landmarks is None or not key:
        return None, {"skipped": "no landmarks" if key else "no head template"}
    if space["mean"].shape != geometry.shape:
        return None, {"skipped": f"shape space at {space['mean'].shape[0]} texels, maps at "
                                 f"{geometry.shape[0]}"}  # fmt: skip
    t = template_store.resolve(key)
    n = min(len(t.landmark_ids), len(landmarks[0]))
    offset = expression_offset(key, pose[2], mask.shape[0]) * mask[..., None]
    fit = fit_landmarks(space, offset, t.uvs[t.landmark_ids[:n]], landmarks[0][:n],
                        landmarks[1][:n], pose[0], pose[1], size)  # fmt: skip
    if fit is None:
        return None, {"skipped": "too few visible landmarks"}
    c, info = fit
    return replace_coordinates(space, geometry, c, keep) * mask[..., None], info


def _fit_shape(models, geometry, mask, pose, size: int) -> tuple[np.ndarray | None, dict]:
    """`fit_shape` in the refiner export's shape space, keeping the share of the geometry's part
    outside it that the refiner config's `model.shape_fit_residual` names."""
    from fica_jax.geometry.shape_fit import RESIDUAL

    ref = models["refiner"]
    if "shape_basis" not in ref.stats:
        return None, {"skipped": "the refiner export has no shape space (re-export it)"}
    space = {k: np.asarray(ref.stats[f"shape_{k}"], np.float32) for k in ("mean", "basis", "sd")}
    keep = float(ref.cfg.model.get("shape_fit_residual", RESIDUAL))
    return fit_shape(space, template_key(models), geometry, mask, pose, size, keep)


def _transfer(models, texture, geometry, mask, portrait, head_mask, pose):
    """`infer.transfer` at the portrait's own size -> (texture, weight [R, R]); None without
    the refiner export's `transfer_gain` (exports from before it)."""
    from fica_jax.infer.transfer import transfer

    gain, tol = _delighting(models["refiner"])
    if gain is None:
        return None
    batch = _portrait_batch(models, portrait, head_mask, int(portrait.shape[0]), mask, pose)
    batch["landmark_uv"] = np.zeros((1, 1, 2), np.float32)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    out = transfer(jnp.asarray(texture), jnp.asarray(geometry), jnp.asarray(mask)[None], batch,
                   jnp.asarray(gain), tol)  # fmt: skip
    return out["texture"], out["weight"][0]


class Timer:
    """Seconds per named stage (`lap(name)` closes the current one)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 3)
        self._t = now


def _condition(models, portrait, dit_name: str, where: str):
    """Dense predictor -> (head mask [S, S], coverage, DiT batch of control + embedding)."""
    from fica_jax.infer import conditioning, latent_cache

    dense, dit = models["dense"], models[dit_name]
    r = int(dit.stats["uv_mask"].shape[0])
    cond = conditioning.condition(jnp.asarray(portrait)[None], dense.model, r)
    head = np.asarray(cond.dense["mask"][0])
    cover = float((head > 0.5).mean())
    if cover < MIN_HEAD:
        raise UserError(
            f"{where}: no head found (the dense predictor's mask covers {cover:.1%} of the "
            f"image, expected >= {MIN_HEAD:.0%}); use a portrait framed like the training data"
        )
    vae = vae_bundle(models, dit_name)
    m = dit.cfg.model
    control = latent_cache.encode_control(vae, np.asarray(cond.partial_uv), m.control_maps,
                                          m.get("control_input", "latents"), int(m.latent_size))  # fmt: skip
    emb = np.asarray(cond.image_emb, np.float32)
    kind = dit.meta["stats"].get("embedding", "none")
    if not m.use_image_emb:
        emb = np.zeros((1, int(m.image_emb_dim)), np.float32)
    elif kind != "dense-vit-pooled":
        raise UserError(
            f"--models: {dit_name} was trained on {kind!r} image embeddings; `fica generate` "
            "computes the dense predictor's pooled ViT features ('dense-vit-pooled')"
        )
    mask = np.asarray(dit.stats["uv_mask"], np.float32)
    batch = {"control": jnp.asarray(control), "image_emb": jnp.asarray(emb),
             "uv_mask": jnp.asarray(mask)[None]}  # fmt: skip
    return head, cover, batch, vae


def generate_maps(
    portrait: np.ndarray,  # [S, S, 3] in [0, 1] at the dense predictor's size
    models: dict[str, Exported],
    *,
    steps: int = 50,
    cfg_scale: float | None = None,
    seed: int = 0,
    pose=None,  # a --pose JSON path, a load_pose_json-style dict, or None: the regressor
    refine: bool = True,
    transfer: bool = True,  # correction towards the portrait's de-lit colours (refined only)
    fit: bool = True,  # the DiT's geometry fitted to the portrait's landmarks (refined only)
    dit: str = "dit",  # which DiT export (ablation variants: "dit-rgb", "dit-maps")
    timer: Timer | None = None,
    where: str = "--image",
    framing: dict | None = None,  # read_portrait's crop of the image a --pose JSON refers to
) -> tuple[dict[str, np.ndarray], dict]:
    """The portrait's UV maps: {"texture", "geometry", "mask", "dit_texture", "dit_geometry"} and
    an info dict (guidance scale, refined, head coverage). Without `framing` a pose's K is taken
    to refer to an image whose centred square is the portrait."""
    from fica_jax.infer.sample import sample_maps, temperatures

    timer = timer or Timer()
    head, cover, batch, vae = _condition(models, portrait, dit, where)
    timer.lap("conditioning")
    m = models[dit].cfg.model
    scale = float(m.cfg_scale if cfg_scale is None else cfg_scale)
    kw = dict(steps=int(steps), cfg_scale=scale, shift=float(m.t_shift),
              temperature=temperatures(m.get("temperature", 1.0)))  # fmt: skip
    texture, geometry = sample_maps(
        models[dit].model, vae.model, vae.stats, vae.unshuffle, batch, jax.random.PRNGKey(seed),
        **kw,
    )  # fmt: skip
    texture = jnp.clip(texture, 0.0, 1.0)
    mask = np.asarray(batch["uv_mask"][0])
    maps = {"dit_texture": np.asarray(texture[0]), "dit_geometry": np.asarray(geometry[0])}
    timer.lap("dit")
    refined = bool(refine and "refiner" in models)
    fitted = {"skipped": "off"}
    if refined:  # the portrait's camera, expression and landmarks, once for all that follows
        cam = _pose(models, portrait, pose, int(portrait.shape[0]), framing)
        if fit:
            fit_geo, fitted = _fit_shape(models, maps["dit_geometry"], mask, cam,
                                         int(portrait.shape[0]))  # fmt: skip
            geometry = geometry if fit_geo is None else jnp.asarray(fit_geo)[None]
            timer.lap("shape fit")
        maps["fitted_geometry"] = np.asarray(geometry[0])
        texture, geometry = _refine(models, texture, geometry, mask, portrait, head, cam)
        texture = jnp.clip(texture, 0.0, 1.0)
        timer.lap("refiner")
    moved = _transfer(models, texture, geometry, mask, portrait, head, cam) \
        if refined and transfer else None  # fmt: skip
    if moved is not None:
        maps["refined_texture"] = np.asarray(texture[0])
        texture, maps["transfer_weight"] = moved
        timer.lap("transfer")
    maps |= {"texture": np.asarray(texture[0]), "geometry": np.asarray(geometry[0]), "mask": mask}
    info = {"steps": int(steps), "cfg_scale": scale, "seed": int(seed), "dit": dit,
            "refined": refined, "transferred": moved is not None, "shape_fit": fitted,
            "head_coverage": round(cover, 4)}  # fmt: skip
    return maps, info
