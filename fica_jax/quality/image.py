"""PSNR and SSIM in JAX, plain and restricted to a mask (docs/architecture.md §8).

SSIM follows the standard convention (Wang et al. 2004, as dm-pix and skimage's
`gaussian_weights=True`): an 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid'
filtering (the map is (H - 10) x (W - 10)), data range `max_val`. The masked variants average
the per-pixel values over pixels where the mask is 1 (for SSIM: over the valid region's pixels).
Images are [..., H, W, C] float in [0, max_val]. `psnr` and `ssim` give one value per leading
index; the masked variants pool every masked pixel of the batch into one value unless
`per_image`, which gives one value per leading index. All five equal scikit-image's
`peak_signal_noise_ratio` / `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=max_val, channel_axis=-1)` (tests/quality/test_quality_metrics.py).

`visible_unseen_psnr` splits a completed UV texture's PSNR between the texels the portrait shows
and those the generator had to invent: per example, the MSE over the selected texels and all
channels, then 10 log10(max_val^2 / mse); an exact match is capped at 120 dB like `psnr` (MSE
floor 1e-12) and an empty selection is NaN.

`weights_unavailable` / `require_weights` are shared by the learned metrics (`lpips.py`,
`arcface.py`): their weights are local files and a metric without them is reported as
unavailable, never computed with random weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from fica_jax.errors import UserError

_TAPS, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03


def _window() -> jax.Array:
    x = jnp.arange(_TAPS, dtype=jnp.float32) - (_TAPS - 1) / 2
    w = jnp.exp(-0.5 * jnp.square(x / _SIGMA))
    return w / jnp.sum(w)


def _blur(x: jax.Array) -> jax.Array:
    """Separable 'valid' Gaussian filter over H and W of [N, H, W, C]."""
    w = _window()
    x = jnp.moveaxis(x, -1, 1)  # [N, C, H, W]
    n, c, h, wd = x.shape
    flat = x.reshape(n * c, 1, h, wd)
    flat = jax.lax.conv_general_dilated(
        flat, w.reshape(1, 1, _TAPS, 1), (1, 1), "VALID", precision="highest"
    )
    flat = jax.lax.conv_general_dilated(
        flat, w.reshape(1, 1, 1, _TAPS), (1, 1), "VALID", precision="highest"
    )
    return jnp.moveaxis(flat.reshape(n, c, *flat.shape[2:]), 1, -1)


def ssim_map(a: jax.Array, b: jax.Array, max_val: float = 1.0) -> jax.Array:
    """Per-pixel SSIM [..., H - 10, W - 10] (channel-averaged)."""
    lead = a.shape[:-3]
    a = a.reshape(-1, *a.shape[-3:]).astype(jnp.float32)
    b = b.reshape(-1, *b.shape[-3:]).astype(jnp.float32)
    c1, c2 = (_K1 * max_val) ** 2, (_K2 * max_val) ** 2
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a**2
    var_b = _blur(b * b) - mu_b**2
    cov = _blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return jnp.mean(s, axis=-1).reshape(*lead, *s.shape[1:3])


def ssim(a: jax.Array, b: jax.Array, max_val: float = 1.0) -> jax.Array:
    """Mean SSIM per image [...] (equals dm_pix.ssim)."""
    return jnp.mean(ssim_map(a, b, max_val), axis=(-2, -1))


def psnr(a: jax.Array, b: jax.Array, max_val: float = 1.0) -> jax.Array:
    """PSNR per image [...] in dB."""
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(-3, -2, -1))
    return 10.0 * jnp.log10(max_val**2 / jnp.maximum(mse, 1e-12))


def masked_psnr(
    a: jax.Array, b: jax.Array, mask: jax.Array, max_val: float = 1.0, per_image: bool = False
) -> jax.Array:
    """PSNR over the pixels where mask [..., H, W] is 1: pooled over the whole batch, or one
    value per leading index with `per_image`."""
    m = mask[..., None].astype(jnp.float32)
    axes = (-3, -2, -1) if per_image else None
    se = jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)) * m, axis=axes)
    mse = se / (jnp.sum(m, axis=axes) * a.shape[-1] + 1e-9)
    return 10.0 * jnp.log10(max_val**2 / jnp.maximum(mse, 1e-12))


def masked_ssim(
    a: jax.Array, b: jax.Array, mask: jax.Array, max_val: float = 1.0, per_image: bool = False
) -> jax.Array:
    """Mean SSIM over the valid-region pixels where mask [..., H, W] is 1 (the mask cropped by
    the window radius like the map): pooled over the batch, or per leading index."""
    r = (_TAPS - 1) // 2
    m = mask[..., r:-r, r:-r].astype(jnp.float32)
    axes = (-2, -1) if per_image else None
    return jnp.sum(ssim_map(a, b, max_val) * m, axis=axes) / (jnp.sum(m, axis=axes) + 1e-9)


def visible_unseen_psnr(
    pred: jax.Array,  # [..., R, R, C] in [0, max_val]
    gt: jax.Array,  # [..., R, R, C]
    atlas: jax.Array,  # [..., R, R]; > 0.5 = inside the UV layout
    visible: jax.Array,  # [..., R, R]; > 0.5 = shown by the portrait (partial_uv[..., 3])
    max_val: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(PSNR on atlas & visible texels, PSNR on atlas & ~visible texels), one value per leading
    index [...]: each pools the example's squared error over its selected texels and channels
    (`masked_psnr(per_image=True)`); NaN where an example selects no texel."""
    atlas, visible = atlas > 0.5, visible > 0.5

    def one(sel):
        n = jnp.sum(sel, axis=(-2, -1))
        return jnp.where(n > 0, masked_psnr(pred, gt, sel, max_val, per_image=True), jnp.nan)

    return one(atlas & visible), one(atlas & ~visible)


def weights_unavailable(*paths: str | os.PathLike) -> str | None:
    """None when every weights file exists, else "unavailable (no weights at PATH)" naming the
    first missing one: what an evaluation report prints in place of the metric."""
    for p in paths:
        if not Path(p).expanduser().is_file():
            return f"unavailable (no weights at {Path(p).expanduser()})"
    return None


def require_weights(what: str, *paths: str | os.PathLike) -> None:
    """Raises a UserError naming `what` and the first missing weights file."""
    for p in paths:
        if not Path(p).expanduser().is_file():
            raise UserError(f"{what}: no weights file at {Path(p).expanduser()}")
