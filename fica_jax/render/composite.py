"""Stage 3 of the Gaussian rasteriser: front-to-back alpha compositing (docs/architecture.md §7).

The rules are gsplat 1.5.3's `rasterize_to_pixels` kernel, written as array operations over a
block of pixels x a depth-sorted chunk of Gaussians instead of a per-pixel loop:
- pixel centres at +0.5; `sigma = 0.5 (a dx^2 + c dy^2) + b dx dy`, `d = mean2d - pixel`;
  skipped if `sigma < 0`;
- `alpha = min(0.999, opacity exp(-sigma))`, skipped (T unchanged) below 1/255;
- the Gaussian whose `T (1 - alpha)` would fall to <= 1e-4 ends the pixel and is not
  composited. T only decreases, so "composited" is `T_incl > 1e-4` for every non-skipped
  Gaussian, a prefix of the list: one `cumprod` per chunk replaces the loop;
- the caller adds `T_final * background`.

Two compositors share these rules:

`composite_tiles` (the renderer). Every tile walks its own contiguous range of the global
tile-sorted list (`tiles.bin_gaussians`) in chunks of `chunk` entries under `lax.while_loop`,
with a trip count that is that tile's own: it stops at the end of the range or when all of its
pixels have ended, so cost follows the real intersections and no Gaussian is ever dropped.
Tiles run `tile_batch` at a time (one while loop over a [batch, pixels, chunk] block, which
runs to the longest list in the batch) under `lax.map`. tile_batch = 1 is the sequential path
(fastest on CPU: every tile stops at its own length); tile_batch > 1 first sorts the tiles by
list length, so each batch is a bucket of similar lengths and a few crowded tiles pad only their
own bucket: the parallel path for accelerators without the Pallas kernel (`kernels.py`), where
a handful of buckets (`rasterize.XLA_BUCKETS`) replace thousands of sequential tiles. while_loop has no reverse-mode rule, so
the stage has a `jax.custom_vjp`, as gsplat's CUDA `rasterize_to_pixels_bwd`: the forward saves
only the per-pixel final transmittance and the list position after the last composited Gaussian
(gsplat's `last_ids`); the backward walks each tile's list back to front in the same chunks,
reconstructing the transmittance before each chunk as `T_after / prod(1 - alpha)`, and carrying
per pixel `B = v_T T_final + sum over later Gaussians of w_j (c_j . v_C)` (weights
`w_j = alpha_j T_j`). For a composited Gaussian k with exclusive transmittance T_k:
`dL/dc_k = w_k v_C`, `dL/dalpha_k = T_k (c_k . v_C) - B_k / (1 - alpha_k)`; through the clamp
(zero gradient when `opacity exp(-sigma) > 0.999`, as gsplat) to opacity, sigma, conic and
mean. Within a chunk this is vectorised with cumulative products/sums. Gradients per list slot
are scattered into a [slots, F] buffer; the caller's gather (`feats[gid]`) turns them into
per-Gaussian gradients by ordinary autodiff.

`composite` (the dense reference, and the [tiles, K] table the tiled path replaced). A fixed
list walked by `lax.scan` in `jax.checkpoint`ed chunks, differentiated by plain JAX autodiff;
it is the oracle the custom VJP is tested against.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

ALPHA_MAX = 0.999
ALPHA_MIN = 1.0 / 255.0
T_MIN = 1e-4


def _alphas(dx, dy, a, b, c, opacities):
    """(alpha, 0 where skipped; used; raw = opacity exp(-sigma); exp(-sigma)) for offsets
    dx, dy = mean2d - pixel and conics (a, b, c), all broadcast to one block."""
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    # clamp before exp so that skipped entries (sigma < 0) cannot overflow in either pass
    vis = jnp.exp(-jnp.maximum(sigma, 0.0))
    raw = opacities * vis
    alpha = jnp.minimum(ALPHA_MAX, raw)
    used = (sigma >= 0.0) & (alpha >= ALPHA_MIN)
    return jnp.where(used, alpha, 0.0), used, raw, vis


def _exclusive_cumprod(x):  # [P, k] -> product of the entries before each one
    return jnp.cumprod(jnp.concatenate([jnp.ones_like(x[:, :1]), x[:, :-1]], 1), axis=1)


# ----------------------------------------------------------------------------------------------
# reference: fixed list, autodiff


def _chunk(carry, g, px, py):
    """Composites one chunk of k Gaussians over P pixels. carry: (T [P], acc [P, D], done [P])."""
    trans, acc, done = carry
    means2d, conics, opacities, colors = g  # [k, 2], [k, 3], [k], [k, D]
    dx = means2d[None, :, 0] - px[:, None]  # [P, k]
    dy = means2d[None, :, 1] - py[:, None]
    con = conics[None]
    alpha, used, _, _ = _alphas(dx, dy, con[..., 0], con[..., 1], con[..., 2], opacities[None])
    one_minus = 1.0 - alpha
    t_incl = trans[:, None] * jnp.cumprod(one_minus, axis=1)  # T after each Gaussian
    t_excl = trans[:, None] * _exclusive_cumprod(one_minus)
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
    """Reference compositor: (accumulated colour [P, D], final transmittance [P]), no background.

    With `count`, chunks past the list's end, or after every pixel has ended, are skipped by
    `lax.cond` (a saving only where the cond stays a branch; under `vmap` both sides run).
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


