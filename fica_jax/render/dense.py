"""Dense reference rasteriser: every pixel against every (depth-sorted) Gaussian.

No tiles, no capacities, nothing dropped: the ground truth the tiled path is tested against
(values and gradients). Same compositing rules (`composite.py`); memory is bounded by walking the
Gaussians in chunks, but the cost is O(pixels x Gaussians), so use it for small scenes only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fica_jax.render.composite import composite
from fica_jax.render.project import Projected


def pixel_centres(width: int, height: int) -> tuple[jax.Array, jax.Array]:
    """[H*W] x and y of the pixel centres (+0.5), row-major."""
    ys, xs = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
    return xs.reshape(-1) + 0.5, ys.reshape(-1) + 0.5


def render_dense(
    proj: Projected,
    opacities: jax.Array,  # [N]
    colors: jax.Array,  # [N, D]
    width: int,
    height: int,
    *,
    chunk: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """Returns (colour [H, W, D], transmittance [H, W]) without background, one camera."""
    live = (proj.radii[:, 0] > 0) & (proj.radii[:, 1] > 0)
    order = jnp.argsort(jnp.where(live, jax.lax.stop_gradient(proj.depths), jnp.inf))
    px, py = pixel_centres(width, height)
    acc, trans = composite(
        px,
        py,
        proj.means2d[order],
        proj.conics[order],
        jnp.where(live, opacities, 0.0)[order],
        colors[order],
        chunk=chunk,
    )
    return acc.reshape(height, width, -1), trans.reshape(height, width)
