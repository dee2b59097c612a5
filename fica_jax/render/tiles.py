"""Stage 2 of the Gaussian rasteriser: tile intersection with static shapes (docs/architecture.md §7).

gsplat emits one (tile, depth) key per Gaussian-tile intersection, sorts them and gives each
tile a variable-length range. TPUs need static shapes, so here:
1. Gaussians are ordered by depth (culled ones last);
2. each Gaussian's tile box (from its radius, tightened by opacity as gsplat's kernel does:
   beyond `sqrt(2 ln(255 o))` sigma the alpha is below 1/255 anyway) is expanded into at most
   `isect_capacity` (tile, Gaussian) slots via a cumulative sum + `searchsorted`; the slots are
   filled in depth order, so if the capacity is too small the *farthest* intersections drop;
3. a stable sort by tile id keeps each tile's list depth-ordered; every tile takes its first
   `tile_capacity` entries, i.e. the K nearest Gaussians, and the rest are dropped.

Nothing is dropped silently: `BinStats` counts the dropped intersections per camera
(`tile_overflow`, `isect_overflow`, returned in the rasteriser's `meta`). Raise
`tile_capacity` / `isect_capacity` (arguments of `rasterization`) when they are non-zero.
Cost is O(G log G + S log S + tiles x K) for G Gaussians and S slots: it grows with Gaussians
plus pixels, not their product. Binning carries no gradient (integer ids only).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fica_jax.render.composite import ALPHA_MIN
from fica_jax.render.project import EXTENT_SIGMA


class BinStats(NamedTuple):
    n_isects: jax.Array  # [] int32 Gaussian-tile intersections wanted
    isect_overflow: jax.Array  # [] int32 intersections beyond isect_capacity (dropped)
    tile_overflow: jax.Array  # [] int32 intersections beyond tile_capacity (dropped)
    tiles_overflowed: jax.Array  # [] int32 tiles that dropped at least one Gaussian
    max_tile_count: jax.Array  # [] int32 longest tile list (the capacity that would suffice)


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(tiles_x, tiles_y) covering the image."""
    return -(-width // tile_size), -(-height // tile_size)


def default_isect_capacity(n: int, n_tiles: int) -> int:
    """Static slot count: every Gaussian in ~8 tiles, never more than all pairs."""
    return max(1, min(n * n_tiles, 8 * n + 4096))


def bin_gaussians(
    means2d: jax.Array,  # [N, 2]
    radii: jax.Array,  # [N, 2] int, 0 = culled
    depths: jax.Array,  # [N]
    opacities: jax.Array,  # [N] (after antialiasing compensation)
    width: int,
    height: int,
    *,
    tile_size: int = 16,
    tile_capacity: int = 256,
    isect_capacity: int | None = None,
) -> tuple[jax.Array, jax.Array, BinStats]:
    """Returns (ids [T, K] int32, valid [T, K] bool, stats): each tile's K nearest Gaussians."""
    means2d, depths, opacities = map(jax.lax.stop_gradient, (means2d, depths, opacities))
    n = depths.shape[0]
    tw, th = tile_grid(width, height, tile_size)
    n_tiles = tw * th
    cap = isect_capacity or default_isect_capacity(n, n_tiles)

    live = (radii[:, 0] > 0) & (radii[:, 1] > 0) & (opacities >= ALPHA_MIN)
    ext = jnp.sqrt(2.0 * jnp.log(jnp.maximum(opacities, ALPHA_MIN) / ALPHA_MIN))
    shrink = jnp.minimum(1.0, ext / EXTENT_SIGMA)
    r = radii.astype(means2d.dtype) * shrink[:, None]
    lo = jnp.floor((means2d - r) / tile_size).astype(jnp.int32)
    hi = jnp.ceil((means2d + r) / tile_size).astype(jnp.int32)
    x0, x1 = jnp.clip(lo[:, 0], 0, tw), jnp.clip(hi[:, 0], 0, tw)
    y0, y1 = jnp.clip(lo[:, 1], 0, th), jnp.clip(hi[:, 1], 0, th)
    bw = x1 - x0
    counts = jnp.where(live, bw * (y1 - y0), 0)

    order = jnp.argsort(jnp.where(live, depths, jnp.inf), stable=True)
    ends = jnp.cumsum(counts[order])
    total = ends[-1]
    slot = jnp.arange(cap, dtype=ends.dtype)
    rank = jnp.minimum(jnp.searchsorted(ends, slot, side="right"), n - 1)
    gid = order[rank]
    local = slot - (ends[rank] - counts[gid])
    w = jnp.maximum(bw[gid], 1)
    tile = (y0[gid] + local // w) * tw + x0[gid] + local % w
    tile = jnp.where(slot < total, tile, n_tiles)  # n_tiles = empty slot, sorts last

    # stable: slots are already in depth order, so each tile's run stays front to back
    by_tile = jnp.argsort(tile, stable=True)
    tile_sorted, gid_sorted = tile[by_tile], gid[by_tile]
    tids = jnp.arange(n_tiles, dtype=tile.dtype)
    start = jnp.searchsorted(tile_sorted, tids, side="left")
    count = jnp.searchsorted(tile_sorted, tids, side="right") - start
    k = jnp.arange(tile_capacity)
    valid = k[None, :] < count[:, None]
    ids = gid_sorted[jnp.minimum(start[:, None] + k[None, :], cap - 1)]
    ids = jnp.where(valid, ids, 0).astype(jnp.int32)
    stats = BinStats(
        n_isects=total.astype(jnp.int32),
        isect_overflow=jnp.maximum(total - cap, 0).astype(jnp.int32),
        tile_overflow=jnp.maximum(count - tile_capacity, 0).sum().astype(jnp.int32),
        tiles_overflowed=(count > tile_capacity).sum().astype(jnp.int32),
        max_tile_count=count.max().astype(jnp.int32),
    )
    return ids, valid, stats
