"""gsplat-compatible entry point: project -> bin into tiles -> composite (docs/architecture.md §7).

`rasterization(...)` mirrors `gsplat.rasterization`'s signature and outputs for the pinhole,
non-packed, colour (not SH) case. Internally the options travel as one frozen `RasterOptions`
(hashable, so it can be a static argument) and cameras are `jax.vmap`ped, so the whole function
also runs under an outer `jax.vmap` (batches of avatars) and under `jit` with sharded inputs.

Differentiability: values are computed by plain jnp ops, and gradients w.r.t. means, quats,
scales, opacities, colours and backgrounds come from JAX autodiff. Binning (integer tile lists)
carries no gradient, exactly as in gsplat. Backward memory is bounded twice over: tiles are
processed `tile_batch` at a time under `lax.map` with a `jax.checkpoint`ed body, and inside a
tile the Gaussian list is walked in checkpointed chunks of `chunk` (`composite.py`), so only
per-tile inputs and per-chunk carries are stored and the [pixels, chunk] alpha blocks are
recomputed. Chunks past a tile's list, or after all its pixels have ended, are skipped by
`lax.cond` (cameras and tiles run under `lax.map` so that the conds stay branches; under a
user's outer `vmap` they become selects: same values, no skipping).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from fica_jax.errors import UserError
from fica_jax.render.composite import composite
from fica_jax.render.dense import render_dense
from fica_jax.render.project import Projected, covariance, project
from fica_jax.render.tiles import BinStats, bin_gaussians, tile_grid

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")


@dataclasses.dataclass(frozen=True)
class RasterOptions:
    width: int
    height: int
    near_plane: float = 0.01
    far_plane: float = 1e10
    eps2d: float = 0.3
    render_mode: str = "RGB"
    rasterize_mode: str = "classic"
    tile_size: int = 16
    tile_capacity: int = 256  # Gaussians kept per tile (nearest first); see meta overflow
    isect_capacity: int | None = None  # Gaussian-tile pairs; default tiles.default_isect_capacity
    tile_batch: int = 1  # tiles composited together (1: sequential, chunks skipped when empty)
    chunk: int = 64  # Gaussians composited per step inside a tile
    dense: bool = False  # reference path: all pixels x all Gaussians

    def __post_init__(self):
        if self.render_mode not in RENDER_MODES:
            raise UserError(f"render_mode {self.render_mode!r} unknown; expected {RENDER_MODES}")
        if self.rasterize_mode not in RASTERIZE_MODES:
            raise UserError(
                f"rasterize_mode {self.rasterize_mode!r} unknown; expected {RASTERIZE_MODES}"
            )
        if self.tile_capacity < 1 or self.tile_size < 1:
            raise UserError(
                f"tile_size {self.tile_size} and tile_capacity {self.tile_capacity} must be >= 1"
            )


def _render_tiled(proj: Projected, opacities, colors, opts: RasterOptions):
    """One camera: (colour [H, W, D], transmittance [H, W], BinStats)."""
    ts = opts.tile_size
    ids, valid, stats = bin_gaussians(
        proj.means2d,
        proj.radii,
        proj.depths,
        opacities,
        opts.width,
        opts.height,
        tile_size=ts,
        tile_capacity=opts.tile_capacity,
        isect_capacity=opts.isect_capacity,
    )
    tw, th = tile_grid(opts.width, opts.height, ts)
    t = jnp.arange(tw * th)
    ox, oy = (t % tw) * ts, (t // tw) * ts  # [T] tile origins
    ly, lx = jnp.meshgrid(jnp.arange(ts), jnp.arange(ts), indexing="ij")
    lx, ly = lx.reshape(-1) + 0.5, ly.reshape(-1) + 0.5  # [ts*ts] pixel centres in a tile
    per_tile = (
        ox,
        oy,
        proj.means2d[ids],  # [T, K, 2]
        proj.conics[ids],  # [T, K, 3]
        jnp.where(valid, opacities[ids], 0.0),  # [T, K]
        colors[ids],  # [T, K, D]
    )

    count = valid.sum(-1)  # [T]

    def one_tile(x):
        x0, y0, m, c, o, col, n = x
        return composite(lx + x0, ly + y0, m, c, o, col, chunk=opts.chunk, count=n)

    # tile_batch 1 keeps the per-chunk lax.cond a real branch (skips empty chunks and ended
    # tiles); larger batches vmap tiles together (more parallel work, no skipping)
    batch = {} if opts.tile_batch == 1 else {"batch_size": opts.tile_batch}
    acc, trans = jax.lax.map(jax.checkpoint(one_tile), per_tile + (count,), **batch)
    d = colors.shape[-1]
    acc = acc.reshape(th, tw, ts, ts, d).transpose(0, 2, 1, 3, 4).reshape(th * ts, tw * ts, d)
    trans = trans.reshape(th, tw, ts, ts).transpose(0, 2, 1, 3).reshape(th * ts, tw * ts)
    return acc[: opts.height, : opts.width], trans[: opts.height, : opts.width], stats


def _render_camera(means, covars, opacities, colors, viewmat, K, background, opts):
    proj = project(
        means,
        covars,
        viewmat,
        K,
        opts.width,
        opts.height,
        near_plane=opts.near_plane,
        far_plane=opts.far_plane,
        eps2d=opts.eps2d,
    )
    if opts.rasterize_mode == "antialiased":
        opacities = opacities * proj.compensations
    if "D" in opts.render_mode:
        depth = proj.depths[:, None].astype(colors.dtype)
        colors = jnp.concatenate([colors, depth], -1) if "RGB" in opts.render_mode else depth
    if opts.dense:
        acc, trans = render_dense(proj, opacities, colors, opts.width, opts.height)
        zero = jnp.zeros((), jnp.int32)
        stats = BinStats(zero, zero, zero, zero, zero)
    else:
        acc, trans, stats = _render_tiled(proj, opacities, colors, opts)
    alpha = 1.0 - trans
    if opts.render_mode.endswith("ED"):  # expected depth: normalise by coverage (as gsplat)
        acc = acc.at[..., -1].divide(jnp.maximum(alpha, 1e-10))
    if background is not None:
        acc = acc + trans[..., None] * background
    return acc, alpha[..., None], proj, opacities, stats


def render(
    means: jax.Array,  # [N, 3]
    covars: jax.Array,  # [N, 3, 3]
    opacities: jax.Array,  # [N]
    colors: jax.Array,  # [N, D]
    viewmats: jax.Array,  # [C, 4, 4]
    Ks: jax.Array,  # [C, 3, 3]
    opts: RasterOptions,
    backgrounds: jax.Array | None = None,  # [C, D]
) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """Core renderer on covariances; see `rasterization` for the outputs."""
    means, covars, opacities, colors, viewmats, Ks = map(
        jnp.asarray, (means, covars, opacities, colors, viewmats, Ks)
    )
    if backgrounds is not None:
        backgrounds = jnp.asarray(backgrounds)
    if colors.ndim != 2:
        raise UserError(
            f"colors must be [N, D] (spherical harmonics are not supported); got {colors.shape}"
        )
    if backgrounds is not None and "D" in opts.render_mode:
        # the depth channel's background is 0; depth-only modes have no colour background
        zeros = jnp.zeros(backgrounds.shape[:-1] + (1,), backgrounds.dtype)
        rgb = "RGB" in opts.render_mode
        backgrounds = jnp.concatenate([backgrounds, zeros], -1) if rgb else zeros

    img, alpha, meta = _render_jit(
        means, covars, opacities, colors, viewmats, Ks, backgrounds, opts
    )
    meta |= {"width": opts.width, "height": opts.height, "tile_size": opts.tile_size}
    return img, alpha, meta


@jax.jit(static_argnames=("opts",))
def _render_jit(means, covars, opacities, colors, viewmats, Ks, backgrounds, opts):
    # jitted once per (shapes, options): eager calls would dispatch every op separately
    def one(viewmat, K, bg):
        return _render_camera(means, covars, opacities, colors, viewmat, K, bg, opts)

    # cameras in sequence (lax.map, not vmap) so that the compositor's conds stay branches
    if backgrounds is None:
        img, alpha, proj, opac, stats = jax.lax.map(lambda x: one(*x, None), (viewmats, Ks))
    else:
        img, alpha, proj, opac, stats = jax.lax.map(lambda x: one(*x), (viewmats, Ks, backgrounds))
    meta = {
        "means2d": proj.means2d,  # [C, N, 2]
        "conics": proj.conics,  # [C, N, 3]
        "depths": proj.depths,  # [C, N]
        "radii": proj.radii,  # [C, N, 2]
        "opacities": opac,  # [C, N] after antialiasing compensation
        "compensations": proj.compensations,  # [C, N]
        **{name: value for name, value in stats._asdict().items()},  # each [C]
    }
    return img, alpha, meta


_covariance_jit = jax.jit(covariance)


def rasterization(
    means: jax.Array,  # [N, 3]
    quats: jax.Array,  # [N, 4] (w, x, y, z), need not be normalised
    scales: jax.Array,  # [N, 3] activated (not log)
    opacities: jax.Array,  # [N] in [0, 1]
    colors: jax.Array,  # [N, D]
    viewmats: jax.Array,  # [C, 4, 4] world -> camera, OpenCV
    Ks: jax.Array,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    backgrounds: jax.Array | None = None,  # [C, D]
    render_mode: str = "RGB",
    rasterize_mode: str = "classic",
    tile_size: int = 16,
    tile_capacity: int = 256,
    isect_capacity: int | None = None,
    tile_batch: int = 1,
    chunk: int = 64,
    dense: bool = False,
    covars: jax.Array | None = None,  # [N, 3, 3]; replaces quats/scales when given
) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """gsplat-style rasterisation -> (colors [C, H, W, D'], alphas [C, H, W, 1], meta).

    D' = D for "RGB", 1 for "D"/"ED" (accumulated / expected depth), D + 1 for "RGB+D"/"RGB+ED".
    `meta` holds means2d, conics, depths, radii, opacities, compensations (per camera) and the
    binning counters n_isects, isect_overflow, tile_overflow, tiles_overflowed, max_tile_count
    ([C] each). Non-zero overflow means Gaussians were dropped from some tiles (the farthest
    first): raise `tile_capacity` (to at least `max_tile_count`) or `isect_capacity`.
    """
    opts = RasterOptions(
        width=width,
        height=height,
        near_plane=near_plane,
        far_plane=far_plane,
        eps2d=eps2d,
        render_mode=render_mode,
        rasterize_mode=rasterize_mode,
        tile_size=tile_size,
        tile_capacity=tile_capacity,
        isect_capacity=isect_capacity,
        tile_batch=tile_batch,
        chunk=chunk,
        dense=dense,
    )
    if covars is None:
        covars = _covariance_jit(jnp.asarray(quats), jnp.asarray(scales))
    return render(means, covars, opacities, colors, viewmats, Ks, opts, backgrounds)
