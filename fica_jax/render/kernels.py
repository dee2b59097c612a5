"""Pallas compositing kernels: stage 3 of the rasteriser on TPU (Mosaic) and GPU (Triton).

The same rules and the same custom VJP as `composite.composite_tiles` (module doc there; gsplat's
`rasterize_to_pixels` forward and backward), laid out the way gsplat's CUDA kernels are:
- one grid program per tile of `tile_size`^2 pixels (independent: "parallel" on a TPU's cores);
- each tile walks its own list in chunks of `chunk` entries and stops at the end of its list or
  when every pixel has ended; the backward walks the same chunks back to front from the last
  one holding a composited Gaussian, recovering T, with the same saved state as the XLA path
  (final T and, per pixel, the list position after the last composited Gaussian);
- every chunk belongs to exactly one tile, so the per-entry gradients are written without
  atomics, and the caller's gather turns them into per-Gaussian gradients by autodiff.

Chunk layout. The lists are regrouped (`chunk_layout`, plain XLA) so that every tile's list
starts on a chunk boundary: feature rows as `[n_chunks, F_PAD, chunk]` (features on sublanes,
list entries on lanes), so one chunk is one aligned block (a TPU DMA of `[16, 128]`, a Triton
load of contiguous rows). Inside a chunk the work is one `[pixels, chunk]` block (pixels on
sublanes, Gaussians on lanes); the transmittance recurrence along the chunk is an inclusive
prefix product: on TPU a log-step scan by lane rotation (`pltpu.roll`), on GPU
`exp(cumsum(log(1 - alpha)))` (Triton has a cumsum, no cumprod). Products are therefore
associated differently from the XLA path's sequential loop (~1e-7 relative).

Interpret mode (`interpret=True`, any host) runs either kernel with JAX's Pallas interpreter;
the tests compare both with the XLA path (`tests/render/test_render_kernels.py`). The TPU kernel
compiles deviceless through libtpu inside the UPM train step (`tests/plan/test_render_cost.py`);
the Triton kernel lowers to Triton IR on any host and compiles on a GPU. Not done: the TPU
chunk DMA is synchronous (no double buffering).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from fica_jax.render.composite import ALPHA_MAX, T_MIN, _alphas, tile_vjp

F_PAD = 16  # sublanes per chunk block: mean2d 2, conic 3, opacity 1, colours (<= 10)
CHUNKS = {"tpu": 128, "gpu": 64}  # list entries per chunk: a TPU lane row; a Triton block


class KernelLayout(NamedTuple):
    """Static description of a kernel call (hashable: a nondiff argument)."""

    tiles_x: int
    n_tiles: int
    tile_size: int
    chunk: int
    n_colors: int
    target: str  # "tpu" | "gpu": which kernel (and scan) is built
    interpret: bool  # run under the Pallas interpreter (any host)


def supported(tile_size: int, n_colors: int, target: str, chunk: int, interpret: bool):
    """Why the kernel cannot take this problem (a phrase), or None."""
    p = tile_size * tile_size
    if 6 + n_colors > F_PAD:
        return f"{n_colors} colour channels (at most {F_PAD - 6})"
    if interpret:
        return None
    if target == "tpu" and chunk % 128:
        return f"chunk {chunk} on TPU (list entries run along the 128 lanes: a multiple of 128)"
    if target == "gpu" and chunk & (chunk - 1):
        return f"chunk {chunk} on GPU (Triton blocks: a power of two)"
    if target == "gpu" and p & (p - 1):
        return f"tile_size {tile_size} (Triton blocks need tile_size^2 a power of two)"
    if target == "tpu" and p % 8:
        return f"tile_size {tile_size} (TPU blocks need tile_size^2 a multiple of 8)"
    return None


# ----------------------------------------------------------------------------------------------
# chunk layout (XLA, outside the kernel)


def chunk_layout(start, count, n_slots: int, chunk: int):
    """Regroups tile lists so that each starts on a chunk boundary.

    Returns (cstart [T] first chunk of each tile, src [C * chunk] slot of each chunk entry,
    valid [C * chunk]); C = ceil(n_slots / chunk) + T bounds the chunks any binning needs."""
    n_tiles = start.shape[0]
    n_chunks = -(-n_slots // chunk) + n_tiles
    per_tile = (count + chunk - 1) // chunk
    cstart = (jnp.cumsum(per_tile) - per_tile).astype(jnp.int32)
    q = jnp.arange(n_chunks * chunk, dtype=jnp.int32)
    c = q // chunk
    tile = jnp.clip(jnp.searchsorted(cstart, c, side="right") - 1, 0, n_tiles - 1)
    local = (c - cstart[tile]) * chunk + q % chunk
    valid = (local >= 0) & (local < count[tile])
    src = jnp.where(valid, start[tile] + local, 0)
    return cstart, src, valid


def to_chunks(rows, src, valid, chunk: int):
    """[C, F_PAD, chunk] blocks of per-slot feature rows [S, F] (zero where not valid)."""
    g = jnp.where(valid[:, None], rows[src], 0.0)
    g = jnp.pad(g, ((0, 0), (0, F_PAD - g.shape[1])))
    return g.reshape(-1, chunk, F_PAD).transpose(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# the shared body: one tile, one [pixels, chunk] block at a time


def _prefix_sum_tpu(x):  # inclusive, along lanes: log-step scan by lane rotation
    from jax.experimental.pallas import tpu as pltpu

    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    s = 1
    while s < x.shape[1]:
        x = x + jnp.where(lane >= s, pltpu.roll(x, s, 1), 0.0)
        s *= 2
    return x


def _prefix_prod(x, target):
    """(inclusive, exclusive) products along lanes of x [P, k] (x = 1 - alpha >= 0.001)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        incl, s = x, 1
        while s < x.shape[1]:
            incl = incl * jnp.where(lane >= s, pltpu.roll(incl, s, 1), 1.0)
            s *= 2
        return incl, jnp.where(lane == 0, 1.0, pltpu.roll(incl, 1, 1))
    logs = jnp.log(x)
    cs = jnp.cumsum(logs, axis=1)
    return jnp.exp(cs), jnp.exp(cs - logs)


