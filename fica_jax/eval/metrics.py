"""PSNR and SSIM in JAX, plain and restricted to a mask (docs/architecture.md §8).

SSIM follows the standard convention (Wang et al. 2004, as dm-pix and skimage's
`gaussian_weights=True`): an 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, 'valid'
filtering (the map is (H - 10) x (W - 10)), data range `max_val`. The masked variants average
the per-pixel values over pixels where the mask is 1 (for SSIM: over the valid region's pixels).
Images are [..., H, W, C] float in [0, max_val]; reductions give one value per leading index
when `per_image`, else the mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def masked_psnr(a: jax.Array, b: jax.Array, mask: jax.Array, max_val: float = 1.0) -> jax.Array:
    """PSNR over the pixels where mask [..., H, W] is 1, pooled over the whole batch."""
    m = mask[..., None].astype(jnp.float32)
    se = jnp.sum(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)) * m)
    mse = se / (jnp.sum(m) * a.shape[-1] + 1e-9)
    return 10.0 * jnp.log10(max_val**2 / jnp.maximum(mse, 1e-12))


def masked_ssim(a: jax.Array, b: jax.Array, mask: jax.Array, max_val: float = 1.0) -> jax.Array:
    """Mean SSIM over the valid-region pixels where mask [..., H, W] is 1, pooled over the batch."""
    r = (_TAPS - 1) // 2
    m = mask[..., r:-r, r:-r].astype(jnp.float32)
    return jnp.sum(ssim_map(a, b, max_val) * m) / (jnp.sum(m) + 1e-9)
