"""gsplat-compatible entry point: project -> bin into tiles -> composite (docs/architecture.md §7).

`rasterization(...)` mirrors `gsplat.rasterization`'s signature and outputs for the pinhole,
non-packed, colour (not SH) case. Internally the options travel as one frozen `RasterOptions`
(hashable, so it can be a static argument) and cameras run under `lax.map`, so the whole function
also runs under an outer `jax.vmap` (batches of avatars) and under `jit` with sharded inputs.

Exactness: every tile composites its whole depth-sorted list (`composite.composite_tiles`), so
no Gaussian is dropped at any density. The only static size is `isect_capacity`, the number of
Gaussian-tile slots. Left at None, an eager call (concrete inputs, `jax.grad` included) counts
the intersections first (`tiles.count_isects`, one cheap jitted pass) and rounds up to a power
of two (`tiles.bucket_capacity`), so it always fits and recompiles stay rare. Under an outer
`jit`/`vmap` the inputs are abstract and `tiles.default_isect_capacity` (or the caller's value)
is used; if it is too small the missing intersections are counted in `meta["isect_overflow"]`
and a `RasterCapacityWarning` is issued: never a silently truncated frame.

Differentiability: the compositing stage has a custom VJP (gsplat's backward, see
`composite.py`); projection, antialiasing compensation, the depth channel and the background
are JAX autodiff around it. Binning (integer tile lists) carries no gradient, as in gsplat.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.errors import UserError
from fica_jax.render import kernels
from fica_jax.render.composite import TileLayout, composite_tiles
from fica_jax.render.dense import render_dense
from fica_jax.render.project import Projected, covariance, project
from fica_jax.render.tiles import (
    BinStats,
    bin_gaussians,
    bucket_capacity,
    count_isects,
    default_isect_capacity,
    tile_grid,
)

RENDER_MODES = ("RGB", "D", "ED", "RGB+D", "RGB+ED")
RASTERIZE_MODES = ("classic", "antialiased")
BACKENDS = ("auto", "xla", "pallas")
XLA_CHUNK = 64  # list entries per step of the XLA compositor
XLA_BUCKETS = 8  # list-length buckets of the parallel XLA path (accelerators)
_PLATFORM = contextvars.ContextVar("fica_render_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str):
    """Renders traced inside choose their path for `platform` ("tpu", "gpu", "cpu") instead of
    this process's backend: `fica plan --topology` compiles a TPU step on a CPU host."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


class RasterCapacityWarning(UserWarning):
    """`isect_capacity` was too small: some Gaussian-tile intersections are missing."""


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
    isect_capacity: int | None = None  # Gaussian-tile slots; None: counted (eager) or default
    backend: str = "auto"  # "auto" | "xla" | "pallas" (module doc; `resolve`)
    # XLA path: tiles sharing one while loop, longest lists first (1: each tile stops at its
    # own length, CPU's fastest; None: 1 on CPU, n_tiles / XLA_BUCKETS on accelerators)
    tile_batch: int | None = None
    chunk: int | None = None  # list entries per step (None: XLA_CHUNK, or the kernel's)
    dense: bool = False  # reference path: all pixels x all Gaussians
    platform: str | None = None  # None: `target_platform`'s, else this process's backend
    kernel: str | None = None  # "tpu" | "gpu": which Pallas kernel (None: the platform's;
    # on CPU the TPU one), interpreted when the platform is the CPU

    def __post_init__(self):
        if self.render_mode not in RENDER_MODES:
            raise UserError(f"render_mode {self.render_mode!r} unknown; expected {RENDER_MODES}")
        if self.rasterize_mode not in RASTERIZE_MODES:
            raise UserError(
                f"rasterize_mode {self.rasterize_mode!r} unknown; expected {RASTERIZE_MODES}"
            )
        if self.backend not in BACKENDS:
            raise UserError(f"backend {self.backend!r} unknown; expected one of {BACKENDS}")
        for name in ("tile_size", "tile_batch", "chunk"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.isect_capacity is not None and self.isect_capacity < 1:
            raise UserError(f"isect_capacity must be >= 1; got {self.isect_capacity}")


def _platform_kind(platform: str) -> str:
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform)


