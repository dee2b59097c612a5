"""Stage `upm`: train the universal prior model on dome frames (FiCA Sec. 2.4).

Each example is one identity (UV texture, neutral UV geometry, atlas mask) and one of its dome
frames (image, mask, camera, expression code, gaze, posed UV geometry; `example`).
The UPM decodes one Gaussian per texel for the frame's expression, view and gaze and
`fica_jax.render.rasterization` renders it from the frame's camera.

Losses (weights `cfg.model.loss_weights`, defaults from the public RGCA recipe, goliath
`config/rgca_example.yml`; docs/architecture.md §5):
- `rgb_l1` 10: L1 over the whole frame. The synthetic frames have a random per-frame background
  that is not stored, so the render is composited over the frame's own background pixels
  (`frame_image` outside `frame_mask`, black inside): a Gaussian outside the head or a hole in
  it then costs as in RGCA's composite over the captured background plate.
- `rgb_ssim` 0.2: 1 - SSIM (dm-pix convention, `fica_jax.quality.image`) of the same images.
- `geom_l2` 0.4: mean squared distance, in `geometry_unit` (mm: RGCA's weights assume
  millimetre captures), between predicted means and the frame's posed UV geometry, inside the
  UV atlas.
- `kl` 2e-3: KL of the expression posterior to N(0, I).
- `negcolor` 1e-2: mean of relu(-colour).
- `color_l2` 0.1 (ours, not RGCA's): mean squared colour offset from the UV texture inside the
  atlas. Texels no training camera sees (the back of the head: the dome spans +-90 deg of yaw)
  get no photometric gradient; without it their colour drifts with the expression code.
- `scale_bound` 1e-2: mean of relu(scale / scale_bound - 1).
Metrics also log the rasteriser's `n_isects` and `isect_overflow` (must stay 0).

`make_eval` renders held-out identities (test split) with the expression posterior mean and
reports PSNR/SSIM inside the frame mask next to two baselines: the same decoder with the identity
bias maps zeroed (ablation (a)) and the identity's UV maps rendered as flat surfels
(`render/surfels.py`, the textured-mesh proxy; neutral geometry, no expression). `make_sample`
writes the same renders as a preview sheet every `sample_every` steps.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import transforms as T
from data_pipelines.pipeline import open_source
from data_pipelines.shards import template_stats
from fica_jax import config
from fica_jax.errors import UserError
from fica_jax.models.upm import UPM, VARIANTS, UPMConfig, eye_masks, render_batch
from fica_jax.preview import write_step_sheet
from fica_jax.quality import image as metrics
from fica_jax.render.surfels import render_surfels
from fica_jax.train.stage import RenderCall, Stage

_SIZE_KEYS = ("latent_dim", "hidden", "seed_resolution", "seed_channels", "channels",
              "color_channels", "encoder_channels", "n_cameras")  # fmt: skip


def upm_config(cfg: ml_collections.ConfigDict) -> UPMConfig:
    """The variant named by `cfg.model.variant` at the data's UV resolution and code size;
    non-empty `cfg.model.{channels, ...}` override its sizes."""
    c = config.variant(
        VARIANTS,
        cfg.model.variant,
        "model.variant",
        {k: cfg.model.get(k) for k in _SIZE_KEYS},
        uv_resolution=cfg.data.uv_resolution,
        expression_dim=cfg.data.expression_dim,
        position_center=tuple(cfg.model.position_center),
        position_extent=tuple(cfg.model.position_extent),
        eye_template=str(cfg.model.eye_template),
    )
    if not cfg.model.get("seed_resolution") and c.uv_resolution % 2**c.levels == 0:
        # no seed size given: the variant's decoder (its levels) at the data's UV resolution,
        # e.g. upm:tiny on 64^2 maps starts from 8^2 instead of 4^2
        c = dataclasses.replace(c, seed_resolution=c.uv_resolution // 2**c.levels)
    return c


def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> UPM:
    if cfg.data.get("dir") and pathlib.Path(cfg.data.dir, "metadata.json").is_file():
        from data_pipelines.shards import dataset_template

        dataset_template(cfg.data.dir)  # registers the template its eye_template key names
    return UPM(upm_config(cfg), rngs=rngs, dtype=jnp.dtype(cfg.train.compute_dtype))


def forward(model: UPM, batch, rng, *, zero_identity: bool = False):
    """Gaussians of every example's frame -> (Gaussians, KL [B])."""
    return model(
        batch["uv_texture"],
        batch["uv_geometry"],
        batch["uv_mask"],
        batch["frame_expression"],
        batch["frame_viewmat"],
        batch["frame_gaze"],
        rng,
        zero_identity=zero_identity,
    )


