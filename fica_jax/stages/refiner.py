"""Stage `refiner`: the feed-forward UV refiner (FiCA Sec. 2.3) through the shared loop.

Each example is one identity (`example`): its ground-truth UV maps, the
refiner's *input* maps, the portrait (view 0) with camera, landmarks and their UV coordinates,
and dome frame 1. The input maps are `cfg.model.input_source`:
- "corrupt" (default, the curriculum): the ground truth with a generator's errors, masked blur,
  colour shift, a low-frequency geometry offset field and a whole-head shift / scale (the
  misalignment with the portrait the refiner exists to fix; `corrupt_maps`,
  strengths `cfg.model.corruption`); deterministic per record on the eval split.
- "samples": the DiT's maps cached by `fica sample --split SPLIT --out OUT`, read from
  `cfg.model.samples_dir` (= OUT/maps; `ID_texture.npy`, `ID_geometry.npy`); a missing file is a
  one-line error naming it. What the refiner is given at inference.
- "mix": training examples take the samples with probability `cfg.model.sample_prob`, else the
  curriculum; held-out examples the samples (so "samples" and "mix" runs are scored alike).

The refiner sees the portrait and a render of its input maps from the portrait's camera (ViT
tokens for its cross-attention) and, our addition, both images pulled back into UV through the
input geometry with a depth-tested visibility mask (`uv_cues`, tolerance
`cfg.model.visibility_tolerance`): the paper's refiner reads image evidence through the ViT
features alone, which at the tiny CPU scale are a 4x4 token grid; the cues give the U-Net
pixel-aligned evidence (not ablated separately); with `cfg.model.evidence` also the portrait's
de-lit colours there, with a direct path to the texture (`models/refiner.py`). Its output maps
are rendered the same way (`render/surfels.py`, the flat-surfel mesh proxy) and compared with
the portrait. Pose and expression are the ground truth's, as in the paper's training: the maps
are neutral, so each render adds the view's posed-minus-neutral UV geometry offset
(`view_uv_geometry[v] - uv_geometry`, stored per view) to the refined neutral geometry. Renders
are composited over the portrait's own background pixels (outside its mask; black inside), so a
hole in the head and surface outside the silhouette both cost photometrically.

Loss (weights `cfg.model.loss_weights`, the supplement's 2.0 / 0.5 / 0.01 / 1.0; the tiny
config rescales two of them for its 32 px portraits, see configs/refiner.py):
- `photo`: L1 of the composited render vs the portrait, whole image. With
  `cfg.model.shaded_photo` the render is of the texture times the portrait's shading
  (`portrait_shading`: first-order spherical harmonics of the normals, fitted to the portrait's
  colours against the input texture, no gradient) [ours]: the texture is albedo and the
  portrait is lit, and unshaded the refiner learns to paint each portrait's light into the
  texture, everywhere (demo, refined vs DiT maps on held-out identities: -1.0 dB on the texels
  the portrait shows, -2.2 dB on the rest).
- `mask`: L1 of the render's alpha vs the portrait mask.
- `kpts`: L1 in pixels of the refined landmarks (the refined posed geometry sampled at the
  landmarks' UV coordinates, projected) vs the portrait's, visible landmarks only.
- `reg` = `reg_texture` L1(T', T_in) + `reg_laplacian` L1(lap G', lap G_in) (`uv_laplacian` of
  the geometry in the model's normalised units) + `reg_normal` L1 of the normal maps (from the
  geometry's UV tangents) of G' vs G_in; all inside the UV mask.

`make_eval` (test split): portrait PSNR inside the portrait mask and keypoint error in pixels,
refined vs the unrefined input (`baseline_*`), and novel-view PSNR against dome frame 1.
`make_sample`: portrait | render before | render after | 4x error before | 4x error after.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import transforms as T
from data_pipelines.pipeline import CaptureData, open_source
from data_pipelines.shards import template_stats
from fica_jax import config
from fica_jax.errors import UserError
from fica_jax.geometry.uvmaps import uv_laplacian
from fica_jax.infer.evidence import portrait_light, training_gain
from fica_jax.infer.refine import refine, render_view
from fica_jax.infer.shape_samples import space_at, training_geometries
from fica_jax.models.refiner import VARIANTS, Refiner, RefinerConfig
from fica_jax.preview import write_step_sheet
from fica_jax.quality import image as metrics
from fica_jax.render.surfels import normal_maps
from fica_jax.train.stage import RenderCall, Stage

_SIZE_KEYS = ("channels", "attn_levels", "heads", "groups", "vit", "vit_patch")
INPUT_SOURCES = ("corrupt", "samples", "mix")


def refiner_config(cfg: ml_collections.ConfigDict) -> RefinerConfig:
    """The variant named by `cfg.model.variant` at the data's sizes; non-empty
    `cfg.model.{channels, ...}` override its sizes."""
    return config.variant(
        VARIANTS,
        cfg.model.variant,
        "model.variant",
        {k: cfg.model.get(k) for k in _SIZE_KEYS},
        uv_resolution=cfg.data.uv_resolution,
        image_size=cfg.data.image_size,
        vit_trainable=bool(cfg.model.vit_trainable),
        evidence=bool(cfg.model.get("evidence", False)),
        position_center=tuple(cfg.model.position_center),
        position_extent=tuple(cfg.model.position_extent),
    )


def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Refiner:
    return Refiner(refiner_config(cfg), rngs=rngs, dtype=jnp.dtype(cfg.train.compute_dtype))


# ----------------------------------------------------------------------------- loss
def _masked_l1(a: jax.Array, b: jax.Array, m: jax.Array) -> jax.Array:
    """Mean |a - b| over texels/pixels where m [B, H, W] is 1 (and over channels)."""
    return jnp.sum(jnp.abs(a - b) * m[..., None]) / (jnp.sum(m) * a.shape[-1] + 1e-6)


def keypoint_error(kpts: jax.Array, batch) -> jax.Array:
    """Mean L1 (pixels, per coordinate) of keypoints [B, L, 2] vs the portrait's visible ones."""
    vis = batch["portrait_kpts_visible"][..., None]
    return jnp.sum(jnp.abs(kpts - batch["portrait_kpts"]) * vis) / (2 * jnp.sum(vis) + 1e-6)