# ----------------------------------------------------------------------------------------------
# renderer: per-tile variable-length lists, custom VJP


class TileLayout(NamedTuple):
    """Static description of the tiled compositing problem (hashable: a nondiff argument)."""

    tiles_x: int
    n_tiles: int
    tile_size: int
    chunk: int  # list entries composited per while-loop step
    tile_batch: int  # tiles sharing one while loop


def feature_width(n_colors: int) -> int:
    """Columns of the per-slot feature rows: mean2d (2), conic (3), opacity (1), colours."""
    return 6 + n_colors


def _split(g, valid):  # [k, F] feature rows -> mean2d, conic, opacity (0 where invalid), colour
    return g[:, :2], g[:, 2:5], jnp.where(valid, g[:, 5], 0.0), g[:, 6:]


def _tile_pixels(tiles, lay: TileLayout):
    """Pixel centres px, py [B, P] of tiles [B] (row-major inside a tile)."""
    ts = lay.tile_size
    ly, lx = jnp.meshgrid(jnp.arange(ts), jnp.arange(ts), indexing="ij")
    ox, oy = (tiles % lay.tiles_x) * ts, (tiles // lay.tiles_x) * ts
    px = ox[:, None] + lx.reshape(1, -1) + 0.5
    py = oy[:, None] + ly.reshape(1, -1) + 0.5
    return px.astype(jnp.float32), py.astype(jnp.float32)


def _window(feats, start, i, chunk):
    """[B, chunk, F] rows `start + i*chunk ...` of feats (padded by `chunk`, so in range)."""
    return jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(feats, s + i * chunk, chunk))(start)


def _block(g, valid, px, py):
    """[k, P] blocks (Gaussians major, so that the sequential recurrences below run over rows)
    for feature rows g [k, F]: (alpha, used, raw, vis, dx, dy, colours [k, D])."""
    m, con, o, col = _split(g, valid)
    dx = m[:, 0, None] - px[None, :]
    dy = m[:, 1, None] - py[None, :]
    alpha, used, raw, vis = _alphas(dx, dy, con[:, 0, None], con[:, 1, None], con[:, 2, None],
                                    o[:, None])  # fmt: skip
    return alpha, used, raw, vis, dx, dy, con, col


def _fwd_chunk(trans, acc, done, end, g, valid, base, px, py):
    """One tile, one chunk: carries T [P], acc [P, D], done [P], end [P] (list position after
    the last composited Gaussian); g [k, F] feature rows, valid [k], base = chunk's position.

    The transmittance recurrence is a `lax.scan` over the chunk's Gaussians on [P] rows: on CPU
    that is ~10x cheaper than `cumprod` along a [P, k] block (XLA lowers it to reduce_window),
    and it is gsplat's per-Gaussian loop verbatim."""
    alpha, used, _, _, _, _, _, col = _block(g, valid, px, py)

    def step(c, x):
        t, dn = c
        a, u = x  # [P] each
        t_next = t * (1.0 - a)
        below = u & (t_next <= T_MIN)
        keep = u & ~below & ~dn
        return (jnp.where(keep, t_next, t), dn | below), (jnp.where(keep, a * t, 0.0), keep)

    (trans, done), (w, keep) = jax.lax.scan(step, (trans, done), (alpha, used))
    pos = base + jnp.arange(1, g.shape[0] + 1, dtype=end.dtype)
    end = jnp.maximum(end, jnp.max(jnp.where(keep, pos[:, None], 0), axis=0))
    return trans, acc + w.T @ col, done, end


