"""The portrait's pixels unwrapped into UV space: FiCA's partial maps (paper Sec. 2.1).

`unwrap_partial(rgb, mask, uv, nrm, vtx, R)` -> [R, R, 10] = [rgb, mask, nrm, vtx]
(`data_pipelines.schema.PARTIAL_UV_CHANNELS`). It is the one unwrap of the project: the synthetic
generator applies it to the renderer's exact dense maps (the stored ground truth), the latent
cache and `fica generate` to the dense predictor's maps of the same portrait.

Scattering each pixel to the texel under its UV leaves dots wherever a texel is smaller than a
pixel's footprint in UV (a 64 px portrait of a head against a 64^2 atlas covers about one texel
in three of what it sees). So the pixel grid is unwrapped as a mesh instead: every 2x2 block of
foreground pixels gives two triangles whose corners are the pixel centres placed at their UVs,
and each triangle is rasterised into the atlas with the three pixels' values interpolated
barycentrically (texel centres at (k + 0.5) / R). A triangle covers only surface that lies between
three pixels the portrait sees; triangles whose UV edges are longer than `max_edge` texels
straddle an atlas seam, a silhouette or a self-occlusion (neighbouring pixels on different parts
of the head) and are dropped. Every foreground pixel also lands on its own texel as before, so
isolated pixels keep their evidence. A texel hit several times gets the mean (normals
re-normalised); texels hit by nothing are zero with mask 0.

Cost: 2 (H - 1)(W - 1) triangles x K^2 candidate texels, K = ceil(max_edge) + 1 (a triangle's
texel bounding box is at most that wide); 1024^2 portraits onto 512^2 atlases: ~2M x 25.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def default_max_edge(height: int, width: int, resolution: int) -> float:
    """Longest UV edge (texels) a pixel-grid triangle may have: 6 pixel spacings at the
    portrait's scale (a pixel spans ~R / H texels on a frontal face, several where the atlas
    magnifies the face or the surface turns away), at least 4 texels. On the procedural head,
    64 px portraits onto a 64^2 atlas: 3 covers 65-68% of the texels a 512 px render of the same
    view sees, 6 covers 73-80% with < 1% outside them, 10 adds little and leaks more."""
    return max(4.0, 6.0 * resolution / min(height, width))


def _grid_triangles(h: int, w: int) -> np.ndarray:
    """[2 (h-1)(w-1), 3] pixel indices of the grid's triangles (two per 2x2 block)."""
    idx = np.arange(h * w).reshape(h, w)
    a, b, c, d = idx[:-1, :-1], idx[:-1, 1:], idx[1:, :-1], idx[1:, 1:]
    first = np.stack([a, b, c], -1).reshape(-1, 3)
    second = np.stack([d, c, b], -1).reshape(-1, 3)
    return np.concatenate([first, second])


@jax.jit(static_argnames=("resolution", "max_edge"))
def unwrap_partial(
    rgb: jax.Array,  # [H, W, 3] in [0, 1]
    mask: jax.Array,  # [H, W] bool / {0, 1}: the pixels that show the head
    uv: jax.Array,  # [H, W, 2] in [0, 1], u right, v down (texel row = v)
    nrm: jax.Array,  # [H, W, 3]
    vtx: jax.Array,  # [H, W, 3]
    resolution: int,
    max_edge: float | None = None,  # texels; None: `default_max_edge`
) -> jax.Array:
    """Unwraps one portrait's foreground into UV space -> [R, R, 10] (module doc)."""
    h, w = mask.shape
    r = resolution
    max_edge = default_max_edge(h, w, r) if max_edge is None else float(max_edge)
    k = math.ceil(max_edge) + 1
    vals = jnp.concatenate([rgb, nrm, vtx], -1).reshape(h * w, 9).astype(jnp.float32)
    fg = (mask > 0).reshape(-1)
    pos = uv.reshape(-1, 2).astype(jnp.float32) * r  # texel units

    # 1. every foreground pixel on its own texel
    ij = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, r - 1)
    texel = [ij[:, 1] * r + ij[:, 0]]
    weight = [fg.astype(jnp.float32)]
    value = [vals]

    # 2. the pixel grid's triangles, rasterised at texel centres
    tri = jnp.asarray(_grid_triangles(h, w))
    p = pos[tri]  # [T, 3, 2]
    edges = jnp.stack([p[:, 1] - p[:, 0], p[:, 2] - p[:, 1], p[:, 0] - p[:, 2]], 1)
    longest = jnp.max(jnp.linalg.norm(edges, axis=-1), axis=-1)
    keep = fg[tri].all(-1) & (longest <= max_edge)
    off = jnp.stack(jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing="xy"), -1).reshape(-1, 2)
    cell = jnp.floor(p.min(1) - 0.5).astype(jnp.int32)[:, None] + off[None]  # [T, K^2, 2]
    q = cell.astype(jnp.float32) + 0.5
    a, b, c = p[:, None, 0], p[:, None, 1], p[:, None, 2]
    cross = lambda u, v: u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]
    area = cross(b - a, c - a)  # [T, 1]
    safe = jnp.where(jnp.abs(area) > 1e-9, area, 1.0)
    wa, wb = cross(b - q, c - q) / safe, cross(c - q, a - q) / safe
    bary = jnp.stack([wa, wb, 1.0 - wa - wb], -1)  # [T, K^2, 3]
    inside = (
        keep[:, None]
        & (jnp.abs(area) > 1e-9)
        & jnp.all(bary >= -1e-6, -1)
        & jnp.all((cell >= 0) & (cell < r), -1)
    )
    texel.append((cell[..., 1] * r + cell[..., 0]).reshape(-1))
    weight.append(inside.astype(jnp.float32).reshape(-1))
    value.append(jnp.einsum("tkc,tcd->tkd", bary, vals[tri]).reshape(-1, 9))

    texel, weight, value = (jnp.concatenate(x) for x in (texel, weight, value))
    texel = jnp.where(weight > 0, texel, 0)
    total = jax.ops.segment_sum(value * weight[:, None], texel, num_segments=r * r)
    count = jax.ops.segment_sum(weight, texel, num_segments=r * r)[:, None]
    mean = total / jnp.maximum(count, 1.0)
    n = mean[:, 3:6]
    n = n / jnp.maximum(jnp.linalg.norm(n, axis=-1, keepdims=True), 1e-8)
    hit = (count > 0).astype(jnp.float32)
    out = jnp.concatenate([mean[:, :3], hit, n * hit, mean[:, 6:9] * hit], -1)
    return out.reshape(r, r, 10)
