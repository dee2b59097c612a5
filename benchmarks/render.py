"""Rasteriser speed: ms/frame forward and forward+backward, new vs old tiled path (docs/architecture.md §7).

  python benchmarks/render.py                 # writes benchmarks/results/render_<backend>.json
  python benchmarks/render.py --sizes 256 --counts 1000,10000 --repeats 1 --no-upm

Workloads:
- "random": N Gaussians in a box in front of one camera, screen footprints of a few pixels that
  shrink as N grows (total covered area roughly constant), at HxH pixels;
- "upm": one Gaussian per texel of an RxR UV map on the front of a head-sized ellipsoid, flat
  discs of about one texel facing out, opacity 0.9, a frontal camera: the dense Gaussian maps the
  UPM trains on (most tiles hold hundreds of Gaussians).

Paths, in the same run on the same scene:
- "new": `fica_jax.render.rasterization` (per-tile variable-length lists, custom VJP), called
  with the `isect_capacity` its own count pass picks;
- "old": the previous library path, kept here only as the baseline: every tile takes a fixed
  [tiles, K] table of its K nearest Gaussians, composited by `lax.map` over tiles of a
  `jax.checkpoint`ed `lax.scan` over chunks (skipped by `lax.cond` past the tile's count), with
  JAX autodiff for the backward. K is set to `max_tile_count`, so it drops nothing either;
- "gsplat" (only where torch sees CUDA): gsplat's `rasterization` CUDA kernels on the same scene
  and camera, forward and forward + backward to all five inputs, timed with CUDA syncs;
  `psnr_vs_new` compares its image with ours and `*_over_gsplat` on the new row is our time over
  gsplat's.
Every row records `n_isects` and `dropped` (0 for both paths). Timings are medians over
`--repeats` after one compiling call (compile time reported separately). The old path is skipped,
with the reason in the JSON, where its [tiles, K, pixels] block exceeds `--old-limit` pairs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_result  # noqa: E402
from fica_jax.render import rasterization  # noqa: E402
from fica_jax.render.composite import composite  # noqa: E402
from fica_jax.render.project import covariance, project  # noqa: E402
from fica_jax.render.tiles import bin_gaussians, tile_grid  # noqa: E402

TILE = 16
CHUNK = 64


def random_scene(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    means = rng.uniform(-1, 1, (n, 3)).astype(np.float32) * np.array([1.0, 1.0, 0.5], np.float32)
    means[:, 2] += 3.0
    quats = rng.normal(size=(n, 4)).astype(np.float32)
    size = 0.06 * (1e3 / n) ** (1 / 3)  # keeps the total covered area roughly constant
    scales = (size * np.exp(rng.uniform(-1, 0.5, (n, 3)))).astype(np.float32)
    return dict(
        means=means,
        quats=quats,
        scales=scales,
        opacities=rng.uniform(0.1, 0.9, n).astype(np.float32),
        colors=rng.uniform(size=(n, 3)).astype(np.float32),
    )


def head_scene(res: int, seed: int = 0):
    """One Gaussian per texel of a res x res UV map on the front half of an ellipsoid head."""
    rng = np.random.default_rng(seed)
    radii = np.array([0.5, 0.65, 0.55])  # x, y, z half-axes (m), centre 1.9 m in front
    u, v = np.meshgrid((np.arange(res) + 0.5) / res, (np.arange(res) + 0.5) / res)
    theta = (u - 0.5) * np.pi * 0.95  # azimuth, 0 faces the camera
    phi = (v - 0.5) * np.pi * 0.9  # elevation
    unit = np.stack([np.sin(theta) * np.cos(phi), np.sin(phi), -np.cos(theta) * np.cos(phi)], -1)
    pos = unit * radii + np.array([0.0, 0.0, 1.9])
    normal = unit / radii
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    # texel footprint: distance to the UV neighbours
    du = np.linalg.norm(np.gradient(pos, axis=1), axis=-1)
    dv = np.linalg.norm(np.gradient(pos, axis=0), axis=-1)
    s = 0.8 * np.maximum(du, dv)
    # rotation taking the disc's thin local z axis to the normal (n_z < 0 here, so no pole)
    nx, ny, nz = normal[..., 0], normal[..., 1], normal[..., 2]
    q = np.stack([1 - nz, ny, -nx, np.zeros_like(nz)], -1)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    f = lambda x: x.reshape(res * res, -1).astype(np.float32)
    return dict(
        means=f(pos),
        quats=f(q),
        scales=f(np.stack([s, s, 0.1 * s], -1)),
        opacities=np.full(res * res, 0.9, np.float32),
        colors=rng.uniform(size=(res * res, 3)).astype(np.float32),
    )


def camera(h: int):
    K = np.array([[[1.2 * h, 0, h / 2], [0, 1.2 * h, h / 2], [0, 0, 1]]], np.float32)
    return np.eye(4, dtype=np.float32)[None], K


def old_render(means, quats, scales, opacities, colors, vm, K, h, isect_capacity, tile_capacity):
    """The replaced [tiles, K] path (one camera, RGB, no background): see module doc."""
    proj = project(means, covariance(quats, scales), vm[0], K[0], h, h)
    lists, _ = bin_gaussians(
        proj.means2d, proj.radii, proj.depths, opacities, h, h,
        tile_size=TILE, isect_capacity=isect_capacity,
    )  # fmt: skip
    tw, th = tile_grid(h, h, TILE)
    k = jnp.arange(tile_capacity)
    valid = k[None, :] < lists.count[:, None]
    ids = lists.gid[jnp.minimum(lists.start[:, None] + k[None, :], isect_capacity - 1)]
    ids = jnp.where(valid, ids, 0)  # [T, K]
    t = jnp.arange(tw * th)
    ly, lx = jnp.meshgrid(jnp.arange(TILE), jnp.arange(TILE), indexing="ij")
    lx, ly = lx.reshape(-1) + 0.5, ly.reshape(-1) + 0.5

    def one_tile(x):
        x0, y0, m, c, o, col, n = x
        return composite(lx + x0, ly + y0, m, c, o, col, chunk=CHUNK, count=n)

    per_tile = (
        (t % tw) * TILE,
        (t // tw) * TILE,
        proj.means2d[ids],
        proj.conics[ids],
        jnp.where(valid, opacities[ids], 0.0),
        colors[ids],
        lists.count,
    )
    acc, _ = jax.lax.map(jax.checkpoint(one_tile), per_tile)
    acc = acc.reshape(th, tw, TILE, TILE, 3).transpose(0, 2, 1, 3, 4)
    return acc.reshape(th * TILE, tw * TILE, 3)[None, :h, :h]


def time_fn(fn, args, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), compile_s


def gsplat_row(s, h, repeats, w_img, ours):
    """gsplat's CUDA `rasterization` on the same scene, timed like ours (torch, CUDA synced).

    None without CUDA. `psnr_vs_new` compares its image with ours (`new`)."""
    try:
        import gsplat
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    vm, K = camera(h)
    t = lambda x, grad=False: torch.tensor(np.asarray(x), device="cuda", requires_grad=grad)
    keys = ("means", "quats", "scales", "opacities", "colors")
    leaves = [t(s[k], grad=True) for k in keys]
    w = t(w_img)

    def fwd():
        return gsplat.rasterization(*leaves, t(vm), t(K), h, h, tile_size=TILE)[0]

    def fwd_bwd():
        return torch.autograd.grad((fwd() * w).sum(), leaves)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(times)), first

    with torch.no_grad():
        fwd_ms, c0 = timed(fwd)
        img = fwd().cpu().numpy()
    bwd_ms, c1 = timed(fwd_bwd)
    mse = float(np.mean((img - np.asarray(ours)) ** 2))
    return {"path": "gsplat", "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms, "compile_s": c0 + c1,
            "psnr_vs_new": 10 * np.log10(1.0 / max(mse, 1e-12))}  # fmt: skip


def bench(s, h, repeats, old_limit):
    """Rows for the new and the old path (and gsplat's CUDA kernels, given CUDA) on scene s."""
    vm, K = camera(h)
    keys = ("means", "quats", "scales", "opacities", "colors")
    args = tuple(jnp.asarray(s[k]) for k in keys)
    w_img = jnp.asarray(np.random.default_rng(1).normal(size=(1, h, h, 3)).astype(np.float32))
    # eager call: the renderer counts the intersections and picks its capacity
    _, _, meta = rasterization(*args, vm, K, h, h)
    n_isects, cap = int(meta["n_isects"][0]), int(meta["isect_capacity"])
    max_count = int(meta["max_tile_count"][0])
    base = {"n_isects": n_isects, "max_tile_count": max_count, "isect_capacity": cap}

    def new(*a):
        img, _, meta = rasterization(*a, vm, K, h, h, isect_capacity=cap)
        return img, meta["isect_overflow"][0]

    def old(*a):
        return old_render(*a, vm, K, h, cap, max_count), jnp.zeros((), jnp.int32)

    rows = {}
    n_tiles = np.prod(tile_grid(h, h, TILE))
    for name, fn in (("new", new), ("old", old)):
        row = {"path": name} | base
        if name == "old":
            row["tile_capacity"] = max_count
            pairs = float(n_tiles * max_count * TILE * TILE)
            if pairs > old_limit:
                row["skipped"] = (
                    f"old path's [tiles, K={max_count}] table is {pairs:.2e} pixel-Gaussian "
                    f"pairs > --old-limit {old_limit:.0e}: would take minutes on this CPU"
                )
                rows[name] = row
                continue
        loss = lambda *a, fn=fn: jnp.sum(fn(*a)[0] * w_img)
        f = jax.jit(fn)
        g = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
        fwd_ms, fwd_c = time_fn(f, args, repeats)
        bwd_ms, bwd_c = time_fn(g, args, repeats)
        row |= {"dropped": int(f(*args)[1]), "fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms}
        rows[name] = row | {"compile_s": fwd_c + bwd_c}
    if "fwd_bwd_ms" in rows["old"]:
        rows["new"]["speedup_fwd_bwd_vs_old"] = (
            rows["old"]["fwd_bwd_ms"] / rows["new"]["fwd_bwd_ms"]
        )
        rows["new"]["speedup_fwd_vs_old"] = rows["old"]["fwd_ms"] / rows["new"]["fwd_ms"]
    ref = gsplat_row(s, h, repeats, w_img, jax.jit(new)(*args)[0])
    if ref is not None:
        for k in ("fwd_ms", "fwd_bwd_ms"):
            rows["new"][f"{k}_over_gsplat"] = rows["new"][k] / ref[k]
        return [rows["new"], rows["old"], ref | {"n_isects": n_isects}]
    return [rows["new"], rows["old"]]


def growth(rows, size, n_lo, n_hi):
    """(fwd+bwd time growth) / (n_isects growth) of the new path, random scenes, n_lo -> n_hi."""
    pick = {
        r["N"]: r
        for r in rows
        if r["workload"] == "random" and r["size"] == size and r["path"] == "new"
    }
    if n_lo not in pick or n_hi not in pick:
        return None
    lo, hi = pick[n_lo], pick[n_hi]
    t, i = hi["fwd_bwd_ms"] / lo["fwd_bwd_ms"], hi["n_isects"] / lo["n_isects"]
    return {"size": size, "N": [n_lo, n_hi], "time_growth": t, "isect_growth": i,
            "time_growth_over_isect_growth": t / i}  # fmt: skip


def upm_speedup(rows, uv_map=256, size=256):
    """fwd+bwd speed-up of the new path over the old on the UPM map at `size` px."""
    for r in rows:
        if (r["workload"], r.get("uv_map"), r["size"], r["path"]) == ("upm", uv_map, size, "new"):
            return {"uv_map": uv_map, "size": size, "fwd_bwd": r.get("speedup_fwd_bwd_vs_old"),
                    "fwd": r.get("speedup_fwd_vs_old")}  # fmt: skip
    return None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--counts", default="1000,10000,100000,260000")
    p.add_argument("--upm", default="128@256,256@256,128@512", help="map@pixels workloads")
    p.add_argument("--no-upm", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--old-limit", type=float, default=3e8, help="max tiles x K x pixels")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    work = [
        ("random", int(n), int(h)) for h in args.sizes.split(",") for n in args.counts.split(",")
    ]
    if not args.no_upm:
        work += [("upm", *map(int, w.split("@"))) for w in args.upm.split(",")]
    for kind, n, h in work:
        s = random_scene(n) if kind == "random" else head_scene(n)
        head = {"workload": kind, "N": len(s["opacities"]), "size": h}
        if kind == "upm":
            head["uv_map"] = n
        for row in bench(s, h, args.repeats, args.old_limit):
            rows.append(head | row)
            print(json.dumps(rows[-1]), flush=True)
    backend = jax.default_backend()
    counts = [int(n) for n in args.counts.split(",")]
    result = {
        "benchmark": "render",
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "repeats": args.repeats,
        "tile_size": TILE,
        "chunk": CHUNK,
        "command": "python " + " ".join(sys.argv),
        "all_dropped_zero": all(r.get("dropped", 0) == 0 for r in rows),
        "growth_512": growth(rows, 512, 10000, max(counts)) if 10000 in counts else None,
        "upm_speedup": upm_speedup(rows),
        "old_slower_everywhere": all(
            r.get("speedup_fwd_vs_old", 2) > 1 and r.get("speedup_fwd_bwd_vs_old", 2) > 1
            for r in rows
        ),
        "rows": rows,
    }
    write_result(result, args.out or REPO / f"benchmarks/results/render_{backend}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
