"""Stage 2 of the Gaussian rasteriser: tile intersection lists with static shapes (docs/architecture.md §7).

gsplat (`isect_tiles` + `isect_offset_encode`) emits one (tile, depth) key per Gaussian-tile
intersection, sorts the keys and gives each tile a contiguous range of the sorted list. We build
the same list with a static number of slots, `isect_capacity`:
1. Gaussians are ordered by depth (culled ones last);
2. each Gaussian's tile box (from its radius, tightened by opacity as gsplat's kernel does:
   beyond `sqrt(2 ln(255 o))` sigma the alpha is below 1/255 anyway) is expanded into the slots
   by a cumulative sum + `searchsorted`, in depth order;
3. a stable sort by tile id keeps each tile's run depth-ordered, and `searchsorted` gives every
   tile its `[start, start + count)` range.

There is no per-tile cap: a tile's list is as long as it is, and the compositor walks exactly
that range (`composite.composite_tiles`). The only static size is the slot count. The caller
sizes it from `count_isects` (a cheap pass over the tile boxes) rounded up by `bucket_capacity`,
so it fits; where it is too small anyway (a capacity fixed under `jit`), the *farthest*
intersections are the ones missing, and `BinStats.isect_overflow` counts them (the rasteriser
reports it in `meta` and warns). Cost is O(G log G + S log S) for G Gaussians and S slots.
Binning carries no gradient (integer ids only).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fica_jax.render.composite import ALPHA_MIN
from fica_jax.render.project import EXTENT_SIGMA


class BinStats(NamedTuple):
    n_isects: jax.Array  # [] int32 Gaussian-tile intersections wanted
    isect_overflow: jax.Array  # [] int32 intersections beyond isect_capacity (missing)
    max_tile_count: jax.Array  # [] int32 longest tile list


class TileLists(NamedTuple):
    gid: jax.Array  # [S] int32 Gaussian ids, grouped by tile, front to back within a tile
    start: jax.Array  # [T] int32 first slot of each tile's run
    count: jax.Array  # [T] int32 length of each tile's run


def tile_grid(width: int, height: int, tile_size: int) -> tuple[int, int]:
    """(tiles_x, tiles_y) covering the image."""
    return -(-width // tile_size), -(-height // tile_size)


def default_isect_capacity(n: int, n_tiles: int) -> int:
    """Slot count when nothing better is known (under `jit`): every Gaussian in ~8 tiles."""
    return max(1, min(n * n_tiles, 8 * n + 4096))


def bucket_capacity(n_isects: int) -> int:
    """Slot count for a counted `n_isects`: the next power of two above it plus 1/64 slack
    (so that 1-ulp differences between the count pass and the render cannot overflow), at
    least 1024. Powers of two keep the number of distinct compiled shapes small."""
    need = n_isects + n_isects // 64 + 64
    return max(1024, 1 << (need - 1).bit_length())


def tile_boxes(
    means2d: jax.Array,  # [N, 2]
    radii: jax.Array,  # [N, 2] int, 0 = culled
    opacities: jax.Array,  # [N] (after antialiasing compensation)
    tiles_x: int,
    tiles_y: int,
    tile_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per Gaussian: (x0 [N], y0 [N], box width in tiles [N], tiles touched [N], 0 if culled)."""
    means2d, opacities = jax.lax.stop_gradient(means2d), jax.lax.stop_gradient(opacities)
    live = (radii[:, 0] > 0) & (radii[:, 1] > 0) & (opacities >= ALPHA_MIN)
    ext = jnp.sqrt(2.0 * jnp.log(jnp.maximum(opacities, ALPHA_MIN) / ALPHA_MIN))
    shrink = jnp.minimum(1.0, ext / EXTENT_SIGMA)
    r = radii.astype(means2d.dtype) * shrink[:, None]
    lo = jnp.floor((means2d - r) / tile_size).astype(jnp.int32)
    hi = jnp.ceil((means2d + r) / tile_size).astype(jnp.int32)
    x0, x1 = jnp.clip(lo[:, 0], 0, tiles_x), jnp.clip(hi[:, 0], 0, tiles_x)
    y0, y1 = jnp.clip(lo[:, 1], 0, tiles_y), jnp.clip(hi[:, 1], 0, tiles_y)
    bw = x1 - x0
    return x0, y0, bw, jnp.where(live, bw * (y1 - y0), 0)


def count_isects(means2d, radii, opacities, width: int, height: int, tile_size: int):
    """[] int32 Gaussian-tile intersections `bin_gaussians` will need (same tile boxes)."""
    tw, th = tile_grid(width, height, tile_size)
    return tile_boxes(means2d, radii, opacities, tw, th, tile_size)[3].sum()


def bin_gaussians(
    means2d: jax.Array,  # [N, 2]
    radii: jax.Array,  # [N, 2] int, 0 = culled
    depths: jax.Array,  # [N]
    opacities: jax.Array,  # [N] (after antialiasing compensation)
    width: int,
    height: int,
    *,
    tile_size: int = 16,
    isect_capacity: int | None = None,
) -> tuple[TileLists, BinStats]:
    """Depth-ordered per-tile Gaussian lists in `isect_capacity` slots (see module doc)."""
    depths = jax.lax.stop_gradient(depths)
    n = depths.shape[0]
    tw, th = tile_grid(width, height, tile_size)
    n_tiles = tw * th
    cap = isect_capacity or default_isect_capacity(n, n_tiles)
    x0, y0, bw, counts = tile_boxes(means2d, radii, opacities, tw, th, tile_size)

    order = jnp.argsort(jnp.where(counts > 0, depths, jnp.inf), stable=True)
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
    lists = TileLists(
        gid_sorted.astype(jnp.int32), start.astype(jnp.int32), count.astype(jnp.int32)
    )
    stats = BinStats(
        n_isects=total.astype(jnp.int32),
        isect_overflow=jnp.maximum(total - cap, 0).astype(jnp.int32),
        max_tile_count=count.max().astype(jnp.int32),
    )
    return lists, stats
