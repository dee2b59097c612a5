"""`fica eval`: the zero-shot animation protocol on held-out identities (FiCA Sec. 4.3-4.4).

For every held-out identity: generate its UV maps from its portrait (view 0) with `--models`
(DiT + refiner, as `fica generate`; the portrait's camera and expression are the capture's own,
i.e. an oracle tracker, unless `--pose regressor`), build the UPM avatar, drive it with each dome
frame's expression code and gaze, render it from that frame's camera and compare with the frame
on the face region only (`fica_jax.quality.face`). Rows (docs/evaluation.md):

- main table: the mean-texture baseline (the training split's mean UV texture on its mean
  neutral geometry, rendered as a mesh), FiCA (Mesh) (the generated + refined maps as a surfel
  mesh, posed by the template's blendshapes), FiCA (3DGS) (the UPM avatar), and the ground-truth
  UV maps through the same UPM (an upper bound isolating the generator's error from the decoder's);
- ablation table (paper Table 2 order), each through the UPM: partial RGB only (`dit-rgb`),
  + normal & vertex UV (`dit-maps`), + image embedding (`dit`, unrefined), + refiner, and ours,
  + visible-texel transfer (`infer/transfer.py`; the final maps, FiCA (3DGS)).
  A row whose export is absent reads "not trained";
- portrait table: the main table's rows rendered from the portrait's own camera, expression and
  gaze (view 0) against the portrait itself: how much of its input the avatar keeps;
- UV texture table (`texture.py`): each completed UV texture's PSNR on the texels the portrait
  shows and on the unseen rest, beside the mean texture and the VAE's reconstruction ceiling;
- error-budget table, dome frames, each row paired with the bound: the ground-truth maps through
  the VAE (the latent ceiling), the ground-truth texture on FiCA's geometry and FiCA's texture on
  the ground-truth geometry (what each of FiCA's maps costs alone).

Metrics per frame: PSNR and SSIM on the face mask; LPIPS (AlexNet v0.1) on the render composited
over the ground truth outside the face (only face pixels differ); ID-CSIM between the ArcFace
embeddings of both frames aligned by the same 5-point transform from the frame's landmarks.
Without their weights the LPIPS / ID-CSIM columns read "unavailable (no weights at PATH)".

Outputs in `--out`: `metrics.csv` (one row per identity x frame x method, its `table` column
"frames", "portrait" (frame 0) or "uv_texture" (no frame)), `per_identity.csv` (dome frames),
`report.md` (the tables), `report.json`, `per_identity.png` (bar chart) and `frames.png`
(best / median / worst frames of FiCA (3DGS) beside their error maps). With several processes
each one evaluates its slice of identities and writes `metrics.part-K.csv`; process 0 waits for
every part and writes the report.
"""

from __future__ import annotations

import csv
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.avatar.drive import render_frame
from fica_jax.errors import UserError
from fica_jax.eval.protocol import ABLATION_DIT, BACKGROUND, MAIN, METRICS, UV_METRICS
from fica_jax.files import atomic_file, ensure_dir


# ----------------------------------------------------------------------------- metric kit
class Scorer:
    """Per-frame metrics on the face mask; LPIPS / ArcFace only when their weights exist."""

    def __init__(self, lpips_dir: str | None, arcface: str | None):
        from fica_jax.quality import image as metrics

        self.notes: dict[str, str] = {}
        self.lpips = self.arcface = None
        d = pathlib.Path(lpips_dir or "~/.cache/fica/lpips").expanduser()
        paths = (d / "alexnet.pth", d / "alex.pth")
        self.notes["lpips"] = metrics.weights_unavailable(*paths) or f"alex v0.1 ({d})"
        if not metrics.weights_unavailable(*paths):
            from fica_jax.quality.lpips import load_lpips

            self.lpips = load_lpips("alex", *paths)
        a = pathlib.Path(arcface or "~/.cache/fica/arcface/backbone.pth").expanduser()
        self.notes["id_csim"] = metrics.weights_unavailable(a) or f"iresnet ({a})"
        if not metrics.weights_unavailable(a):
            from fica_jax.quality.arcface import load_arcface

            self.arcface = load_arcface(a)

    def __call__(self, pred: np.ndarray, gt: np.ndarray, face: np.ndarray, kpts) -> dict:
        from fica_jax.quality import image as metrics

        p, g, m = (jnp.asarray(x, jnp.float32) for x in (pred, gt, face))
        out = {"psnr": float(metrics.masked_psnr(p, g, m)),
               "ssim": float(metrics.masked_ssim(p, g, m))}  # fmt: skip
        if self.lpips is not None:
            from fica_jax.quality.lpips import lpips_01

            comp = p * m[..., None] + g * (1.0 - m[..., None])
            out["lpips"] = float(lpips_01(comp[None], g[None], self.lpips, "alex")[0])
        if self.arcface is not None:
            from fica_jax.quality.arcface import embed, id_csim
            from fica_jax.quality.face import align_faces

            faces = align_faces(jnp.stack([p, g]), np.stack([kpts, kpts]))
            e = embed(self.arcface, faces)
            out["id_csim"] = float(id_csim(e[0], e[1]))
        return out