def resolve(opts: RasterOptions, n_colors: int) -> RasterOptions:
    """opts with the path fixed (a static argument, so each path compiles separately):
    - "auto": the Pallas kernel on TPU and GPU (where it takes the tile size and channels),
      else the XLA path; on CPU the sequential XLA path (tile_batch 1), the fastest there
      (benchmarks/results/render_cpu.json);
    - "pallas": the kernel for this platform; on CPU the TPU kernel in interpret mode;
    - "xla": per-tile while loops, sequential on CPU, bucketed by list length elsewhere."""
    if opts.dense:
        return opts
    platform = _platform_kind(opts.platform or _PLATFORM.get() or jax.default_backend())
    target = opts.kernel or ("gpu" if platform == "gpu" else "tpu")
    if target not in kernels.CHUNKS:
        raise UserError(f"kernel {target!r} unknown; expected one of {sorted(kernels.CHUNKS)}")
    backend, why = opts.backend, None
    if backend != "xla":
        chunk = opts.chunk or kernels.CHUNKS[target]
        why = kernels.supported(opts.tile_size, n_colors, target, chunk, platform == "cpu")
        if backend == "pallas" and why:
            raise UserError(f"backend='pallas' cannot render {why}; use backend='xla'")
        if backend == "auto":
            backend = "pallas" if platform != "cpu" and not why else "xla"
    if backend == "pallas":
        return dataclasses.replace(opts, backend=backend, platform=platform, chunk=chunk,
                                   kernel=target)  # fmt: skip
    tw, th = tile_grid(opts.width, opts.height, opts.tile_size)
    batch = opts.tile_batch or (1 if platform == "cpu" else -(-tw * th // XLA_BUCKETS))
    return dataclasses.replace(opts, backend="xla", platform=platform, tile_batch=batch,
                               chunk=opts.chunk or XLA_CHUNK)  # fmt: skip


def _composite_pallas(lists, rows, opts: RasterOptions, tw: int, th: int):
    """Kernel path: lists regrouped into chunk blocks (`kernels.chunk_layout`)."""
    k, d = opts.chunk, rows.shape[1] - 6
    cstart, src, valid = kernels.chunk_layout(lists.start, lists.count, lists.gid.shape[0], k)
    # one gather from the per-Gaussian rows: its transpose (autodiff) sums the per-entry
    # gradients of the custom VJP into per-Gaussian ones
    chunks = kernels.to_chunks(rows, lists.gid[src], valid, k)
    lay = kernels.KernelLayout(tw, tw * th, opts.tile_size, k, d, opts.kernel,
                               opts.platform == "cpu")  # fmt: skip
    return kernels.composite_chunks(chunks, cstart, lists.count, lay)


def _render_tiled(proj: Projected, opacities, colors, opts: RasterOptions):
    """One camera: (colour [H, W, D], transmittance [H, W], BinStats)."""
    ts = opts.tile_size
    lists, stats = bin_gaussians(
        proj.means2d,
        proj.radii,
        proj.depths,
        opacities,
        opts.width,
        opts.height,
        tile_size=ts,
        isect_capacity=opts.isect_capacity,
    )
    tw, th = tile_grid(opts.width, opts.height, ts)
    feats = jnp.concatenate([proj.means2d, proj.conics, opacities[:, None], colors], -1)
    if opts.backend == "pallas":
        acc, trans = _composite_pallas(lists, feats, opts, tw, th)
    else:
        lay = TileLayout(tw, tw * th, ts, opts.chunk, opts.tile_batch)
        # one gather per camera: each chunk is then a contiguous slice, and the gather's
        # transpose (autodiff) sums the per-slot gradients of the custom VJP into per-Gaussian
        feats = jnp.pad(feats[lists.gid], ((0, opts.chunk), (0, 0)))
        acc, trans = composite_tiles(feats, lists.start, lists.count, lay)
    d = colors.shape[-1]
    acc = acc.reshape(th, tw, ts, ts, d).transpose(0, 2, 1, 3, 4).reshape(th * ts, tw * ts, d)
    trans = trans.reshape(th, tw, ts, ts).transpose(0, 2, 1, 3).reshape(th * ts, tw * ts)
    return acc[: opts.height, : opts.width], trans[: opts.height, : opts.width], stats


def _render_camera(means, covars, opacities, colors, viewmat, K, background, opts):
    proj, opacities = _project_camera(means, covars, opacities, viewmat, K, opts)
    if "D" in opts.render_mode:
        depth = proj.depths[:, None].astype(colors.dtype)
        colors = jnp.concatenate([colors, depth], -1) if "RGB" in opts.render_mode else depth
    if opts.dense:
        acc, trans = render_dense(proj, opacities, colors, opts.width, opts.height)
        zero = jnp.zeros((), jnp.int32)
        stats = BinStats(zero, zero, zero)
    else:
        acc, trans, stats = _render_tiled(proj, opacities, colors, opts)
    alpha = 1.0 - trans
    if opts.render_mode.endswith("ED"):  # expected depth: normalise by coverage (as gsplat)
        acc = acc.at[..., -1].divide(jnp.maximum(alpha, 1e-10))
    if background is not None:
        acc = acc + trans[..., None] * background
    return acc, alpha[..., None], proj, opacities, stats


def _project_camera(means, covars, opacities, viewmat, K, opts: RasterOptions):
    """Projection plus antialiasing compensation: (Projected, opacities [N])."""
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
    return proj, opacities


@jax.jit(static_argnames=("opts",))
def _count_jit(means, covars, opacities, viewmats, Ks, opts):
    """[] int32 most Gaussian-tile intersections over the cameras (the binning's own rule)."""

    def one(x):
        proj, opac = _project_camera(means, covars, opacities, *x, opts)
        return count_isects(proj.means2d, proj.radii, opac, opts.width, opts.height, opts.tile_size)

    return jax.lax.map(one, (viewmats, Ks)).max()


def _concrete(x):
    """x's value if known now (eager, or the primal under eager `jax.grad`), else None."""
    if not isinstance(x, jax.core.Tracer):
        return x
    try:
        from jax._src.core import to_concrete_value  # no public equivalent that sees JVP primals
    except ImportError:  # pragma: no cover - other JAX versions: the default capacity applies
        return None
    return to_concrete_value(x)


def _sized(opts: RasterOptions, means, covars, opacities, viewmats, Ks) -> RasterOptions:
    """opts with `isect_capacity` from a count pass when it is unset and the inputs are known."""
    if opts.dense or opts.isect_capacity is not None:
        return opts
    values = [_concrete(x) for x in (means, covars, opacities, viewmats, Ks)]
    if any(v is None for v in values):
        return opts  # traced: tiles.default_isect_capacity, overflow counted and warned
    n = int(_count_jit(*values, opts=opts))
    return dataclasses.replace(opts, isect_capacity=bucket_capacity(n))


def _warn_overflow(overflow):
    # constant text: Python's default filter then shows it once per process, not every frame
    if np.asarray(overflow).max(initial=0) > 0:
        warnings.warn(
            "rasterization: isect_capacity is too small, some Gaussian-tile intersections are "
            "missing (meta['isect_overflow']); pass isect_capacity >= meta['n_isects'] or call "
            "outside jit so that it is counted",
            RasterCapacityWarning,
            stacklevel=2,
        )


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

    rgb = "RGB" in opts.render_mode
    opts = resolve(opts, colors.shape[1] * rgb + ("D" in opts.render_mode))
    opts = _sized(opts, means, covars, opacities, viewmats, Ks)
    img, alpha, meta = _render_jit(
        means, covars, opacities, colors, viewmats, Ks, backgrounds, opts
    )
    tw, th = tile_grid(opts.width, opts.height, opts.tile_size)
    cap = opts.isect_capacity or default_isect_capacity(means.shape[0], tw * th)
    meta |= {
        "width": opts.width,
        "height": opts.height,
        "tile_size": opts.tile_size,
        "isect_capacity": 0 if opts.dense else cap,  # static slot count used
    }
    return img, alpha, meta


@jax.jit(static_argnames=("opts",))
def _render_jit(means, covars, opacities, colors, viewmats, Ks, backgrounds, opts):
    # jitted once per (shapes, options): eager calls would dispatch every op separately
    def one(viewmat, K, bg):
        return _render_camera(means, covars, opacities, colors, viewmat, K, bg, opts)

    # cameras in sequence (lax.map, not vmap) so that each tile's while loop keeps its own
    # trip count
    if backgrounds is None:
        img, alpha, proj, opac, stats = jax.lax.map(lambda x: one(*x, None), (viewmats, Ks))
    else:
        img, alpha, proj, opac, stats = jax.lax.map(lambda x: one(*x), (viewmats, Ks, backgrounds))
    if not opts.dense:
        jax.debug.callback(_warn_overflow, stats.isect_overflow)
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
    isect_capacity: int | None = None,
    backend: str = "auto",
    tile_batch: int | None = None,
    chunk: int | None = None,
    dense: bool = False,
    kernel: str | None = None,
    covars: jax.Array | None = None,  # [N, 3, 3]; replaces quats/scales when given
) -> tuple[jax.Array, jax.Array, dict[str, Any]]:
    """gsplat-style rasterisation -> (colors [C, H, W, D'], alphas [C, H, W, 1], meta).

    D' = D for "RGB", 1 for "D"/"ED" (accumulated / expected depth), D + 1 for "RGB+D"/"RGB+ED".
    `meta` holds means2d, conics, depths, radii, opacities, compensations (per camera), the
    binning counters n_isects, isect_overflow, max_tile_count ([C] each) and isect_capacity.
    `isect_overflow` is 0 unless a fixed `isect_capacity` (given, or the default under an outer
    `jit`) was too small; then a `RasterCapacityWarning` is issued too (module doc).
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
        isect_capacity=isect_capacity,
        backend=backend,
        tile_batch=tile_batch,
        chunk=chunk,
        dense=dense,
        kernel=kernel,
    )
    if covars is None:
        covars = _covariance_jit(jnp.asarray(quats), jnp.asarray(scales))
    return render(means, covars, opacities, colors, viewmats, Ks, opts, backgrounds)