def _prefix_sum(x, target):
    return _prefix_sum_tpu(x) if target == "tpu" else jnp.cumsum(x, axis=1)


def _pixels(t, lay: KernelLayout):
    """Pixel centres px, py [P, chunk] of tile t (row-major inside the tile)."""
    ts, shape = lay.tile_size, (lay.tile_size**2, lay.chunk)
    p = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    div, rem = jax.lax.div, jax.lax.rem  # non-negative: no floor correction (Mosaic has no sign)
    px = rem(t, lay.tiles_x) * ts + rem(p, ts)
    py = div(t, lay.tiles_x) * ts + div(p, ts)
    return px.astype(jnp.float32) + 0.5, py.astype(jnp.float32) + 0.5


def _block(row, i, count, px, py, lay):
    """Chunk i's [P, chunk] block: (alpha, used, raw, vis, dx, dy, conic, colours, pos, valid)
    from `row(f)` -> [1, chunk] feature rows; pos is the list position inside the tile."""
    lane = jax.lax.broadcasted_iota(jnp.int32, px.shape, 1)
    pos = i * lay.chunk + lane
    valid = pos < count
    con = (row(2), row(3), row(4))
    dx, dy = row(0) - px, row(1) - py
    alpha, used, raw, vis = _alphas(dx, dy, *con, jnp.where(valid, row(5), 0.0))
    cols = [row(6 + d) for d in range(lay.n_colors)]
    return alpha, used, raw, vis, dx, dy, con, cols, pos, valid


def _any(x):  # scalar: does any element hold
    return jnp.max(jnp.where(x, 1, 0)) > 0


def _fwd_chunk(state, blk, lay: KernelLayout):
    """One forward chunk step: state (T, acc list of D, done, end), each [P, 1]."""
    trans, acc, done, end = state
    alpha, used, _, _, _, _, _, cols, pos, _ = blk
    incl, excl = _prefix_prod(1.0 - alpha, lay.target)
    below = used & (trans * incl <= T_MIN)
    bf = jnp.where(below, 1.0, 0.0)
    ended_before = _prefix_sum(bf, lay.target) - bf > 0
    keep = used & ~below & ~ended_before & (done == 0)
    w = jnp.where(keep, alpha * trans * excl, 0.0)
    acc = [a + jnp.sum(w * col, axis=1, keepdims=True) for a, col in zip(acc, cols, strict=True)]
    trans = trans * jnp.min(jnp.where(keep, incl, 1.0), axis=1, keepdims=True)
    end = jnp.maximum(end, jnp.max(jnp.where(keep, pos + 1, 0), axis=1, keepdims=True))
    done = jnp.maximum(done, jnp.max(jnp.where(below, 1, 0), axis=1, keepdims=True))
    return trans, acc, done, end