# ----------------------------------------------------------------------------- rendering
def _mesh_render(texture, geometry, mask, frame, template) -> np.ndarray:
    from fica_jax.geometry import template_store
    from fica_jax.infer.generate import expression_offset
    from fica_jax.render.surfels import render_surfels

    r = mask.shape[0]
    off = expression_offset(template_store.key(template), frame["expression"], r) * mask[..., None]
    h, w = frame["size"]
    out = render_surfels(
        jnp.asarray(texture), jnp.asarray(geometry + off), jnp.asarray(frame["viewmat"])[None],
        jnp.asarray(frame["K"])[None], w, h, mask=jnp.asarray(mask),
        backgrounds=jnp.asarray(BACKGROUND)[None],
    )  # fmt: skip
    return np.asarray(out["image"][0])


def _avatar(upm, maps, backend: str, tmp: pathlib.Path):
    from fica_jax.avatar.bundle import Avatar

    av = Avatar.create(upm.model, maps["texture"], maps["geometry"], maps["mask"])
    if backend == "jax":
        return av
    from fica_jax.export.torch_runtime import TorchAvatar

    av.save(tmp)
    return TorchAvatar.load(tmp)


def _upm_render(avatar, frame, backend: str) -> np.ndarray:
    h, w = frame["size"]
    kw = dict(expression=frame["expression"], gaze=frame["gaze"], background=BACKGROUND)
    if backend == "torch":
        kw["backend"] = "cpu"
    return render_frame(avatar, frame["viewmat"], frame["K"], w, h, **kw)


# ----------------------------------------------------------------------------- protocol
def _frame(rec, v: int) -> dict:
    """View `v` of a record as the renderers take it: its camera, expression, gaze, image."""
    h, w = rec["view_image"].shape[1:3]
    get = lambda k: np.asarray(rec[f"view_{k}"][v], np.float32)
    return {"view": v, "size": (h, w), "K": get("K"), "viewmat": get("viewmat"),
            "expression": get("expression"), "gaze": get("gaze"),
            "image": get("image") / 255.0, "kpts": get("kpts")}  # fmt: skip


def _frames(rec, limit: int | None) -> list[dict]:
    """The dome frames (views 1..), the first `limit` of them."""
    views = list(range(1, rec["view_image"].shape[0]))[: limit or None]
    return [_frame(rec, v) for v in views]