def _bwd_chunk(trans, bacc, end, v_acc, g, valid, base, px, py):
    """Backward of one chunk: trans [P] is T after the chunk, bacc [P] is B (module doc) after
    it. Returns (T before the chunk, B before it, feature-row gradients [k, F]). A reverse scan
    over the chunk's Gaussians recovers each one's T as gsplat does (T / (1 - alpha))."""
    alpha, used, raw, vis, dx, dy, con, col = _block(g, valid, px, py)
    pos = base + jnp.arange(g.shape[0], dtype=end.dtype)
    keep = used & (pos[:, None] < end[None, :])  # exactly the forward's composited set
    alpha = jnp.where(keep, alpha, 0.0)
    cv = col @ v_acc.T  # [k, P] c_k . v_C

    def step(c, x):
        t, bk = c
        a, cvk = x
        one_minus = 1.0 - a
        t_excl = t / one_minus
        w = a * t_excl
        v_alpha = t_excl * cvk - bk / one_minus
        return (t_excl, bk + w * cvk), (w, v_alpha)

    (trans, bacc), (w, v_alpha) = jax.lax.scan(step, (trans, bacc), (alpha, cv), reverse=True)
    v_alpha = jnp.where(keep & (raw <= ALPHA_MAX), v_alpha, 0.0)  # clamped: no gradient
    v_sigma = -raw * v_alpha  # [k, P]
    # conics are per Gaussian: reduce the pixel moments of v_sigma once, then combine per row
    sdx, sdy = v_sigma * dx, v_sigma * dy
    m = jnp.stack([sdx, sdy, sdx * dx, sdx * dy, sdy * dy, v_alpha * vis], 1).sum(-1)  # [k, 6]
    a, b, c = con[:, 0], con[:, 1], con[:, 2]
    grads = jnp.stack(
        [
            a * m[:, 0] + b * m[:, 1],  # d sigma / d mean_x = a dx + b dy
            c * m[:, 1] + b * m[:, 0],  # d sigma / d mean_y = c dy + b dx
            0.5 * m[:, 2],  # d sigma / d (a, b, c) = (dx^2 / 2, dx dy, dy^2 / 2)
            m[:, 3],
            0.5 * m[:, 4],
            jnp.where(valid, m[:, 5], 0.0),  # d alpha / d opacity = exp(-sigma)
        ],
        axis=1,
    )
    return trans, bacc, jnp.concatenate([grads, w @ v_acc], axis=1)


def _batched(lay: TileLayout, start, count):
    """Tile ids, starts and counts as [n_batches, tile_batch] (padding tiles: id n_tiles,
    count 0). With tile_batch > 1 the tiles are sorted by list length, longest first, so each
    batch (a bucket of similar lengths) runs to its own longest list, not the image's."""
    b = lay.tile_batch
    pad = (-lay.n_tiles) % b
    tiles = jnp.arange(lay.n_tiles, dtype=jnp.int32)
    if b > 1:
        tiles = jnp.argsort(-count, stable=True).astype(jnp.int32)
    tiles = jnp.pad(tiles, (0, pad), constant_values=lay.n_tiles)
    start, count = (jnp.pad(x[tiles[: lay.n_tiles]], (0, pad)) for x in (start, count))
    return tuple(x.reshape(-1, b) for x in (tiles, start, count))


def _unbatch(x, tiles, lay: TileLayout):  # [n_batches, B, ...] -> [n_tiles, ...] in tile order
    x = x.reshape((-1,) + x.shape[2:])
    return (
        jnp.zeros((lay.n_tiles,) + x.shape[1:], x.dtype).at[tiles.reshape(-1)].set(x, mode="drop")
    )


