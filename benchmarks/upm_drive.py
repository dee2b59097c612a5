"""UPM avatar speed: drive (decoder) and drive + render ms/frame, fps (FiCA Sec. 2.4).

  python benchmarks/upm_drive.py      # writes benchmarks/results/upm_drive_<backend>.json
  python benchmarks/upm_drive.py --workloads 128@256 --repeats 1

One synthetic identity (`data_pipelines.synthetic.generator.make_identity`) per UV resolution R,
an untrained UPM whose decoder runs 4x4 -> R (speed does not depend on the weights, the
intersection count does a little), driven by that identity's dome-frame expression and gaze and
rendered from the frame's camera scaled to HxH pixels. `drive` is the jitted decoder
(`Avatar.drive`); `render` is `Avatar.render`: drive + the rasteriser's intersection count pass +
rasterisation at the counted capacity (so nothing overflows; `isect_overflow` recorded).
Timings are medians over `--repeats` after one compiling call (its time reported separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_result  # noqa: E402
from data_pipelines.synthetic.generator import SynthConfig, make_identity  # noqa: E402
from fica_jax.avatar.bundle import Avatar  # noqa: E402
from fica_jax.models import upm  # noqa: E402

# decoder widths per level, low -> high resolution (the last entries serve the finest levels)
WIDTHS = (128, 64, 64, 32, 32, 16, 16, 16)


def model_for(r: int) -> upm.UPM:
    levels = int(np.log2(r // 4))
    ch = WIDTHS[:levels]
    cfg = dataclasses.replace(
        upm.VARIANTS["tiny"],
        uv_resolution=r,
        seed_channels=128,
        channels=ch,
        color_channels=tuple(max(c // 2, 16) for c in ch),
        encoder_channels=tuple(reversed(ch)),
    )
    return nnx.jit(lambda: upm.UPM(cfg, rngs=nnx.Rngs(0)))()  # one compile, not one per param


def _median_ms(fn, repeats: int) -> tuple[float, float]:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = 1000 * (time.perf_counter() - t)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(1000 * (time.perf_counter() - t))
    return first, float(np.median(times))


def bench(r: int, sizes: list[int], repeats: int) -> list[dict]:
    rec = make_identity(0, SynthConfig(uv_resolution=r, image_size=64, n_frames=1), seed=0)
    av = Avatar.create(model_for(r), rec["uv_texture"] / 255.0, rec["uv_geometry"], rec["uv_mask"])
    e, gaze, viewmat = rec["view_expression"][1], rec["view_gaze"][1], rec["view_viewmat"][1]
    view = upm.view_direction(viewmat)
    first, drive_ms = _median_ms(lambda: av.drive(e, view, gaze)["means"], repeats)
    rows = []
    for h in sizes:
        k = rec["view_K"][1].copy()
        k[:2] *= h / rec["view_image"].shape[2]
        out = {}

        def frame(k=k, h=h, out=out):
            img, _, meta = av.render(viewmat, k, h, h, expression=e, gaze=gaze)
            out["meta"] = meta
            return img

        compile_ms, render_ms = _median_ms(frame, repeats)
        meta = out["meta"]
        rows.append(
            {
                "uv_map": r,
                "N": r * r,
                "visible_texels": int(rec["uv_mask"].sum()),
                "size": h,
                "drive_ms": round(drive_ms, 2),
                "drive_compile_ms": round(first, 1),
                "render_ms": round(render_ms, 2),
                "render_first_ms": round(compile_ms, 1),
                "fps": round(1000 / render_ms, 2),
                "n_isects": int(meta["n_isects"][0]),
                "isect_capacity": int(meta["isect_capacity"]),
                "isect_overflow": int(meta["isect_overflow"][0]),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--workloads", default="128@256,128@512,256@256,256@512", help="map@pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work: dict[int, list[int]] = {}
    for w in args.workloads.split(","):
        r, h = map(int, w.split("@"))
        work.setdefault(r, []).append(h)
    rows = [row for r, sizes in work.items() for row in bench(r, sizes, args.repeats)]
    backend = jax.default_backend()
    result = {
        "benchmark": "upm_drive",
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "repeats": args.repeats,
        "command": "python " + " ".join(sys.argv),
        "all_overflow_zero": all(r["isect_overflow"] == 0 for r in rows),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # > cpu_count: other work shared the cores
        "rows": rows,
    }
    write_result(result, args.out or REPO / f"benchmarks/results/upm_drive_{backend}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