def _identity_maps(rec, models, *, steps, seed, pose, cfg_scale) -> dict[str, dict]:
    """{method: maps} of one identity for every method whose models exist."""
    from fica_jax.eval.texture import vae_maps
    from fica_jax.infer.generate import generate_maps

    size = int(models["dense"].cfg.data.image_size)
    portrait = np.asarray(jax.image.resize(
        jnp.asarray(rec["view_image"][0], jnp.float32) / 255.0, (size, size, 3), "bilinear"))  # fmt: skip
    p = None
    if pose == "gt":
        p = {"K": np.asarray(rec["view_K"][0], np.float32),
             "viewmat": np.asarray(rec["view_viewmat"][0], np.float32),
             "expression": np.asarray(rec["view_expression"][0], np.float32),
             "landmarks": np.asarray(rec["view_kpts"][0], np.float32),
             "landmarks_visible": np.asarray(rec["view_kpts_visible"][0]) > 0,
             "image_size": tuple(rec["view_image"].shape[1:3])}  # fmt: skip
    kw = dict(
        steps=steps, seed=seed, pose=p, cfg_scale=cfg_scale, where=f"identity {rec['identity']}"
    )
    full, _ = generate_maps(portrait, models, **kw)
    mask = full["mask"]
    dit = models["dit"].stats
    out = {
        "mean": {"texture": dit["mean_texture"], "geometry": dit["mean_geometry"], "mask": mask},
        "mesh": full,
        "3dgs": full,
        "gt_upm": {"texture": np.asarray(rec["uv_texture"], np.float32) / 255.0,
                   "geometry": np.asarray(rec["uv_geometry"], np.float32), "mask": mask},
        "abl_emb": {"texture": full["dit_texture"], "geometry": full["dit_geometry"], "mask": mask},
    }  # fmt: skip
    gt_tex, gt_geo = out["gt_upm"]["texture"], out["gt_upm"]["geometry"]
    vae_tex, vae_geo = vae_maps(rec, models)
    out |= {"vae_upm": {"texture": vae_tex, "geometry": vae_geo, "mask": mask},
            "gt_tex": {"texture": gt_tex, "geometry": full["geometry"], "mask": mask},
            "gt_geo": {"texture": full["texture"], "geometry": gt_geo, "mask": mask}}  # fmt: skip
    if "fitted_geometry" in full:  # the DiT's maps, their geometry fitted to the landmarks
        out["abl_fit"] = {"texture": full["dit_texture"], "geometry": full["fitted_geometry"],
                          "mask": mask}  # fmt: skip
    if "refined_texture" in full:  # the refined maps before the visible-texel transfer
        out["abl_ref"] = {"texture": full["refined_texture"], "geometry": full["geometry"],
                          "mask": mask}  # fmt: skip
    for key, name in ABLATION_DIT.items():
        if name in models:
            maps, _ = generate_maps(portrait, models, refine=False, dit=name, **kw)
            out[key] = maps
    return out


def evaluate_identity(rec, models, scorer, template, *, backend, steps, seed, pose, cfg_scale,
                      frames, tmp) -> tuple[list[dict], dict]:  # fmt: skip
    """-> (metric rows, {method: [(frame, render)]} of the dome frames for the contact sheet).
    Rows: every method on every dome frame (`table` "frames"), the main table's methods on the
    portrait itself (view 0: its camera, expression and gaze; "portrait") and the UV textures
    (`texture.texture_rows`, "uv_texture")."""
    from fica_jax.eval.texture import texture_rows
    from fica_jax.quality.face import record_face_masks

    faces = record_face_masks(rec, template)
    maps = _identity_maps(rec, models, steps=steps, seed=seed, pose=pose, cfg_scale=cfg_scale)
    dome, portrait = _frames(rec, frames), _frame(rec, 0)
    rows, renders = [], {}
    for method, m in maps.items():
        mesh = method in ("mean", "mesh")
        av = None if mesh else _avatar(models["upm"], m, backend, tmp / method)
        for f in ([portrait] if method in dict(MAIN) else []) + dome:
            if mesh:
                img = _mesh_render(m["texture"], m["geometry"], m["mask"], f, template)
            else:
                img = _upm_render(av, f, backend)
            s = scorer(img, f["image"], faces[f["view"]], f["kpts"])
            table = "frames" if f["view"] else "portrait"
            rows.append({"identity": str(rec["identity"]), "table": table, "frame": f["view"],
                         "method": method, **s})  # fmt: skip
            if f["view"]:
                renders.setdefault(method, []).append((f, img, faces[f["view"]]))
    return rows + texture_rows(rec, maps), renders