def render_dome_frames(
    model: UPM | None, g, batch, isect_capacity: int = 0
) -> dict[str, jax.Array]:
    """Renders Gaussians g from each frame's camera over the frame's background -> image
    [B, H, W, 3], alpha [B, H, W], n_isects / isect_overflow [B]. Colours get the model's
    per-camera correction of `frame_view` when it has one. `isect_capacity` 0: the
    rasteriser's default under jit (`cfg.model.isect_capacity` sets it for large frames)."""
    if model is not None:
        g = {**g, "colors": model.correct_colors(g["colors"], batch["frame_view"])}
    img = batch["frame_image"]
    bg = img * (1.0 - batch["frame_mask"][..., None])
    h, w = img.shape[1:3]
    kw = {"eps2d": model.cfg.eps2d if model is not None else UPMConfig.eps2d}
    if isect_capacity:
        kw["isect_capacity"] = int(isect_capacity)
    return render_batch(g, batch["frame_viewmat"], batch["frame_K"], w, h, bg, **kw)


def upm_losses(g, kl, out, batch, *, geometry_unit: float, scale_bound: float):
    """Unweighted loss terms (module doc), each a scalar."""
    img = batch["frame_image"]
    m = batch["uv_mask"][..., None]
    d2 = jnp.sum(jnp.square((g["means"] - batch["frame_uv_geometry"]) / geometry_unit), -1)
    inside = lambda x: jnp.sum(x * m) / (jnp.sum(m) + 1e-6)
    return {
        "rgb_l1": jnp.mean(jnp.abs(out["image"] - img)),
        "rgb_ssim": 1.0 - jnp.mean(metrics.ssim(out["image"], img)),
        "geom_l2": inside(d2[..., None]),
        "kl": jnp.mean(kl),
        "negcolor": jnp.mean(jax.nn.relu(-g["colors"])),
        "color_l2": inside(
            jnp.mean(jnp.square(g["colors"] - batch["uv_texture"]), -1, keepdims=True)
        ),
        "scale_bound": jnp.mean(jax.nn.relu(g["scales"] / scale_bound - 1.0)),
    }


def make_loss(cfg: ml_collections.ConfigDict):
    w = dict(cfg.model.loss_weights)
    unit, bound = float(cfg.model.geometry_unit), float(cfg.model.scale_bound)
    cap = int(cfg.model.get("isect_capacity", 0))
    # the eyeball masks are computed on the host: once here, outside any trace, so that tracing
    # for devices that are not there (`fica plan --topology`) finds them cached
    eye_masks(upm_config(cfg))

    def loss_fn(model: UPM, batch, rng: jax.Array):
        g, kl = forward(model, batch, rng)
        out = render_dome_frames(model, g, batch, cap)
        terms = upm_losses(g, kl, out, batch, geometry_unit=unit, scale_bound=bound)
        loss = sum(w[k] * v for k, v in terms.items())
        fm = batch["frame_mask"]
        terms |= {
            "psnr_fg": metrics.masked_psnr(out["image"], batch["frame_image"], fm),
            "n_isects": jnp.mean(out["n_isects"].astype(jnp.float32)),
            "isect_overflow": jnp.sum(out["isect_overflow"]).astype(jnp.float32),
        }
        return loss, terms

    return loss_fn


def surfel_frames(batch) -> jax.Array:
    """Baseline (b): each identity's UV maps as flat surfels (neutral geometry, no expression)
    from the frame's camera over the frame's background -> [B, H, W, 3]."""
    bg = batch["frame_image"] * (1.0 - batch["frame_mask"][..., None])
    h, w = batch["frame_image"].shape[1:3]

    def one(tex, geo, mask, nrm, viewmat, K, bgi):
        r = render_surfels(tex, geo, viewmat[None], K[None], w, h, mask=mask, normal=nrm)
        return r["image"][0] + (1.0 - r["alpha"][0][..., None]) * bgi

    keys = ("uv_texture", "uv_geometry", "uv_mask", "uv_normal", "frame_viewmat", "frame_K")
    return jax.vmap(one)(*(batch[k] for k in keys), bg)


def held_out_renders(model: UPM, batch, isect_capacity: int = 0) -> dict[str, jax.Array]:
    """The UPM's frames (expression posterior mean) and both baselines' -> {name: [B, H, W, 3]},
    plus the UPM render's isect_overflow [B]."""
    g, _ = forward(model, batch, None)
    r = render_dome_frames(model, g, batch, isect_capacity)
    g0, _ = forward(model, batch, None, zero_identity=True)
    return {
        "upm": r["image"],
        "zero_identity": render_dome_frames(model, g0, batch, isect_capacity)["image"],
        "surfels": surfel_frames(batch),
        "isect_overflow": r["isect_overflow"],
    }