def _bwd_chunk(state, blk, i, count, v_acc, lay: KernelLayout):
    """One backward chunk step: state (T after the chunk, B after it) [P, 1], end [P, 1] ->
    (T before, B before, F_PAD gradient rows [1, chunk])."""
    trans, bacc, end = state
    k = lay.chunk
    alpha, used, raw, vis, dx, dy, con, cols, pos, _ = blk
    keep = used & (pos < end)  # exactly the forward's composited set
    a = jnp.where(keep, alpha, 0.0)
    one_minus = 1.0 - a
    incl, excl = _prefix_prod(one_minus, lay.target)
    t_before = trans / jnp.min(incl, axis=1, keepdims=True)
    w = a * t_before * excl
    cv = sum(col * v for col, v in zip(cols, v_acc, strict=True))  # c_k . v_C  [P, k]
    wcv = w * cv
    later = jnp.sum(wcv, axis=1, keepdims=True) - _prefix_sum(wcv, lay.target)
    v_alpha = t_before * excl * cv - (bacc + later) / one_minus
    v_alpha = jnp.where(keep & (raw <= ALPHA_MAX), v_alpha, 0.0)  # clamped: no gradient
    v_sigma = -raw * v_alpha
    sdx, sdy = v_sigma * dx, v_sigma * dy
    m = [jnp.sum(x, axis=0, keepdims=True) for x in (sdx, sdy, sdx * dx, sdx * dy, sdy * dy)]
    ca, cb, cc = con
    rows = [ca * m[0] + cb * m[1], cc * m[1] + cb * m[0], 0.5 * m[2], m[3], 0.5 * m[4]]
    v_op = jnp.sum(v_alpha * vis, axis=0, keepdims=True)
    first = jax.lax.broadcasted_iota(jnp.int32, (1, k), 1) + i * k < count  # valid[:1]
    rows.append(jnp.where(first, v_op, 0.0))
    rows += [jnp.sum(w * v, axis=0, keepdims=True) for v in v_acc]
    rows += [jnp.zeros((1, k), jnp.float32)] * (F_PAD - len(rows))
    return t_before, bacc + jnp.sum(wcv, axis=1, keepdims=True), rows


def _fwd_tile(t, cstart, count, row_at, lay: KernelLayout):
    """Composites tile t: (T [P, 1], acc list of D [P, 1], end [P, 1])."""
    px, py = _pixels(t, lay)
    p, k = px.shape
    n_chunks = jax.lax.div(count + k - 1, k)

    def cond(c):
        i, _, _, done, _ = c
        return (i < n_chunks) & _any(done == 0)

    def body(c):
        i, *state = c
        blk = _block(row_at(cstart + i), i, count, px, py, lay)
        return i + 1, *_fwd_chunk(state, blk, lay)

    col = lambda v, dt: jnp.full((p, 1), v, dt)
    init = (jnp.int32(0), col(1.0, jnp.float32), [col(0.0, jnp.float32)] * lay.n_colors,
            col(0, jnp.int32), col(0, jnp.int32))  # fmt: skip
    _, trans, acc, _, end = jax.lax.while_loop(cond, body, init)
    return trans, acc, end


def _bwd_tile(t, cstart, count, trans, end, v_acc, v_trans, row_at, put, lay: KernelLayout):
    """Backward of tile t, chunks back to front; put(chunk id, list of F_PAD [1, k] rows)."""
    px, py = _pixels(t, lay)
    last = jax.lax.div(jnp.max(end) + lay.chunk - 1, lay.chunk) - 1

    def body(c):
        i, trans, bacc = c
        blk = _block(row_at(cstart + i), i, count, px, py, lay)
        trans, bacc, rows = _bwd_chunk((trans, bacc, end), blk, i, count, v_acc, lay)
        put(cstart + i, rows)
        return i - 1, trans, bacc

    jax.lax.while_loop(lambda c: c[0] >= 0, body, (last, trans, v_trans * trans))