def portrait_shading(batch, cues: jax.Array) -> jax.Array:
    """The portrait's shading per texel [B, R, R, 3], fitted to its colours pulled back through
    the input maps (`cues`, `infer.refine.uv_cues`) against the input texture
    (`infer.evidence.portrait_light`, first-order spherical harmonics of the posed normals);
    constant, no gradient."""
    s, _ = portrait_light(
        batch["input_texture"], batch["input_geometry"], batch["uv_mask"], batch, cues
    )
    return jax.lax.stop_gradient(jnp.maximum(s, 0.05))


def refiner_losses(texture, geometry, batch, extent: jax.Array, shading=None) -> dict:
    """Unweighted loss terms (module doc) of refined maps [B, R, R, 3], each a scalar; the
    photometric term renders texture x `shading` [B, R, R, 3] where given."""
    m = batch["uv_mask"]
    lit = texture if shading is None else texture * shading
    out = render_view(lit, geometry, m, batch, "portrait", landmarks=True)
    tex_in, geo_in = batch["input_texture"], batch["input_geometry"]
    lap = jax.vmap(lambda g, mm: uv_laplacian(g / extent, mm))
    return {
        "photo": jnp.mean(jnp.abs(out["image"] - batch["portrait_image"])),
        "mask": jnp.mean(jnp.abs(out["alpha"] - batch["portrait_mask"])),
        "kpts": keypoint_error(out["keypoints"], batch),
        "reg_texture": _masked_l1(texture, tex_in, m),
        "reg_laplacian": _masked_l1(lap(geometry, m), lap(geo_in, m), m),
        "reg_normal": _masked_l1(normal_maps(geometry, m), normal_maps(geo_in, m), m),
    }