def make_eval(cfg: ml_collections.ConfigDict):
    """Held-out PSNR/SSIM inside the frame mask: UPM, zero-identity decoder, surfel proxy."""
    cap = int(cfg.model.get("isect_capacity", 0))

    def eval_fn(model: UPM, batch, rng: jax.Array):
        del rng
        r, fm, gt = held_out_renders(model, batch, cap), batch["frame_mask"], batch["frame_image"]
        out = {"isect_overflow": jnp.sum(r["isect_overflow"]).astype(jnp.float32)}
        for name, prefix in (("upm", ""), ("zero_identity", "baseline_zero_identity_"),
                             ("surfels", "baseline_surfels_")):  # fmt: skip
            out[f"{prefix}psnr"] = metrics.masked_psnr(r[name], gt, fm)
            out[f"{prefix}ssim"] = metrics.masked_ssim(r[name], gt, fm)
        return out

    return eval_fn


def held_out_report(cfg: ml_collections.ConfigDict, model: UPM, split: str = "test") -> dict:
    """PSNR/SSIM inside the frame mask of *every* dome frame of `split`'s identities (the UPM
    never sees them), per frame then averaged: {"frames", "identities", "<render>_psnr",
    "<render>_ssim" for upm / zero_identity / surfels, "per_identity": {id: {...}}}."""
    src = open_source(cfg.data.dir, split)
    opts = T.TransformOptions(augment=False, image_size=cfg.data.image_size)
    rng = np.random.default_rng(0)  # unused without augmentation
    b, cap = int(cfg.data.batch_size), int(cfg.model.get("isect_capacity", 0))

    @nnx.jit
    def scores(model, batch):
        r, fm, gt = held_out_renders(model, batch, cap), batch["frame_mask"], batch["frame_image"]
        one = lambda f: jax.vmap(lambda x, y, m: f(x[None], y[None], m[None]))
        out = {}
        for name in ("upm", "zero_identity", "surfels"):
            out[f"{name}_psnr"] = one(metrics.masked_psnr)(r[name], gt, fm)
            out[f"{name}_ssim"] = one(metrics.masked_ssim)(r[name], gt, fm)
        return out | {"overflow": r["isect_overflow"]}

    frames, owners = [], []
    for i in range(len(src)):
        rec = src[i]
        for v in range(1, rec["view_image"].shape[0]):
            frames.append(frame_example(rec, v, rng, opts))
            owners.append(str(rec["identity"]))
    rows: dict[str, list] = {}
    for start in range(0, len(frames), b):
        chunk = frames[start : start + b]
        chunk += [chunk[-1]] * (b - len(chunk))  # pad the last batch; padded rows dropped
        batch = {k: np.stack([f[k] for f in chunk]) for k in chunk[0]}
        got = jax.device_get(scores(model, batch))
        for k, v in got.items():
            rows.setdefault(k, []).extend(np.asarray(v)[: len(frames) - start].tolist())
    if sum(rows.pop("overflow")):
        raise RuntimeError("held-out renders overflowed isect_capacity; raise model.isect_capacity")
    per_id = {}
    for who in dict.fromkeys(owners):
        sel = [j for j, o in enumerate(owners) if o == who]
        per_id[who] = {k: float(np.mean([v[j] for j in sel])) for k, v in rows.items()}
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    return out | {"frames": len(frames), "identities": len(per_id), "per_identity": per_id}


def make_sample(cfg: ml_collections.ConfigDict):
    """Preview sheet of the eval batch (`fica_jax.preview.write_step_sheet`), one row per frame:
    GT frame | UPM render | zero-identity | surfel proxy | 4x |UPM - GT|."""
    cap = int(cfg.model.get("isect_capacity", 0))
    renders = nnx.jit(lambda model, batch: held_out_renders(model, batch, cap))

    def sample_fn(model: UPM, batch, rng, workdir, step: int) -> None:
        del rng
        r, gt = jax.device_get((renders(model, batch), batch["frame_image"]))
        rows = [
            [("GT", gt[i]), ("UPM", r["upm"][i]), ("zero id", r["zero_identity"][i]),
             ("surfels", r["surfels"][i]), ("4x err", 4 * np.abs(r["upm"][i] - gt[i]))]
            for i in range(min(len(gt), 8))
        ]  # fmt: skip
        write_step_sheet(rows, workdir, step)

    return sample_fn


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, r, s = cfg.data.batch_size, cfg.data.uv_resolution, cfg.data.image_size
    e, n_kpts, f32 = cfg.data.expression_dim, cfg.data.landmarks, jnp.float32
    spec = lambda *shape, dtype=f32: jax.ShapeDtypeStruct((b, *shape), dtype)
    return {
        "uv_texture": spec(r, r, 3),
        "uv_geometry": spec(r, r, 3),
        "uv_normal": spec(r, r, 3),
        "uv_mask": spec(r, r),
        "frame_image": spec(s, s, 3),
        "frame_mask": spec(s, s),
        "frame_kpts": spec(n_kpts, 2),
        "frame_kpts_visible": spec(n_kpts),
        "frame_K": spec(3, 3),
        "frame_viewmat": spec(4, 4),
        "frame_expression": spec(e),
        "frame_gaze": spec(2),
        "frame_uv_geometry": spec(r, r, 3),
        "frame_view": spec(dtype=jnp.int32),
    }