def chunk_step(direction: str, n_colors: int, tile_size: int, chunk: int, target: str = "tpu"):
    """(fn, abstract args) of one forward or backward chunk step of the kernel body, for
    counting its operations (`fica_jax.plan.render_cost`)."""
    lay = KernelLayout(1, 1, tile_size, chunk, n_colors, target, False)
    col = jax.ShapeDtypeStruct((tile_size**2, 1), jnp.float32)
    icol = jax.ShapeDtypeStruct((tile_size**2, 1), jnp.int32)
    rows = jax.ShapeDtypeStruct((F_PAD, chunk), jnp.float32)

    def block(r):
        return _block(lambda f: r[f : f + 1], 0, chunk, *_pixels(0, lay), lay)

    if direction == "forward":
        return (lambda r, t, a, d, e: _fwd_chunk((t, a, d, e), block(r), lay)), (
            rows, col, [col] * n_colors, icol, icol)  # fmt: skip
    return (lambda r, t, b, e, va: _bwd_chunk((t, b, e), block(r), 0, chunk, va, lay)), (
        rows, col, col, icol, [col] * n_colors)  # fmt: skip


# ----------------------------------------------------------------------------------------------
# TPU (Mosaic): tile starts and counts as scalar-prefetch operands, chunks DMA'd from HBM


def _tpu_params():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu, pltpu.CompilerParams(dimension_semantics=("parallel",))


def _tpu_forward(chunks, cstart, count, lay: KernelLayout):
    pltpu, params = _tpu_params()
    p, d = lay.tile_size**2, lay.n_colors

    def kernel(cs_ref, n_ref, chunks_hbm, acc_ref, trans_ref, end_ref, buf):
        t = pl.program_id(0)

        def row_at(c):
            pltpu.sync_copy(chunks_hbm.at[c], buf)
            return lambda f: buf[f : f + 1, :]

        trans, acc, end = _fwd_tile(t, cs_ref[t], n_ref[t], row_at, lay)
        for j, a in enumerate(acc):
            acc_ref[0, :, j : j + 1] = a
        trans_ref[0] = trans
        end_ref[0] = end

    blk = lambda w: pl.BlockSpec((1, p, w), lambda t, *_: (t, 0, 0))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(lay.n_tiles,),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=[blk(d), blk(1), blk(1)],
        scratch_shapes=[pltpu.VMEM((F_PAD, lay.chunk), jnp.float32)],
    )
    shapes = [jax.ShapeDtypeStruct((lay.n_tiles, p, w), dt)
              for w, dt in ((d, jnp.float32), (1, jnp.float32), (1, jnp.int32))]  # fmt: skip
    acc, trans, end = pl.pallas_call(
        kernel, grid_spec=spec, out_shape=shapes, compiler_params=params,
        interpret=lay.interpret, name="fica_composite_fwd",
    )(cstart, count, chunks)  # fmt: skip
    return acc, trans[..., 0], end[..., 0]


def _tpu_backward(chunks, cstart, count, trans, end, v_acc, v_trans, lay: KernelLayout):
    pltpu, params = _tpu_params()
    p, d = lay.tile_size**2, lay.n_colors

    def kernel(cs_ref, n_ref, chunks_hbm, tr_ref, end_ref, va_ref, vt_ref, _, out_hbm, buf, gbuf):
        t = pl.program_id(0)

        def row_at(c):
            pltpu.sync_copy(chunks_hbm.at[c], buf)
            return lambda f: buf[f : f + 1, :]

        def put(c, rows):
            for f, r in enumerate(rows):
                gbuf[f : f + 1, :] = r
            pltpu.sync_copy(gbuf, out_hbm.at[c])

        v_acc = [va_ref[0, :, j : j + 1] for j in range(d)]
        _bwd_tile(t, cs_ref[t], n_ref[t], tr_ref[0], end_ref[0], v_acc, vt_ref[0], row_at, put,
                  lay)  # fmt: skip

    blk = lambda w: pl.BlockSpec((1, p, w), lambda t, *_: (t, 0, 0))
    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(lay.n_tiles,),
        in_specs=[anyspec, blk(1), blk(1), blk(d), blk(1), anyspec],
        out_specs=anyspec,
        scratch_shapes=[pltpu.VMEM((F_PAD, lay.chunk), jnp.float32)] * 2,
    )
    return pl.pallas_call(
        kernel, grid_spec=spec, out_shape=jax.ShapeDtypeStruct(chunks.shape, jnp.float32),
        input_output_aliases={7: 0}, compiler_params=params, interpret=lay.interpret,
        name="fica_composite_bwd",
    )(cstart, count, chunks, trans[..., None], end[..., None], v_acc, v_trans[..., None],
      jnp.zeros_like(chunks))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# GPU (Triton): every operand a pointer; chunk rows are contiguous loads


