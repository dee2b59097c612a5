"""Per-stage example transforms and the paper's augmentations (FiCA supp., Sapiens fine-tuning).

FiCA fine-tunes Sapiens "with per-frame importance sampling, random cropping/scaling, and
photometric distortion". Here:
- geometric: a random zoom (crop of 1/s of the frame, s ~ U(scale_range)) and shift, applied as
  one axis-aligned affine map to the image (bilinear), to the mask and dense targets uv/vtx/nrm
  (nearest: targets are per-pixel attributes that must not be blended across silhouettes), to the
  keypoints (exact) and, for the UPM stage, to the intrinsics K;
- photometric (image only, mmseg's PhotoMetricDistortion defaults, each with p=0.5): brightness,
  contrast, saturation, hue rotation.

Each stage's examples come from a module-level function `(record, rng, opts) -> {name: array}`
that the stage names in its `STAGE` (`make_data=CaptureData(fn)`); `StageTransform` is the
picklable Grain `RandomMap` that applies it. Images and UV textures are float32 in [0, 1] for
every stage (one convention, SCHEMA.md "Value ranges").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import grain
import numpy as np

from fica_jax.errors import UserError

Record = Mapping[str, np.ndarray]
Example = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    scale_range: tuple[float, float] = (0.8, 1.25)  # zoom factor s: crop 1/s of the frame
    max_shift: float = 0.1  # crop centre shift, fraction of the frame size
    p: float = 0.5  # probability of each photometric op
    brightness: float = 32 / 255  # additive delta, image units
    contrast: tuple[float, float] = (0.5, 1.5)
    saturation: tuple[float, float] = (0.5, 1.5)
    hue_deg: float = 18.0


@dataclasses.dataclass(frozen=True)
class TransformOptions:
    augment: bool = True
    image_size: int | None = None  # output image side; None keeps the stored size
    aug: AugmentConfig = AugmentConfig()
    extra: tuple = ()  # (key, value) pairs a stage's example function reads (hashable)


# ------------------------------------------------------------------------- geometry
@dataclasses.dataclass(frozen=True)
class Affine:
    """Axis-aligned map from output to input pixel coords: x_in = ax * x_out + bx (same in y)."""

    ax: float
    bx: float
    ay: float
    by: float


def sample_affine(
    rng: np.random.Generator | None,
    in_hw: tuple[int, int],
    out_hw: tuple[int, int],
    aug: AugmentConfig,
) -> Affine:
    """Identity resize when rng is None; otherwise a random zoom+shift crop."""
    (hi, wi), (ho, wo) = in_hw, out_hw
    if rng is None:
        return Affine(wi / wo, 0.0, hi / ho, 0.0)
    s = rng.uniform(*aug.scale_range)
    cw, ch = wi / s, hi / s
    cx = wi / 2 + rng.uniform(-aug.max_shift, aug.max_shift) * wi
    cy = hi / 2 + rng.uniform(-aug.max_shift, aug.max_shift) * hi
    return Affine(cw / wo, cx - cw / 2, ch / ho, cy - ch / 2)


def _axis_nearest(n_in: int, n_out: int, a: float, b: float) -> tuple[np.ndarray, np.ndarray]:
    x = a * (np.arange(n_out) + 0.5) + b  # output pixel centres in input coords
    idx = np.floor(x).astype(np.int64)
    ok = (idx >= 0) & (idx < n_in)
    return np.clip(idx, 0, n_in - 1), ok


def warp_nearest(arr: np.ndarray, aff: Affine, out_hw: tuple[int, int]) -> np.ndarray:
    """[H, W, ...] -> [h, w, ...]; zeros where the crop leaves the frame."""
    iy, oky = _axis_nearest(arr.shape[0], out_hw[0], aff.ay, aff.by)
    ix, okx = _axis_nearest(arr.shape[1], out_hw[1], aff.ax, aff.bx)
    out = arr[iy][:, ix]
    ok = (oky[:, None] & okx[None, :]).reshape(out_hw + (1,) * (arr.ndim - 2))
    return np.where(ok, out, np.zeros((), arr.dtype))


def _axis_linear(n_in: int, n_out: int, a: float, b: float) -> np.ndarray:
    """[n_out, n_in] interpolation matrix. Samples inside the frame replicate the edge pixel;
    samples outside it are zero, exactly where `warp_nearest` (masks, targets) is zero."""
    xc = a * (np.arange(n_out) + 0.5) + b  # output pixel centres in input coords
    x = xc - 0.5  # index space: pixel centres at integers
    i0 = np.floor(x).astype(np.int64)
    w1 = (x - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    inside = (xc >= 0) & (xc < n_in)
    for idx, w in ((i0, 1 - w1), (i0 + 1, w1)):
        np.add.at(m, (rows[inside], np.clip(idx, 0, n_in - 1)[inside]), w[inside])
    return m


def warp_bilinear(img: np.ndarray, aff: Affine, out_hw: tuple[int, int]) -> np.ndarray:
    """[H, W, C] float -> [h, w, C]; separable because the map has no rotation."""
    my = _axis_linear(img.shape[0], out_hw[0], aff.ay, aff.by)
    mx = _axis_linear(img.shape[1], out_hw[1], aff.ax, aff.bx)
    return np.einsum("yH,HWC,xW->yxC", my, img.astype(np.float32), mx, optimize=True)


def warp_points(pts: np.ndarray, aff: Affine) -> np.ndarray:
    """[..., 2] pixel (x, y) in the input -> output pixel coords."""
    x = (pts[..., 0] - aff.bx) / aff.ax
    y = (pts[..., 1] - aff.by) / aff.ay
    return np.stack([x, y], -1).astype(np.float32)


def warp_intrinsics(K: np.ndarray, aff: Affine) -> np.ndarray:
    """[3, 3] K of the input camera -> K of the warped image (pixel centres at +0.5 preserved)."""
    S = np.array([[1 / aff.ax, 0, -aff.bx / aff.ax], [0, 1 / aff.ay, -aff.by / aff.ay], [0, 0, 1]])
    return (S @ K).astype(np.float32)


def points_inside(pts: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    return (pts[..., 0] >= 0) & (pts[..., 0] < hw[1]) & (pts[..., 1] >= 0) & (pts[..., 1] < hw[0])


# ------------------------------------------------------------------------- photometric
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)


def photometric(img: np.ndarray, rng: np.random.Generator, aug: AugmentConfig) -> np.ndarray:
    """[H, W, 3] float in [0, 1] -> same, randomly distorted (mmseg PhotoMetricDistortion)."""
    img = img.astype(np.float32)
    if rng.random() < aug.p:
        img = img + rng.uniform(-aug.brightness, aug.brightness)
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < aug.p:
        img = img * rng.uniform(*aug.contrast)
    if rng.random() < aug.p:
        gray = img @ _YIQ[0].astype(np.float32)
        img = gray[..., None] + rng.uniform(*aug.saturation) * (img - gray[..., None])
    if rng.random() < aug.p:
        t = np.deg2rad(rng.uniform(-aug.hue_deg, aug.hue_deg))
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        img = img @ (_YIQ_INV @ rot @ _YIQ).T.astype(np.float32)
    if not contrast_first and rng.random() < aug.p:
        img = img * rng.uniform(*aug.contrast)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ------------------------------------------------------------------------- stages
def _out_hw(record: Record, opts: TransformOptions) -> tuple[int, int]:
    h, w = record["view_image"].shape[1:3]
    return (opts.image_size, opts.image_size) if opts.image_size else (int(h), int(w))


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _uv_maps(record: Record) -> Example:
    # Every stage gets textures in [0, 1] like images (SCHEMA.md "Value ranges"); a model that
    # wants [-1, 1] (the VAE) maps them with `fica_jax.models.uv_latent.normalize_map`.
    return {
        "uv_texture": _f32(record["uv_texture"]) / 255.0,
        "uv_geometry": _f32(record["uv_geometry"]),
        "uv_normal": _f32(record["uv_normal"]),
        "uv_mask": _f32(record["uv_mask"]),
    }


def _view(
    record: Record, v: int, rng: np.random.Generator, opts: TransformOptions, geometric: bool
) -> tuple[Example, Affine]:
    """Warps view v's image, mask, keypoints (and returns the affine for other targets)."""
    out_hw = _out_hw(record, opts)
    in_hw = tuple(record["view_image"].shape[1:3])
    aff = sample_affine(rng if (opts.augment and geometric) else None, in_hw, out_hw, opts.aug)
    kpts = warp_points(_f32(record["view_kpts"][v]), aff)
    vis = record["view_kpts_visible"][v].astype(bool) & points_inside(kpts, out_hw)
    ex = {
        "image": warp_bilinear(_f32(record["view_image"][v]) / 255.0, aff, out_hw),
        "mask": _f32(warp_nearest(record["view_mask"][v], aff, out_hw)),
        "kpts": kpts,
        "kpts_visible": _f32(vis),
    }
    return ex, aff