def example(record: T.Record, rng: np.random.Generator, opts: T.TransformOptions) -> T.Example:
    """A capture record's UV maps + one random dome frame (views 1..) with its camera and codes.
    Crop/scale is applied to the frame and folded into K; no photometric change because the
    rendered Gaussians' colour must match the frame."""
    n_views = record["view_image"].shape[0]
    if n_views < 2:
        raise UserError(
            f"record {str(record['identity'])!r} has no dome frames (1 view); "
            "the UPM stage needs views 1.. (re-create the data with --frames >= 1)"
        )
    return frame_example(record, int(rng.integers(1, n_views)), rng, opts)


def frame_example(
    record: T.Record, v: int, rng: np.random.Generator, opts: T.TransformOptions
) -> T.Example:
    """`example` for dome frame v (held-out reports walk every frame)."""
    ex, aff = T.warp_view(record, v, rng, opts, geometric=True)
    out = T.uv_maps(record)
    out.update({f"frame_{k}": x for k, x in ex.items()})
    out["frame_K"] = T.warp_intrinsics(T.float32(record["view_K"][v]), aff)
    out["frame_viewmat"] = T.float32(record["view_viewmat"][v])
    out["frame_expression"] = T.float32(record["view_expression"][v])
    out["frame_gaze"] = T.float32(record["view_gaze"][v])
    out["frame_uv_geometry"] = T.float32(record["view_uv_geometry"][v])
    out["frame_view"] = np.int32(v)
    return out


def fit_data(meta) -> dict:
    """The captures' UV resolution and image size, one colour correction per camera, and where
    the metadata says them, the expression code and landmark sizes and the eyeballs of their head
    template (none where it has no eye parts)."""
    fit = {
        "data.uv_resolution": int(meta["uv_resolution"]),
        "data.image_size": int(np.ravel(meta["image_size"])[0]),
        "model.n_cameras": int(meta["n_views"]),
    }
    said = {"data.expression_dim": ("expression_dim", int), "data.landmarks": ("landmark_dim", int),
            "model.eye_template": ("template", data_eye_template)}  # fmt: skip
    return fit | {k: f(meta[m]) for k, (m, f) in said.items() if m in meta}


def data_eye_template(template: dict) -> str:
    """The `model.eye_template` a dataset's template metadata asks for ("" without eyeballs)."""
    if template.get("has_eyes", True) is False:
        return ""
    return str(template.get("key") or template.get("template", ""))


def make_data(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int,
              **kw):  # fmt: skip
    """Capture shards through `example`, once the config's eye template is checked against the
    data's (eye texels of one UV layout on another's atlas would be silently wrong)."""
    from data_pipelines.pipeline import CaptureData
    from data_pipelines.shards import read_metadata

    if cfg.data.dir:  # (`make_model` registered the template itself)
        info = read_metadata(cfg.data.dir).get("template", {})
        want, have = data_eye_template(info), str(cfg.model.eye_template)
        if info and have and have != want:
            raise UserError(
                f"config model.eye_template {have!r}, but {cfg.data.dir} is laid out on template "
                f"{info.get('key') or info.get('template')!r}: pass "
                f"--config.model.eye_template={want!r}"
            )
    return CaptureData(example)(cfg, split, process_index, process_count, **kw)


# name, sharding rule table, model, loss, data, batch spec (see fica_jax/train/stage.py).
def renders(cfg: ml_collections.ConfigDict) -> list[RenderCall]:
    """One dome frame per example, rendered forward and backward (`render_dome_frames`)."""
    r, s = int(cfg.data.uv_resolution), int(cfg.data.image_size)
    return [RenderCall("dome frame", r * r, s, 16, 3, forward=1, backward=1)]


STAGE = Stage(
    name="upm",
    rules="upm",
    make_model=make_model,
    make_loss=make_loss,
    example=example,
    make_data=make_data,  # CaptureData(example), the eye template checked
    batch_spec=batch_spec,
    make_eval=make_eval,
    metrics={"psnr": True, "ssim": True, "isect_overflow": False},
    make_sample=make_sample,
    export_stats=lambda cfg: template_stats(cfg.data.dir),  # the template the maps lie on
    fit_data=fit_data,
    renders=renders,
)