def loss_weights(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Per-term weights: photo, mask, kpts, and reg times each of its three parts."""
    w = dict(cfg.model.loss_weights)
    want = {"photo", "mask", "kpts", "reg", "reg_texture", "reg_laplacian", "reg_normal"}
    if set(w) != want:
        raise UserError(
            f"config model.loss_weights has keys {sorted(w)}; expected exactly {sorted(want)}"
        )
    reg = float(w.pop("reg"))
    return {k: float(v) * (reg if k.startswith("reg_") else 1.0) for k, v in w.items()}


def make_loss(cfg: ml_collections.ConfigDict):
    w = loss_weights(cfg)
    extent = jnp.asarray(cfg.model.position_extent, jnp.float32)
    tol = float(cfg.model.visibility_tolerance)
    shaded = bool(cfg.model.get("shaded_photo", False))

    def loss_fn(model: Refiner, batch, rng: jax.Array):
        del rng
        r = refine(model, batch, tol)
        s = portrait_shading(batch, r["cues"]) if shaded else None
        terms = refiner_losses(r["texture"], r["geometry"], batch, extent, s)
        return sum(w[k] * v for k, v in terms.items()), terms

    return loss_fn


# ----------------------------------------------------------------------------- eval, preview
def held_out(
    model: Refiner, batch, tolerance: float = 0.01, shaded: bool = False
) -> dict[str, jax.Array]:
    """Portrait and frame-1 renders of the input ("before") and refined ("after") maps, and
    the portrait keypoints of both -> {name: array}. `shaded`: both portrait renders under the
    portrait's shading fitted to the input (`portrait_shading`), as the shaded loss sees them;
    the frame keeps the plain texture (its light is another)."""
    r, m = refine(model, batch, tolerance), batch["uv_mask"]
    shade = portrait_shading(batch, r["cues"]) if shaded else 1.0
    out = {}
    for name, tex, geo in (("before", batch["input_texture"], batch["input_geometry"]),
                           ("after", r["texture"], r["geometry"])):  # fmt: skip
        p = render_view(tex * shade, geo, m, batch, "portrait", landmarks=True)
        out[name], out[f"{name}_kpts"] = p["image"], p["keypoints"]
        out[f"{name}_frame"] = render_view(tex, geo, m, batch, "frame")["image"]
    return out


def make_eval(cfg: ml_collections.ConfigDict):
    """Held-out portrait PSNR (inside the portrait mask; under the portrait's fitted shading
    with `model.shaded_photo`, as trained), keypoint error (px) and frame-1 PSNR (inside its
    mask), refined vs the unrefined input maps (`baseline_*`)."""

    tol = float(cfg.model.visibility_tolerance)
    shaded = bool(cfg.model.get("shaded_photo", False))

    def eval_fn(model: Refiner, batch, rng: jax.Array):
        del rng
        r, res = held_out(model, batch, tol, shaded), {}
        pi, pm = batch["portrait_image"], batch["portrait_mask"]
        fi, fm = batch["frame_image"], batch["frame_mask"]
        for name, prefix in (("after", ""), ("before", "baseline_")):
            res[f"{prefix}psnr"] = metrics.masked_psnr(r[name], pi, pm)
            res[f"{prefix}kpt_err"] = keypoint_error(r[f"{name}_kpts"], batch)
            res[f"{prefix}novel_psnr"] = metrics.masked_psnr(r[f"{name}_frame"], fi, fm)
        return res

    return eval_fn


def make_sample(cfg: ml_collections.ConfigDict):
    """Preview sheet of the eval batch (`fica_jax.preview.write_step_sheet`), one row per
    identity: portrait | render before | render after | 4x |before - portrait| | 4x |after - .|."""
    tol = float(cfg.model.visibility_tolerance)
    shaded = bool(cfg.model.get("shaded_photo", False))
    renders = nnx.jit(lambda model, batch: held_out(model, batch, tol, shaded))

    def sample_fn(model: Refiner, batch, rng, workdir, step: int) -> None:
        del rng
        r, gt = jax.device_get((renders(model, batch), batch["portrait_image"]))
        rows = [
            [("portrait", gt[i]), ("before", r["before"][i]), ("after", r["after"][i]),
             ("4x err before", 4 * np.abs(r["before"][i] - gt[i])),
             ("4x err after", 4 * np.abs(r["after"][i] - gt[i]))]
            for i in range(min(len(gt), 8))
        ]  # fmt: skip
        write_step_sheet(rows, workdir, step)

    return sample_fn


# ----------------------------------------------------------------------------- data
def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, r, s = cfg.data.batch_size, cfg.data.uv_resolution, cfg.data.image_size
    n_kpts = cfg.data.landmarks
    spec = lambda *shape: jax.ShapeDtypeStruct((b, *shape), jnp.float32)
    out = {k: spec(r, r, 3) for k in ("uv_texture", "uv_geometry", "uv_normal", "input_texture",
                                      "input_geometry", "portrait_offset", "frame_offset")}  # fmt: skip
    out |= {"uv_mask": spec(r, r), "landmark_uv": spec(n_kpts, 2)}
    for view in ("portrait", "frame"):
        out |= {f"{view}_image": spec(s, s, 3), f"{view}_mask": spec(s, s),
                f"{view}_K": spec(3, 3), f"{view}_viewmat": spec(4, 4)}  # fmt: skip
    out |= {"portrait_kpts": spec(n_kpts, 2), "portrait_kpts_visible": spec(n_kpts)}
    return out | ({"exposure_gain": spec(3)} if cfg.model.get("evidence", False) else {})


def landmark_uvs(
    uv_image: np.ndarray, mask: np.ndarray, kpts: np.ndarray, visible: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """UV coordinates of a view's visible landmarks, read from its per-pixel UV map: uv_image
    [H, W, 2] bilinearly sampled at kpts [L, 2] (pixels) over foreground pixels only ->
    (uv [L, 2], found [L] bool: visible and with a foreground neighbour)."""
    h, w = mask.shape
    x, y = kpts[:, 0] - 0.5, kpts[:, 1] - 0.5  # pixel centres at +0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    acc, wsum = np.zeros((len(kpts), 2), np.float64), np.zeros(len(kpts), np.float64)
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            xi, yi = np.clip(xi, 0, w - 1), np.clip(yi, 0, h - 1)
            wt = (1 - np.abs(x - xi)) * (1 - np.abs(y - yi)) * inside * (mask[yi, xi] > 0)
            acc += wt[:, None] * uv_image[yi, xi]
            wsum += wt
    found = visible.astype(bool) & (wsum > 1e-6)
    uv = np.where(found[:, None], acc / np.maximum(wsum, 1e-6)[:, None], 0.0)
    return uv.astype(np.float32), found


def _masked_blur(x: np.ndarray, m: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of x [R, R, C] over the texels of m [R, R] only (no bleed from outside)."""
    from fica_jax.geometry.uvmaps import normalized_convolution

    mean, _ = normalized_convolution(x, m, sigma)
    return np.where(m[..., None] > 0, mean, 0.0).astype(np.float32)


def corrupt_maps(
    texture: np.ndarray, geometry: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
    blur: float, color: float, offset: float, shift: float = 0.0, scale: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The refiner's curriculum input (FiCA Sec. 2.3 refines imperfect generated maps): the
    ground-truth UV maps with the errors a generator makes. Texture: masked Gaussian blur,
    sigma ~ U(0, blur) texels, and a colour shift (per-channel gain 1 +- color, offset
    +- color / 2). Geometry: a low-frequency offset field, a 4x4 grid of N(0, offset) m
    vectors upsampled cubically over the map, then a similarity misalignment, the head as a
    whole off its portrait (a generator's maps are plausible but not aligned, which is what
    the refiner is for): scaled by 1 + N(0, scale) about its masked centroid and moved by
    N(0, shift) m per axis. Texels outside the mask are left as they are."""
    from scipy.ndimage import zoom

    r = texture.shape[0]
    tex = _masked_blur(texture, mask, rng.uniform(0.0, blur)) if blur > 0 else texture
    gain = 1.0 + rng.uniform(-color, color, 3)
    tex = np.clip(tex * gain + rng.uniform(-color, color, 3) / 2, 0.0, 1.0)
    tex = np.where(mask[..., None] > 0, tex, texture)
    coarse = rng.normal(0.0, offset, (4, 4, 3))
    field = zoom(coarse, (r / 4, r / 4, 1), order=3, mode="nearest")[:r, :r]
    geo = geometry + field
    centre = (geometry * mask[..., None]).sum((0, 1)) / max(float(mask.sum()), 1.0)
    geo = centre + (geo - centre) * (1.0 + rng.normal(0.0, scale)) + rng.normal(0.0, shift, 3)
    geo = np.where(mask[..., None] > 0, geo, geometry)
    return tex.astype(np.float32), geo.astype(np.float32)


def _dit_samples(record: T.Record, directory: str, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The DiT's maps of this identity as `fica sample` writes them (`OUT/maps/ID_texture.npy`,
    `ID_geometry.npy`, [R, R, 3], texture in [0, 1])."""
    name, maps = str(record["identity"]), []
    for kind in ("texture", "geometry"):
        path = pathlib.Path(directory) / f"{name}_{kind}.npy"
        if not path.is_file():
            raise UserError(
                f"config model.samples_dir: {path} not found; write the DiT's maps of this "
                f"split with `fica sample --split SPLIT --out OUT` and pass OUT/maps"
            )
        arr = T.float32(np.load(path))
        if arr.shape != (r, r, 3):
            raise UserError(f"{path}: shape {arr.shape}, expected the data's UV maps {(r, r, 3)}")
        maps.append(arr)
    return maps[0], maps[1]


def example(record: T.Record, rng: np.random.Generator, opts: T.TransformOptions) -> T.Example:
    """One capture record: the identity's ground-truth UV maps, the refiner's input maps
    (`input_texture`, `input_geometry`: the ground truth corrupted by `corrupt_maps`, or the DiT's
    cached samples, `opts.extra` "input_source"), the portrait (view 0, resized only, as for the
    DiT) with its camera, landmarks, their UV coordinates and the offset from neutral to the
    portrait's posed UV geometry, and dome frame 1 (novel-view evaluation) likewise."""
    extra = dict(opts.extra)
    if record["view_image"].shape[0] < 2:
        raise UserError(
            f"record {str(record['identity'])!r} has no dome frames (1 view); the refiner's "
            "novel-view evaluation needs view 1 (re-create the data with --frames >= 1)"
        )
    out = T.uv_maps(record)
    m = out["uv_mask"]
    for prefix, v in (("portrait", 0), ("frame", 1)):
        ex, aff = T.warp_view(record, v, rng, opts, geometric=False)
        out[f"{prefix}_image"], out[f"{prefix}_mask"] = ex["image"], ex["mask"]
        out[f"{prefix}_kpts"] = ex["kpts"]
        out[f"{prefix}_K"] = T.warp_intrinsics(T.float32(record["view_K"][v]), aff)
        out[f"{prefix}_viewmat"] = T.float32(record["view_viewmat"][v])
        posed = T.float32(record["view_uv_geometry"][v])
        out[f"{prefix}_offset"] = (posed - out["uv_geometry"]) * m[..., None]
    uv, found = landmark_uvs(
        T.float32(record["view_uv"][0]), record["view_mask"][0], T.float32(record["view_kpts"][0]),
        record["view_kpts_visible"][0],
    )  # fmt: skip
    out["landmark_uv"] = uv
    hw = out["portrait_mask"].shape
    out["portrait_kpts_visible"] = T.float32(found & T.points_inside(out["portrait_kpts"], hw))
    del out["frame_kpts"]  # the novel view is scored by PSNR only
    source = extra.get("input_source", "corrupt")
    if source == "mix":  # held-out identities: always the samples
        train = str(record["split"]) == "train"
        source = "samples" if not train or rng.uniform() < extra["sample_prob"] else "corrupt"
    if source == "samples":
        tex, geo = _dit_samples(record, extra.get("samples_dir", ""), m.shape[0])
    else:
        tex, geo = corrupt_maps(
            out["uv_texture"], out["uv_geometry"], m, rng, float(extra.get("blur", 1.0)),
            float(extra.get("color", 0.1)), float(extra.get("offset", 0.005)),
            float(extra.get("shift", 0.0)), float(extra.get("scale", 0.0)),
        )  # fmt: skip
    out["input_texture"], out["input_geometry"] = tex, geo
    if "exposure_gain" in extra:  # the evidence's shading level, the training split's
        out["exposure_gain"] = np.asarray(extra["exposure_gain"], np.float32)
    return out


def make_data(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int):
    """Capture shards -> `example`, told the input source and corruption."""
    source = cfg.model.input_source
    if source not in INPUT_SOURCES:
        raise UserError(
            f"config model.input_source={source!r} is unknown; expected one of {INPUT_SOURCES}"
        )
    if source != "corrupt" and not cfg.model.samples_dir:
        raise UserError(
            f"config model.input_source={source!r} needs model.samples_dir: the maps/ folder "
            "`fica sample --split SPLIT --out OUT` writes (OUT/maps)"
        )
    extra = {"input_source": source, "samples_dir": str(cfg.model.samples_dir),
             "sample_prob": float(cfg.model.get("sample_prob", 0.5))}  # fmt: skip
    extra |= {k: float(v) for k, v in dict(cfg.model.corruption).items()}
    if cfg.model.get("evidence", False):
        extra["exposure_gain"] = training_gain(str(cfg.data.dir))
    read = CaptureData(example)
    return read(cfg, split, process_index, process_count, extra=extra)


def fit_data(meta) -> dict:
    """The captures' UV resolution; the portraits are resized to `data.image_size`, the
    refiner's own input size (the tiny config's 32 px keeps its renders cheap)."""
    return {"data.uv_resolution": int(meta["uv_resolution"])}


def export_stats(cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """What `fica generate` needs beside the weights: the template the maps lie on, the
    training portraits' shading level (`infer.evidence.training_gain`, `transfer_gain`) and the
    training identities' shape space (`geometry.shape_fit.shape_space`, `shape_*` arrays)."""
    stats, arrays = template_stats(cfg.data.dir)
    try:
        src = open_source(cfg.data.dir, "train")
    except (UserError, OSError):  # no training captures beside the run: no transfer, no fit
        return stats, arrays
    gain = training_gain(str(cfg.data.dir))
    space = space_at(*training_geometries(src), int(cfg.data.uv_resolution))
    arrays = arrays | {f"stats.shape_{k}": v for k, v in space.items()}
    return stats | {"transfer_gain": [float(g) for g in gain]}, arrays


# name, sharding rule table, model, loss, data, batch spec (see fica_jax/train/stage.py).
def renders(cfg: ml_collections.ConfigDict) -> list[RenderCall]:
    """Per example: the input maps' portrait-view surfel render (forward: `refine`'s cue), and
    the refined maps' (forward and backward: the photo, mask and keypoint losses)."""
    r, s = int(cfg.data.uv_resolution), int(cfg.data.image_size)
    return [RenderCall("portrait surfels", r * r, s, 8, 4, forward=2, backward=1)]


STAGE = Stage(
    name="refiner",
    rules="refiner",
    make_model=make_model,
    make_loss=make_loss,
    example=example,
    make_data=make_data,  # CaptureData(example) told the input source and corruption
    batch_spec=batch_spec,
    make_eval=make_eval,
    metrics={"psnr": True, "kpt_err": False, "novel_psnr": True},
    make_sample=make_sample,
    export_stats=export_stats,
    fit_data=fit_data,
    renders=renders,
)