def dense_example(record: Record, rng: np.random.Generator, opts: TransformOptions) -> Example:
    """Dense predictor (fine-tuned Sapiens): one random view with its per-pixel targets and the
    pose regressor's: the crop's K (the crop changes K, never the camera's rotation or position),
    the view's viewmat and expression code."""
    v = int(rng.integers(record["view_image"].shape[0]))
    ex, aff = _view(record, v, rng, opts, geometric=True)
    hw = ex["mask"].shape
    for key in ("uv", "vtx", "nrm"):
        ex[key] = _f32(warp_nearest(record[f"view_{key}"][v], aff, hw))
    ex["K"] = warp_intrinsics(_f32(record["view_K"][v]), aff)
    ex["viewmat"] = _f32(record["view_viewmat"][v])
    ex["expression"] = _f32(record["view_expression"][v])
    if opts.augment:
        ex["image"] = photometric(ex["image"], rng, opts.aug)
    ex["view"] = np.int32(v)
    return ex


def vae_example(record: Record, rng: np.random.Generator, opts: TransformOptions) -> Example:
    """SDXL-VAE fine-tuning on UV maps; no augmentation (UV atlas positions are meaningful)."""
    return _uv_maps(record)


def dit_example(record: Record, rng: np.random.Generator, opts: TransformOptions) -> Example:
    """Portrait -> UV diffusion. The partial UV maps were unwrapped from the stored portrait, so
    the portrait is only resized, never cropped or recoloured (that would break the pairing)."""
    ex, _ = _view(record, 0, rng, opts, geometric=False)
    out = {"image": ex["image"], "partial_uv": _f32(record["partial_uv"])}
    out.update(_uv_maps(record))
    return out