# ----------------------------------------------------------------------------- command
def evaluate(
    models_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    backend: str = "jax",
    steps: int = 50,
    cfg_scale: float | None = None,
    seed: int = 0,
    samples: int = 1,
    split: str = "test",
    limit: int | None = None,
    frames: int | None = None,
    pose: str = "gt",
    lpips_dir: str | None = None,
    arcface: str | None = None,
    progress: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict:
    """Runs the protocol; returns the report dict (also `report.json`). `samples` > 1 draws that
    many DiT samples per identity (seeds `seed`, `seed + 1`, ...) and every figure averages over
    them: one sample of a stochastic generator is a noisy estimate of its quality (on the demo's
    3 held-out identities single-seed rows move by more than 1 dB)."""
    from data_pipelines.pipeline import host_slice, open_source
    from fica_jax.eval import report as report_lib
    from fica_jax.infer.generate import load_models

    _check_options(backend, samples, pose)
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    out = ensure_dir(out_dir)
    t0 = time.time()
    models = load_models(models_dir)
    template = _face_template(data_dir, models)
    src = open_source(data_dir, split)
    ids = list(range(len(src)))[: limit or None]
    mine = ids[host_slice(len(ids), pi, pc)]
    scorer = Scorer(lpips_dir, arcface)
    kw = dict(backend=backend, steps=steps, pose=pose, cfg_scale=cfg_scale, frames=frames)
    rows, sheets = _evaluate_slice(src, mine, models, scorer, template, seed, samples, progress, kw)
    part = out / (f"metrics.part-{pi}.csv" if pc > 1 else "metrics.csv")
    write_csv(part, rows)
    if pc > 1:
        if pi != 0:
            return {"part": str(part)}
        rows = report_lib.gather_parts(out, pc)
        write_csv(out / "metrics.csv", rows)
    info = {"models": str(models_dir), "data": str(data_dir), "split": split, "backend": backend,
            "steps": steps, "pose": pose, "identities": len(ids), "seed": seed, "samples": samples,
            "weights": scorer.notes, "seconds": round(time.time() - t0, 1)}  # fmt: skip
    return report_lib.write_report(out, rows, sheets, info)


def _check_options(backend: str, samples: int, pose: str) -> None:
    if backend not in ("jax", "torch"):
        raise UserError(f"--backend {backend!r}: expected 'jax' or 'torch'")
    if samples < 1:
        raise UserError(f"--samples {samples}: expected at least 1 DiT sample per identity")
    if pose not in ("gt", "regressor"):
        raise UserError(f"--pose {pose!r}: expected 'gt' (the capture's camera) or 'regressor'")


def _face_template(data_dir, models):
    """The head template the dataset is laid out on (the face-region masks need it), checked
    against the one the models were trained on."""
    from data_pipelines.shards import dataset_template, read_metadata
    from fica_jax.geometry import template_store

    template = dataset_template(data_dir)
    if template is None:
        raise UserError(f"--data {data_dir}: its metadata.json names no head template; the "
                        "face-region masks need one (convert with --topology)")  # fmt: skip
    mine = read_metadata(data_dir).get("template", {})
    for name, m in models.items():
        theirs = m.meta.get("stats", {}).get("template", {})
        template_store.check_same(mine, theirs, f"--data {data_dir}", f"--models {name}")
    return template


def _evaluate_slice(src, mine, models, scorer, template, seed, samples, progress, kw):
    """`evaluate_identity` for identities `mine` of `src`, `samples` seeds each -> (metric rows
    with their sample index, {identity: renders of the first sample})."""
    import shutil
    import tempfile

    from fica_jax.train.metrics import Progress

    rows, sheets = [], {}
    bar = Progress(len(mine) * samples, 0, progress, "eval", log_every=1)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="fica-eval-"))
    try:
        for i in mine:
            rec = src[i]
            for k in range(samples):
                r, renders = evaluate_identity(
                    rec, models, scorer, template, seed=seed + k, tmp=tmp / f"{i}-{k}", **kw
                )
                rows += [{**row, "sample": k} for row in r]
                if k == 0:  # the frame sheet shows the first sample
                    sheets[str(rec["identity"])] = renders
                bar.update()
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows, sheets


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(
            f,
            fieldnames=["identity", "table", "frame", "sample", "method", *METRICS, *UV_METRICS],
            restval="",
        )
        w.writeheader()
        w.writerows(rows)
