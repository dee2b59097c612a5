"""Stage 3 of the Gaussian rasteriser: front-to-back alpha compositing (docs/architecture.md §7).

The rules are gsplat 1.5.3's `rasterize_to_pixels` kernel, written as array operations over a
block of pixels x a depth-sorted list of Gaussians instead of a per-pixel loop:
- pixel centres at +0.5; `sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`, `d = mean2d - pixel`;
  skipped if `sigma < 0`;
- `alpha = min(0.999, opacity exp(-sigma))`, skipped (T unchanged) below 1/255;
- the Gaussian whose `T (1 - alpha)` would fall to <= 1e-4 ends the pixel and is not
  composited. T only decreases, so "composited" is `T_incl > 1e-4` for every non-skipped
  Gaussian, a prefix of the list: one `cumprod` replaces the loop;
- the caller adds `T_final * background`.

Memory: the Gaussian list is walked in chunks by `lax.scan` carrying (T, accumulated colour), and
each chunk is `jax.checkpoint`ed, so the backward pass stores only the carries per chunk and
recomputes the [pixels, chunk] alpha block: memory is O(pixels x chunk), not
O(pixels x Gaussians). Gradients are plain JAX autodiff through these operations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4


def _chunk(carry, g, px, py):
    """Composites one chunk of k Gaussians over P pixels. carry: (T [P], acc [P, D], done [P])."""
    trans, acc, done = carry
    means2d, conics, opacities, colors = g  # [k, 2], [k, 3], [k], [k, D]
    dx = means2d[None, :, 0] - px[:, None]  # [P, k]
    dy = means2d[None, :, 1] - py[:, None]
    a, b, c = conics[None, :, 0], conics[None, :, 1], conics[None, :, 2]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    # clamp before exp so that skipped entries (sigma < 0) cannot overflow in either pass
    alpha = jnp.minimum(ALPHA_MAX, opacities[None, :] * jnp.exp(-jnp.maximum(sigma, 0.0)))
    used = (sigma >= 0.0) & (alpha >= ALPHA_MIN)
    alpha = jnp.where(used, alpha, 0.0)
    one_minus = 1.0 - alpha
    t_incl = trans[:, None] * jnp.cumprod(one_minus, axis=1)  # T after each Gaussian
    t_excl = trans[:, None] * jnp.cumprod(
        jnp.concatenate([jnp.ones_like(one_minus[:, :1]), one_minus[:, :-1]], 1), axis=1
    )
    # a pixel ended by an earlier chunk stays ended even if T_incl here would pass the test
    below = used & (jax.lax.stop_gradient(t_incl) <= T_MIN)
    keep = used & ~below & ~done[:, None]
    weight = jnp.where(keep, alpha * t_excl, 0.0)  # [P, k]
    acc = acc + weight @ colors
    trans = trans * jnp.prod(jnp.where(keep, one_minus, 1.0), axis=1)
    return (trans, acc, done | below.any(axis=1)), None


def composite(
    px: jax.Array,  # [P] pixel-centre x (already +0.5)
    py: jax.Array,  # [P]
    means2d: jax.Array,  # [G, 2] sorted front to back
    conics: jax.Array,  # [G, 3]
    opacities: jax.Array,  # [G] 0 for padding / culled entries
    colors: jax.Array,  # [G, D]
    *,
    chunk: int = 256,
    count: jax.Array | None = None,  # [] entries in use (the rest is padding)
) -> tuple[jax.Array, jax.Array]:
    """Returns (accumulated colour [P, D], final transmittance [P]) without background.

    With `count`, chunks past the list's end, or after every pixel has ended (gsplat's early
    exit), are skipped by `lax.cond`. That saves work only where the cond stays a branch; under
    `vmap` it becomes a select and both sides run (results are identical either way).
    """
    g, d = colors.shape
    chunk = max(1, min(chunk, g))
    pad = (-g) % chunk
    if pad:
        padn = lambda x: jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        means2d, conics, opacities, colors = map(padn, (means2d, conics, opacities, colors))
    n = (g + pad) // chunk
    xs = jax.tree.map(
        lambda x: x.reshape((n, chunk) + x.shape[1:]), (means2d, conics, opacities, colors)
    )
    step = jax.checkpoint(lambda cr, x: _chunk(cr, x, px, py)[0])
    if count is None:
        body = lambda cr, x: (step(cr, x[1]), None)
    else:

        def body(cr, x):
            live = (x[0] * chunk < count) & ~jnp.all(cr[2])
            return jax.lax.cond(live, step, lambda c, _: c, cr, x[1]), None

    init = (
        jnp.ones(px.shape, colors.dtype),
        jnp.zeros(px.shape + (d,), colors.dtype),
        jnp.zeros(px.shape, bool),
    )
    (trans, acc, _), _ = jax.lax.scan(body, init, (jnp.arange(n), xs))
    return acc, trans
