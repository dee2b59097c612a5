"""Rasteriser speed: ms/frame forward and forward+backward for each compositing path (docs/architecture.md §7).

  python benchmarks/render.py                 # writes benchmarks/results/render_<backend>.json
  python benchmarks/render.py --sizes 256 --counts 10000 --repeats 1 --no-upm

Workloads:
- "random": N Gaussians in a box in front of one camera, screen footprints of a few pixels that
  shrink as N grows (total covered area roughly constant), at HxH pixels;
- "upm": one Gaussian per texel of an RxR UV map on the front of a head-sized ellipsoid, flat
  discs of about one texel facing out, opacity 0.9, a frontal camera
  (`fica_jax.plan.render_cost.head_gaussians`): the dense Gaussian maps the UPM trains on.

Paths, each `fica_jax.render.rasterization` on the same scene in the same run, with the
intersection capacity its own count pass picks:
- "xla-sequential": backend="xla", tile_batch=1, chunk 64: one tile after another, each its own
  while loop (the only path before the kernels; what "auto" picks on CPU);
- "xla-parallel": backend="xla", tiles sorted by list length into `XLA_BUCKETS` buckets, each
  bucket one while loop over all its tiles at once (what "xla" picks on an accelerator);
- "auto": the defaults (`rasterize.resolve`): on CPU the sequential path, on TPU/GPU the kernel;
  `auto_over_sequential` is its time over xla-sequential's (1 or below: no slower);
- "pallas": the Pallas kernel (`render/kernels.py`) for this platform; on CPU it would run in
  interpret mode, a correctness tool (tests/render/test_render_kernels.py), so it is not timed;
- "gsplat" (only where torch sees CUDA): gsplat's `rasterization` CUDA kernels on the same scene
  and camera, forward and forward + backward to all five inputs, timed with CUDA syncs;
  `psnr_vs_auto` compares its image with ours and `*_over_gsplat` is our time over gsplat's.
Every row records `n_isects` and `dropped` (the intersections beyond the capacity: 0). Timings
are medians (and minima) over `--repeats` after one compiling call (compile time reported
separately), the paths' calls interleaved. A path whose compiling forward call takes longer than
`--max-call-s` is not timed further (the reason is in its row). The JSON is rewritten after each
workload (`complete` false until the last), so a cut-off run keeps its rows.
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
from fica_jax.plan.render_cost import frontal_camera, head_gaussians  # noqa: E402
from fica_jax.render import rasterization  # noqa: E402
from fica_jax.render.rasterize import XLA_BUCKETS, RasterOptions, resolve  # noqa: E402
from fica_jax.render.tiles import tile_grid  # noqa: E402

TILE = 16
PATHS = {  # rasterization keywords of each path (xla-parallel's tile_batch is set per frame)
    "xla-sequential": dict(backend="xla", tile_batch=1, chunk=64),
    "xla-parallel": dict(backend="xla"),
    "auto": dict(),
    "pallas": dict(backend="pallas"),
}


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


def gsplat_row(s, h, repeats, w_img, ours):
    """gsplat's CUDA `rasterization` on the same scene, timed like ours (torch, CUDA synced).

    None without CUDA. `psnr_vs_auto` compares its image with ours ("auto")."""
    try:
        import gsplat
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    vm, K = frontal_camera(h)
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
            "psnr_vs_auto": 10 * np.log10(1.0 / max(mse, 1e-12))}  # fmt: skip


def bench(s, h, repeats, max_call_s, paths=tuple(PATHS)):
    """One row per path (and gsplat's CUDA kernels, given CUDA) on scene s at h x h pixels.
    The paths' timed calls are interleaved (path 1, path 2, ..., path 1, ...) so that a slow
    spell of a shared machine falls on every path alike."""
    vm, K = frontal_camera(h)
    keys = ("means", "quats", "scales", "opacities", "colors")
    args = tuple(jnp.asarray(s[k]) for k in keys)
    w_img = jnp.asarray(np.random.default_rng(1).normal(size=(1, h, h, 3)).astype(np.float32))
    # eager call: the renderer counts the intersections and picks its capacity
    _, _, meta = rasterization(*args, vm, K, h, h)
    n_isects, cap = int(meta["n_isects"][0]), int(meta["isect_capacity"])
    base = {"n_isects": n_isects, "max_tile_count": int(meta["max_tile_count"][0]),
            "isect_capacity": cap}  # fmt: skip
    n_tiles = int(np.prod(tile_grid(h, h, TILE)))
    platform = jax.default_backend()
    rows, images, timed = {}, {}, {}
    for name in paths:
        kw = dict(PATHS[name])
        if name == "xla-parallel":
            kw["tile_batch"] = -(-n_tiles // XLA_BUCKETS)
        opts = resolve(RasterOptions(width=h, height=h, tile_size=TILE, **kw), 3)
        row = {
            "path": name,
            "resolved": {k: getattr(opts, k) for k in ("backend", "tile_batch", "chunk", "kernel")},
        } | base
        if name == "pallas" and platform == "cpu":
            rows[name] = row | {
                "skipped": "pallas on CPU runs in interpret mode, a correctness "
                "tool (tests/render/test_render_kernels.py): not timed"
            }
            continue

        def fn(*a, kw=kw):
            img, _, meta = rasterization(*a, vm, K, h, h, isect_capacity=cap, **kw)
            return img, meta["isect_overflow"][0]

        loss = lambda *a, fn=fn: jnp.sum(fn(*a)[0] * w_img)
        f = jax.jit(fn)
        t0 = time.perf_counter()
        images[name], dropped = jax.block_until_ready(f(*args))
        first = time.perf_counter() - t0
        rows[name] = row | {"dropped": int(dropped)}
        if first > max_call_s:
            rows[name]["skipped"] = (f"{name}: the compiling forward call took {first:.0f} s > "
                                     f"--max-call-s {max_call_s:.0f}")  # fmt: skip
            continue
        g = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
        t0 = time.perf_counter()
        jax.block_until_ready(g(*args))
        rows[name]["compile_s"] = first + time.perf_counter() - t0
        timed[name] = {"fwd_ms": f, "fwd_bwd_ms": g}
    for key in ("fwd_ms", "fwd_bwd_ms"):
        times = {name: [] for name in timed}
        start = time.perf_counter()
        # at least `repeats` rounds, more (up to 15) while a round is quick: small frames are
        # noisy on a shared machine
        while timed and (
            (n := len(next(iter(times.values())))) < repeats
            or (n < 15 and time.perf_counter() - start < 4.0)
        ):
            for name, fns in timed.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fns[key](*args))
                times[name].append(time.perf_counter() - t0)
        for name, t in times.items():
            rows[name][key] = 1e3 * float(np.median(t))
            rows[name][key.replace("_ms", "_min_ms")] = 1e3 * float(np.min(t))
            rows[name][key.replace("_ms", "_rounds")] = len(t)
    seq, auto = rows.get("xla-sequential", {}), rows.get("auto", {})
    if "fwd_ms" in seq and "fwd_ms" in auto:
        auto["auto_over_sequential"] = {k: auto[k] / seq[k] for k in ("fwd_ms", "fwd_bwd_ms")}
        auto["same_path_as_sequential"] = auto["resolved"] == seq["resolved"]
    for name in ("xla-parallel", "auto", "pallas"):
        if name in images and "xla-sequential" in images:
            diff = float(
                np.abs(np.asarray(images[name]) - np.asarray(images["xla-sequential"])).max()
            )
            rows[name]["max_abs_diff_vs_sequential"] = diff
    out = list(rows.values())
    ours = images.get("auto", next(iter(images.values()), None))
    ref = gsplat_row(s, h, repeats, w_img, ours) if ours is not None else None
    if ref is not None:
        for r in out:
            for k in ("fwd_ms", "fwd_bwd_ms"):
                if k in r:
                    r[f"{k}_over_gsplat"] = r[k] / ref[k]
        out.append(ref | {"n_isects": n_isects})
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="256,512,1024")
    p.add_argument("--counts", default="10000,100000,1000000")
    p.add_argument("--upm", default="256@512,512@1024", help="map@pixels workloads")
    p.add_argument("--no-upm", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-call-s", type=float, default=120.0)
    p.add_argument("--paths", default=",".join(PATHS), help=f"some of {list(PATHS)}")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        p.error(f"--paths: unknown {sorted(unknown)}; expected some of {list(PATHS)}")
    rows = []
    work = [
        ("random", int(n), int(h)) for h in args.sizes.split(",") for n in args.counts.split(",")
    ]
    if not args.no_upm:
        work += [("upm", *map(int, w.split("@"))) for w in args.upm.split(",")]
    work.sort(key=lambda w: w[2])  # by frame size: the cheap rows first
    for kind, n, h in work:
        s = random_scene(n) if kind == "random" else head_gaussians(n)
        head = {"workload": kind, "N": len(s["opacities"]), "size": h}
        if kind == "upm":
            head["uv_map"] = n
        for row in bench(s, h, args.repeats, args.max_call_s, paths):
            rows.append(head | row)
            print(json.dumps(rows[-1]), flush=True)
        record(args, rows, complete=(kind, n, h) == work[-1])
    return 0


def record(args, rows, complete: bool) -> None:
    backend = jax.default_backend()
    ratios = [r["auto_over_sequential"] for r in rows if "auto_over_sequential" in r]
    result = {
        "benchmark": "render",
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "repeats": args.repeats,
        "tile_size": TILE,
        "command": "python " + " ".join(sys.argv),
        "complete": complete,
        "all_dropped_zero": all(r.get("dropped", 0) == 0 for r in rows),
        "auto_over_sequential_max": max((max(r.values()) for r in ratios), default=None),
        "rows": rows,
    }
    write_result(result, args.out or REPO / f"benchmarks/results/render_{backend}.json")


if __name__ == "__main__":
    sys.exit(main())
