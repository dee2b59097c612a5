"""The paper's augmentations (FiCA supp., Sapiens fine-tuning) and what the stages' example
functions share.

FiCA fine-tunes Sapiens "with per-frame importance sampling, random cropping/scaling, and
photometric distortion". Here:
- geometric: a random zoom (crop of 1/s of the frame, s ~ U(scale_range)) and shift, applied as
  one axis-aligned affine map to the image (bilinear), to the mask and dense targets uv/vtx/nrm
  (nearest: targets are per-pixel attributes that must not be blended across silhouettes), to the
  keypoints (exact) and, for the UPM stage, to the intrinsics K;
- photometric (image only, mmseg's PhotoMetricDistortion defaults, each with p=0.5): brightness,
  contrast, saturation, hue rotation.

Each stage's examples come from a module-level function `(record, rng, opts) -> {name: array}`
in the stage's own module, named by its `STAGE` (`Stage(example=fn)`; `fica_jax/stages/NAME.py`),
built from the pieces here: `uv_maps` (a record's UV maps, resampled to the config's side by
`resize_uv`) and `warp_view` (one view's image, mask and keypoints, cropped / scaled).
`StageTransform` is the picklable Grain `RandomMap` that applies it. Images and UV textures are
float32 in [0, 1] for every stage (one convention, SCHEMA.md "Value ranges").
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
    uv_resolution: int | None = None  # UV map side (`resize_uv`); None keeps the stored size
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


def random_background(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[H, W, 3] in [0, 1] with every pixel outside `mask` [H, W] replaced by a random
    background: a smooth colour field (bilinear over 2-5 random colours per side) plus pixel
    noise of random strength. With a few dozen identities a segmenter otherwise learns their
    backgrounds instead of the head."""
    h, w = mask.shape
    k = int(rng.integers(2, 6))
    coarse = rng.uniform(0.0, 1.0, (k, k, 3)).astype(np.float32)
    y, x = np.linspace(0, k - 1, h), np.linspace(0, k - 1, w)
    y0, x0 = np.minimum(y.astype(int), k - 2), np.minimum(x.astype(int), k - 2)
    fy, fx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    c = lambda dy, dx: coarse[y0[:, None] + dy, x0[None, :] + dx]
    field = (1 - fy) * ((1 - fx) * c(0, 0) + fx * c(0, 1)) + fy * (
        (1 - fx) * c(1, 0) + fx * c(1, 1)
    )
    field = field + rng.normal(0.0, rng.uniform(0.0, 0.1), field.shape)
    out = np.where(mask[..., None] > 0, img, np.clip(field, 0.0, 1.0))
    return out.astype(np.float32)


# ------------------------------------------------------------------------- examples' pieces
def _out_hw(record: Record, opts: TransformOptions) -> tuple[int, int]:
    h, w = record["view_image"].shape[1:3]
    return (opts.image_size, opts.image_size) if opts.image_size else (int(h), int(w))


def float32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def resize_uv(x: np.ndarray, resolution: int | None) -> np.ndarray:
    """UV map [R, R, ...] -> [r, r, ...] by nearest texel (`warp_nearest` over the identity
    resize), the rule for per-texel attributes: nothing is blended across the layout's seams or
    with the background, masks stay binary, and the resized mean of maps is the mean of the
    resized maps (`pipeline.mean_maps`: the VAE's position reference). None or R: unchanged."""
    if not resolution or resolution == x.shape[0]:
        return x
    a = x.shape[0] / resolution
    return warp_nearest(x, Affine(a, 0.0, a, 0.0), (resolution, resolution))


def uv_maps(record: Record, resolution: int | None = None) -> Example:
    """The record's UV texture (in [0, 1]), geometry, normal and mask maps, float32, at
    `resolution` texels a side (`resize_uv`; None: as stored)."""
    # Every stage gets textures in [0, 1] like images (SCHEMA.md "Value ranges"); a model that
    # wants [-1, 1] (the VAE) maps them with `fica_jax.models.uv_latent.normalize_map`.
    uv = lambda k: float32(resize_uv(np.asarray(record[k]), resolution))
    return {
        "uv_texture": uv("uv_texture") / 255.0,
        "uv_geometry": uv("uv_geometry"),
        "uv_normal": uv("uv_normal"),
        "uv_mask": uv("uv_mask"),
    }


def warp_view(
    record: Record, v: int, rng: np.random.Generator, opts: TransformOptions, geometric: bool
) -> tuple[Example, Affine]:
    """Warps view v's image, mask, keypoints (and returns the affine for other targets)."""
    out_hw = _out_hw(record, opts)
    in_hw = tuple(record["view_image"].shape[1:3])
    aff = sample_affine(rng if (opts.augment and geometric) else None, in_hw, out_hw, opts.aug)
    kpts = warp_points(float32(record["view_kpts"][v]), aff)
    vis = record["view_kpts_visible"][v].astype(bool) & points_inside(kpts, out_hw)
    ex = {
        "image": warp_bilinear(float32(record["view_image"][v]) / 255.0, aff, out_hw),
        "mask": float32(warp_nearest(record["view_mask"][v], aff, out_hw)),
        "kpts": kpts,
        "kpts_visible": float32(vis),
    }
    return ex, aff


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