def _gpu_call(kernel, out_shape, args, lay, aliases=None, name=""):
    from jax.experimental.pallas import triton as plgpu

    anyspec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        kernel, grid=(lay.n_tiles,), in_specs=[anyspec] * len(args),
        out_specs=jax.tree.map(lambda _: anyspec, out_shape), out_shape=out_shape,
        input_output_aliases=aliases or {}, interpret=lay.interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
    )(*args)  # fmt: skip


def _gpu_forward(chunks, cstart, count, lay: KernelLayout):
    p, d = lay.tile_size**2, lay.n_colors

    def kernel(cs_ref, n_ref, chunks_ref, acc_ref, trans_ref, end_ref):
        t = pl.program_id(0)
        row_at = lambda c: lambda f: chunks_ref[c, f, :][None, :]
        trans, acc, end = _fwd_tile(t, cs_ref[t], n_ref[t], row_at, lay)
        flat = lambda x: x.reshape(p)  # Triton lowers no slices
        for j, a in enumerate(acc):
            acc_ref[t, j, :] = flat(a)
        trans_ref[t, :] = flat(trans)
        end_ref[t, :] = flat(end)

    shapes = [jax.ShapeDtypeStruct(s, dt) for s, dt in
              (((lay.n_tiles, d, p), jnp.float32), ((lay.n_tiles, p), jnp.float32),
               ((lay.n_tiles, p), jnp.int32))]  # fmt: skip
    acc, trans, end = _gpu_call(
        kernel, shapes, (cstart, count, chunks), lay, name="fica_composite_fwd"
    )
    return acc.transpose(0, 2, 1), trans, end


def _gpu_backward(chunks, cstart, count, trans, end, v_acc, v_trans, lay: KernelLayout):
    d = lay.n_colors

    def kernel(cs_ref, n_ref, chunks_ref, tr_ref, end_ref, va_ref, vt_ref, _, out_ref):
        t = pl.program_id(0)
        row_at = lambda c: lambda f: chunks_ref[c, f, :][None, :]

        def put(c, rows):
            for f, r in enumerate(rows):
                out_ref[c, f, :] = r.reshape(r.shape[1])

        col = lambda ref: ref[t, :][:, None]
        v_acc = [va_ref[t, j, :][:, None] for j in range(d)]
        _bwd_tile(t, cs_ref[t], n_ref[t], col(tr_ref), col(end_ref), v_acc, col(vt_ref), row_at,
                  put, lay)  # fmt: skip

    args = (cstart, count, chunks, trans, end, v_acc.transpose(0, 2, 1), v_trans,
            jnp.zeros_like(chunks))  # fmt: skip
    out = jax.ShapeDtypeStruct(chunks.shape, jnp.float32)
    return _gpu_call(kernel, out, args, lay, aliases={7: 0}, name="fica_composite_bwd")


# ----------------------------------------------------------------------------------------------
# the custom VJP over the chunk layout


def _forward(chunks, cstart, count, lay):
    f = _tpu_forward if lay.target == "tpu" else _gpu_forward
    return f(chunks, cstart, count, lay)


def _backward(chunks, cstart, count, trans, end, v_acc, v_trans, lay):
    f = _tpu_backward if lay.target == "tpu" else _gpu_backward
    return f(chunks, cstart, count, trans, end, v_acc, v_trans, lay)


composite_chunks = tile_vjp(
    _forward,
    _backward,
    """(accumulated colour [T, P, D], final transmittance [T, P]) of chunk blocks
    [C, F_PAD, chunk] (`to_chunks`), chunk starts [T] and list counts [T], no background;
    differentiable w.r.t. the blocks (custom VJP).""",
)