def _rebatch(x, tiles, lay: TileLayout):  # [n_tiles, ...] -> [n_batches, B, ...] (pad: zeros)
    pad = tiles.reshape(-1) >= lay.n_tiles
    g = x[jnp.minimum(tiles.reshape(-1), lay.n_tiles - 1)]
    g = jnp.where(pad.reshape((-1,) + (1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), g)
    return g.reshape(tiles.shape + x.shape[1:])


def _forward(feats, start, count, lay: TileLayout):
    d = feats.shape[1] - 6
    k = lay.chunk
    p = lay.tile_size**2
    vchunk = jax.vmap(_fwd_chunk, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0))

    def one_batch(x):
        tiles, s, n = x
        px, py = _tile_pixels(tiles, lay)
        b = tiles.shape[0]

        def cond(c):
            i, _, _, done, _ = c
            return jnp.any((i * k < n) & ~jnp.all(done, axis=1))

        def body(c):
            i, trans, acc, done, end = c
            valid = i * k + jnp.arange(k)[None, :] < n[:, None]  # [B, k]
            g = _window(feats, s, i, k)
            return (i + 1, *vchunk(trans, acc, done, end, g, valid, i * k, px, py))

        init = (
            jnp.zeros((), jnp.int32),
            jnp.ones((b, p), feats.dtype),
            jnp.zeros((b, p, d), feats.dtype),
            jnp.zeros((b, p), bool),
            jnp.zeros((b, p), jnp.int32),
        )
        _, trans, acc, _, end = jax.lax.while_loop(cond, body, init)
        return acc, trans, end

    batches = _batched(lay, start, count)
    acc, trans, end = jax.lax.map(one_batch, batches)
    return tuple(_unbatch(x, batches[0], lay) for x in (acc, trans, end))


def _backward(feats, start, count, trans, end, v_acc, v_trans, lay: TileLayout):
    k = lay.chunk
    vchunk = jax.vmap(_bwd_chunk, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0))
    n_slots = feats.shape[0]

    def one_batch(buf, x):
        tiles, s, n, t_fin, e, va, vt = x
        px, py = _tile_pixels(tiles, lay)
        last = (jnp.max(e) + k - 1) // k - 1  # last chunk holding a composited Gaussian

        def body(c):
            i, t, bacc, buf = c
            j = i * k + jnp.arange(k)[None, :]
            valid = j < n[:, None]
            g = _window(feats, s, i, k)
            t, bacc, grads = vchunk(t, bacc, e, va, g, valid, i * k, px, py)
            slots = jnp.where(valid, s[:, None] + j, n_slots)  # out of range -> dropped
            buf = buf.at[slots.reshape(-1)].add(grads.reshape(-1, grads.shape[-1]), mode="drop")
            return i - 1, t, bacc, buf

        init = (last, t_fin, vt * t_fin, buf)
        buf = jax.lax.while_loop(lambda c: c[0] >= 0, body, init)[3]
        return buf, None

    tiles, s, n = _batched(lay, start, count)
    xs = (tiles, s, n) + tuple(_rebatch(x, tiles, lay) for x in (trans, end, v_acc, v_trans))
    buf, _ = jax.lax.scan(one_batch, jnp.zeros_like(feats), xs)
    return buf


def tile_vjp(forward, backward, doc: str):
    """The compositing stage as a `jax.custom_vjp` of (rows, start, count, layout) -> (acc, trans),
    from `forward(rows, start, count, lay) -> (acc, trans, end)` and `backward(rows, start, count,
    trans, end, v_acc, v_trans, lay) -> row gradients`: the saved state is gsplat's (final T and
    the list position after the last composited Gaussian). Shared by this XLA path and the
    Pallas kernels (`kernels.composite_chunks`)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def composite_fn(rows, start, count, lay):
        acc, trans, _ = forward(rows, start, count, lay)
        return acc, trans

    def fwd(rows, start, count, lay):
        acc, trans, end = forward(rows, start, count, lay)
        return (acc, trans), (rows, start, count, trans, end)

    def bwd(lay, res, cts):
        return backward(*res, *cts, lay), None, None

    composite_fn.defvjp(fwd, bwd)
    composite_fn.__doc__ = doc
    return composite_fn


# feats [S, 6 + D] per-slot rows (mean2d, conic, opacity, colour), padded by chunk; start [T]
# int32 first slot of each tile's list; count [T] int32 list lengths
composite_tiles = tile_vjp(
    _forward,
    _backward,
    """(accumulated colour [T, P, D], final transmittance [T, P]), no background; P =
    tile_size^2 pixels per tile, row-major, of per-slot rows feats [S, 6 + D] (padded by chunk),
    tile starts [T] and counts [T]. Differentiable w.r.t. `feats` (custom VJP).""",
)