def upm_example(record: Record, rng: np.random.Generator, opts: TransformOptions) -> Example:
    """UPM: identity UV maps + one random dome frame (views 1..) with its camera and codes.
    Crop/scale is applied to the frame and folded into K; no photometric change because the
    rendered Gaussians' colour must match the frame."""
    n_views = record["view_image"].shape[0]
    if n_views < 2:
        raise UserError(
            f"record {str(record['identity'])!r} has no dome frames (1 view); "
            "the UPM stage needs views 1.. (re-create the data with --frames >= 1)"
        )
    return upm_frame(record, int(rng.integers(1, n_views)), rng, opts)


def upm_frame(record: Record, v: int, rng: np.random.Generator, opts: TransformOptions) -> Example:
    """`upm_example` for dome frame v (held-out reports walk every frame)."""
    ex, aff = _view(record, v, rng, opts, geometric=True)
    out = _uv_maps(record)
    out.update({f"frame_{k}": x for k, x in ex.items()})
    out["frame_K"] = warp_intrinsics(_f32(record["view_K"][v]), aff)
    out["frame_viewmat"] = _f32(record["view_viewmat"][v])
    out["frame_expression"] = _f32(record["view_expression"][v])
    out["frame_gaze"] = _f32(record["view_gaze"][v])
    out["frame_uv_geometry"] = _f32(record["view_uv_geometry"][v])
    out["frame_view"] = np.int32(v)
    return out


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
    from scipy.ndimage import gaussian_filter

    s = (sigma, sigma, 0)
    num = gaussian_filter(x * m[..., None], s, mode="nearest")
    den = gaussian_filter(m[..., None].astype(np.float32), s, mode="nearest")
    return np.where(m[..., None] > 0, num / np.maximum(den, 1e-6), 0.0).astype(np.float32)


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


