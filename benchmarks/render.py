"""Rasteriser speed: ms/frame forward and forward+backward, tiled vs dense (docs/architecture.md §7).

  python benchmarks/render.py                 # writes benchmarks/results/render_<backend>.json
  python benchmarks/render.py --sizes 256 --counts 1000,10000 --repeats 3

Random scenes of N Gaussians (means in a box in front of one camera, screen footprints of a few
pixels, shrinking as N grows so that the depth complexity stays comparable) at HxH pixels.
Timings exclude compilation (reported separately). The dense reference is O(pixels x N) and is
skipped, with the reason in the JSON, above `--dense-limit` pixel-Gaussian pairs. Tile overflow
(Gaussians dropped beyond `tile_capacity`) is recorded next to each tiled timing.
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

from fica_jax.render import rasterization  # noqa: E402


def make_scene(n: int, seed: int = 0):
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


def camera(h: int):
    K = np.array([[[1.2 * h, 0, h / 2], [0, 1.2 * h, h / 2], [0, 0, 1]]], np.float32)
    return np.eye(4, dtype=np.float32)[None], K


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


def bench(n, h, dense, repeats, tile_capacity):
    s = make_scene(n)
    vm, K = camera(h)
    keys = ("means", "quats", "scales", "opacities", "colors")
    w_img = jnp.asarray(np.random.default_rng(1).normal(size=(1, h, h, 3)).astype(np.float32))

    def fwd(*a):
        img, alpha, meta = rasterization(*a, vm, K, h, h, dense=dense, tile_capacity=tile_capacity)
        return img, meta["tile_overflow"], meta["max_tile_count"]

    def loss(*a):
        return jnp.sum(fwd(*a)[0] * w_img)

    args = tuple(jnp.asarray(s[k]) for k in keys)
    f = jax.jit(fwd)
    g = jax.jit(jax.grad(loss, argnums=tuple(range(5))))
    fwd_ms, fwd_c = time_fn(f, args, repeats)
    bwd_ms, bwd_c = time_fn(g, args, repeats)
    _, overflow, max_count = f(*args)
    out = {"fwd_ms": fwd_ms, "fwd_bwd_ms": bwd_ms, "compile_s": fwd_c + bwd_c}
    if not dense:
        out |= {"tile_overflow": int(overflow[0]), "max_tile_count": int(max_count[0])}
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="256,512")
    p.add_argument("--counts", default="1000,10000,100000,260000")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tile-capacity", type=int, default=256)
    p.add_argument("--dense-limit", type=float, default=1e8, help="max pixels x Gaussians")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for h in map(int, args.sizes.split(",")):
        for n in map(int, args.counts.split(",")):
            for dense in (False, True):
                row = {"N": n, "size": h, "path": "dense" if dense else "tiled"}
                if dense and h * h * n > args.dense_limit:
                    row["skipped"] = (
                        f"dense is O(pixels x N) = {h * h * n:.2e} pairs > --dense-limit "
                        f"{args.dense_limit:.0e} (on the 2-core CPU, 6.6e7 pairs already take ~14 s "
                        "forward+backward)"
                    )
                else:
                    row |= bench(n, h, dense, args.repeats, args.tile_capacity)
                rows.append(row)
                print(json.dumps(row), flush=True)
    backend = jax.default_backend()
    result = {
        "benchmark": "render",
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "repeats": args.repeats,
        "tile_size": 16,
        "tile_capacity": args.tile_capacity,
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    out = pathlib.Path(args.out or REPO / f"benchmarks/results/render_{backend}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
