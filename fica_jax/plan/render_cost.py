"""The Gaussian renderer's cost in a planned step, given analytically (docs/architecture.md §7, §9).

The compositing kernel (`render/kernels.py`) is a Mosaic / Triton custom call: opaque to the HLO
roofline, which sees only its operands' bytes. Its compute is
    pixel-Gaussian pairs evaluated x vector ops per pair / the chip's vector throughput,
with each factor measured rather than assumed where it can be:
- pairs: the kernel evaluates whole chunks of every tile's list at every pixel of the tile, so a
  frame costs sum over tiles of ceil(count / chunk) x chunk x tile_size^2, counted on a
  representative frame (`head_gaussians`: one Gaussian per texel of a UV map on a head-sized
  ellipsoid, discs about a texel wide, framed as a dome camera frames a head) by the renderer's
  own projection and binning. Early exit is ignored (an upper bound), and so is the
  backward's shorter walk (it stops at the last composited Gaussian);
- ops per pair: the equations of one chunk step of the kernel body (`kernels.chunk_step`),
  traced on a [pixels, chunk] block and counted element by element (`jaxpr_ops`);
- throughput: `chips.Chip.vector_ops_per_s` (its derivation is in chips.py).
Which renders a step makes comes from the stage (`Stage.renders`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.render import kernels
from fica_jax.render.project import covariance, project
from fica_jax.render.tiles import bin_gaussians, bucket_capacity, count_isects, tile_grid


def head_gaussians(res: int, seed: int = 0, full: bool = False):
    """One Gaussian per texel of a res x res UV map on an ellipsoid head 1.9 m in front of a
    camera looking down +z: the front half (`full` False) or all of it. Flat discs of about one
    texel (0.8 x the distance to the UV neighbours), opacity 0.9, random colours."""
    rng = np.random.default_rng(seed)
    radii = np.array([0.5, 0.65, 0.55])  # x, y, z half-axes (m)
    u, v = np.meshgrid((np.arange(res) + 0.5) / res, (np.arange(res) + 0.5) / res)
    theta = (u - 0.5) * np.pi * (2.0 if full else 0.95)  # azimuth, 0 faces the camera
    phi = (v - 0.5) * np.pi * (0.98 if full else 0.9)  # elevation
    unit = np.stack([np.sin(theta) * np.cos(phi), np.sin(phi), -np.cos(theta) * np.cos(phi)], -1)
    pos = unit * radii + np.array([0.0, 0.0, 1.9])
    normal = unit / radii
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    du = np.linalg.norm(np.gradient(pos, axis=1), axis=-1)  # texel footprint
    dv = np.linalg.norm(np.gradient(pos, axis=0), axis=-1)
    s = 0.8 * np.maximum(du, dv)
    # rotation taking the disc's thin local z axis to the normal (quaternion w, x, y, z)
    nx, ny, nz = normal[..., 0], normal[..., 1], normal[..., 2]
    q = np.stack([1 - nz, ny, -nx, np.zeros_like(nz)], -1)
    q = np.where(np.abs(1 - nz)[..., None] < 1e-6, [0.0, 1.0, 0.0, 0.0], q)  # n = +z: a flip
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    f = lambda x: x.reshape(res * res, -1).astype(np.float32)
    return dict(
        means=f(pos),
        quats=f(q),
        scales=f(np.stack([s, s, 0.1 * s], -1)),
        opacities=np.full(res * res, 0.9, np.float32),
        colors=rng.uniform(size=(res * res, 3)).astype(np.float32),
    )


def frontal_camera(h: int):
    """(viewmats [1, 4, 4], Ks [1, 3, 3]) of an h x h frame whose head fills ~80% of its height."""
    K = np.array([[[1.2 * h, 0, h / 2], [0, 1.2 * h, h / 2], [0, 0, 1]]], np.float32)
    return np.eye(4, dtype=np.float32)[None], K


def frame_pairs(gaussians: int, size: int, tile_size: int, chunk: int) -> dict:
    """Counts of a representative frame (module doc): n_isects, the longest tile list, and the
    pixel-Gaussian pairs the kernel evaluates with `chunk`-entry chunks."""
    res = max(1, round(math.sqrt(gaussians)))
    s = head_gaussians(res, full=True)
    vm, K = frontal_camera(size)

    @jax.jit
    def counts(means, quats, scales, opacities):
        proj = project(means, covariance(quats, scales), vm[0], K[0], size, size)
        n = count_isects(proj.means2d, proj.radii, opacities, size, size, tile_size)
        return proj, n

    args = [jnp.asarray(s[k]) for k in ("means", "quats", "scales", "opacities")]
    proj, n = counts(*args)
    cap = bucket_capacity(int(n))
    lists, stats = jax.jit(
        lambda p, o: bin_gaussians(
            p.means2d, p.radii, p.depths, o, size, size, tile_size=tile_size, isect_capacity=cap
        )  # fmt: skip
    )(proj, args[3])
    count = np.asarray(lists.count, np.int64)
    walked = int(np.sum(-(-count // chunk) * chunk))
    tw, th = tile_grid(size, size, tile_size)
    return {
        "gaussians": res * res,
        "size": size,
        "tile_size": tile_size,
        "tiles": tw * th,
        "n_isects": int(stats.n_isects),
        "max_tile_count": int(stats.max_tile_count),
        "pairs": walked * tile_size * tile_size,
    }


ELEMENTWISE_FREE = {"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "iota"}


def jaxpr_ops(jaxpr) -> float:
    """Vector element operations of a jaxpr: each equation costs its largest operand or result
    (reductions cost their input), nested jaxprs (pjit, custom_jvp) counted inside; data
    movement without arithmetic (broadcast, reshape, a same-dtype conversion) is free."""
    total = 0.0
    for eqn in jaxpr.eqns:
        subs = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
        if subs:
            for sub in subs:
                total += jaxpr_ops(getattr(sub, "jaxpr", sub))
            continue
        if eqn.primitive.name in ELEMENTWISE_FREE:
            continue
        if eqn.primitive.name == "convert_element_type" and (
            eqn.invars[0].aval.dtype == eqn.params["new_dtype"]  # a weak type made strong
        ):
            continue
        sizes = [math.prod(getattr(v.aval, "shape", ())) for v in (*eqn.invars, *eqn.outvars)]
        total += max(sizes, default=1)
    return total


def ops_per_pair(n_colors: int, tile_size: int, chunk: int, target: str = "tpu") -> dict:
    """Vector ops per pixel-Gaussian pair of one forward and one backward chunk step."""
    p = tile_size * tile_size
    out = {}
    for direction in ("forward", "backward"):
        fn, args = kernels.chunk_step(direction, n_colors, tile_size, chunk, target)
        out[direction] = jaxpr_ops(jax.make_jaxpr(fn)(*args).jaxpr) / (p * chunk)
    return out


def renderer_cost(renders, chips, devices: int, global_batch: int) -> dict:
    """Per device and step: the renders a step makes (`Stage.renders`), their pairs on a
    representative frame, ops per pair, and predicted kernel seconds per chip."""
    from fica_jax.perf.chips import CHIPS

    per_device = global_batch / devices
    rows, total = [], {"forward": 0.0, "backward": 0.0}
    for r in renders:
        chunk = kernels.CHUNKS["tpu"]
        frame = frame_pairs(r.gaussians, r.size, r.tile_size, chunk)
        ops = ops_per_pair(r.n_colors, r.tile_size, chunk)
        row = {"render": r.name, "per_example": {"forward": r.forward, "backward": r.backward},
               "frame": frame, "ops_per_pair": ops}  # fmt: skip
        for d in total:
            n = getattr(r, d) * per_device * frame["pairs"] * ops[d]
            row[f"{d}_ops"] = n
            total[d] += n
        rows.append(row)
    ops = total["forward"] + total["backward"]
    seconds = {
        c: ops / CHIPS[c].vector_ops_per_s if CHIPS[c].vector_ops_per_s else None for c in chips
    }
    return {"examples_per_device": per_device, "renders": rows, "vector_ops": ops,
            "kernel_s": seconds}  # fmt: skip


KERNEL_NAMES = ("fica_composite_fwd", "fica_composite_bwd")  # the kernels' names in the HLO


def kernel_calls(hlo_text: str) -> dict[str, int]:
    """Custom-call instructions of each compositing kernel in a compiled step's HLO text: 0
    means the step renders through the XLA path."""
    calls = [line for line in hlo_text.splitlines() if "custom-call(" in line]
    return {k: sum(k in line for line in calls) for k in KERNEL_NAMES}


def renderer_split(roof: Mapping, kernel_s: Mapping) -> dict:
    """Per chip: the HLO roofline's step (network, binning, and the kernels' operand bytes) plus
    the kernels' analytic compute, taken as not overlapping (an upper bound), and the
    renderer's share of it."""
    out = {}
    for chip, r in roof.items():
        k = kernel_s.get(chip)
        if k is None:
            out[chip] = {"note": "no vector throughput for this chip (chips.py)"}
            continue
        step = r["step_s"] + k
        out[chip] = {"hlo_step_s": r["step_s"], "kernel_s": k, "step_s": step,
                     "renderer_share": k / step if step > 0 else None}  # fmt: skip
    return out