def _dit_samples(record: Record, directory: str, r: int) -> tuple[np.ndarray, np.ndarray]:
    """The DiT's maps of this identity as `fica sample` writes them (`OUT/maps/ID_texture.npy`,
    `ID_geometry.npy`, [R, R, 3], texture in [0, 1])."""
    import pathlib

    name, maps = str(record["identity"]), []
    for kind in ("texture", "geometry"):
        path = pathlib.Path(directory) / f"{name}_{kind}.npy"
        if not path.is_file():
            raise UserError(
                f"config model.samples_dir: {path} not found; write the DiT's maps of this "
                f"split with `fica sample --split SPLIT --out OUT` and pass OUT/maps"
            )
        arr = _f32(np.load(path))
        if arr.shape != (r, r, 3):
            raise UserError(f"{path}: shape {arr.shape}, expected the data's UV maps {(r, r, 3)}")
        maps.append(arr)
    return maps[0], maps[1]


def refiner_example(record: Record, rng: np.random.Generator, opts: TransformOptions) -> Example:
    """Refiner (FiCA Sec. 2.3): the identity's ground-truth UV maps, the refiner's input maps
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
    out = _uv_maps(record)
    m = out["uv_mask"]
    for prefix, v in (("portrait", 0), ("frame", 1)):
        ex, aff = _view(record, v, rng, opts, geometric=False)
        out[f"{prefix}_image"], out[f"{prefix}_mask"] = ex["image"], ex["mask"]
        out[f"{prefix}_kpts"] = ex["kpts"]
        out[f"{prefix}_K"] = warp_intrinsics(_f32(record["view_K"][v]), aff)
        out[f"{prefix}_viewmat"] = _f32(record["view_viewmat"][v])
        posed = _f32(record["view_uv_geometry"][v])
        out[f"{prefix}_offset"] = (posed - out["uv_geometry"]) * m[..., None]
    uv, found = landmark_uvs(
        _f32(record["view_uv"][0]), record["view_mask"][0], _f32(record["view_kpts"][0]),
        record["view_kpts_visible"][0],
    )  # fmt: skip
    out["landmark_uv"] = uv
    hw = out["portrait_mask"].shape
    out["portrait_kpts_visible"] = _f32(found & points_inside(out["portrait_kpts"], hw))
    del out["frame_kpts"]  # the novel view is scored by PSNR only
    if extra.get("input_source", "corrupt") == "samples":
        tex, geo = _dit_samples(record, extra.get("samples_dir", ""), m.shape[0])
    else:
        tex, geo = corrupt_maps(
            out["uv_texture"], out["uv_geometry"], m, rng, float(extra.get("blur", 1.0)),
            float(extra.get("color", 0.1)), float(extra.get("offset", 0.005)),
            float(extra.get("shift", 0.0)), float(extra.get("scale", 0.0)),
        )  # fmt: skip
    out["input_texture"], out["input_geometry"] = tex, geo
    return out


StageFn = Callable[[Record, np.random.Generator, TransformOptions], Example]


class StageTransform(grain.transforms.RandomMap):
    """Grain RandomMap applying a stage's example function `fn(record, rng, options)`.

    `fn` must be a module-level function (Grain workers unpickle it by its qualified name).
    """

    def __init__(self, fn: StageFn, options: TransformOptions = TransformOptions()):
        if not callable(fn):
            raise UserError(f"stage transform {fn!r} is not a function (record, rng, options)")
        self.fn = fn
        self.options = options

    def random_map(self, element: Record, rng: np.random.Generator) -> Example:
        return self.fn(element, rng, self.options)
