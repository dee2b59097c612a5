"""A saved avatar driven + rendered by the PyTorch runtime and by JAX, side by side (one process).

  python benchmarks/gsplat_render.py                      # writes results/gsplat_render_<dev>.json
  python benchmarks/gsplat_render.py --avatar DIR --size 512 --frames 5

Backends: `jax` (`Avatar.drive` / `Avatar.render`), `torch-cpu` (`TorchAvatar`, backend "cpu":
gsplat's torch projection + the runtime's tile compositor) and, with CUDA, `torch-gsplat`
(`gsplat.rasterization`). Without `--avatar` the bundle is `benchmarks/upm_drive.py`'s: its
untrained UPM for a `--uv` map on synthetic identity 0, saved with `Avatar.save`. Each backend
renders that identity's dome frame 1 (camera scaled to `--size` px): `drive_ms` is one frame's
Gaussians, `render_ms` drive + rasterisation (medians over `--frames` after a first call,
reported separately), and `psnr_vs_jax` compares each torch image with the JAX one.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_result  # noqa: E402
from benchmarks.upm_drive import model_for  # noqa: E402
from data_pipelines.synthetic.generator import SynthConfig, make_identity  # noqa: E402
from fica_jax.avatar.bundle import Avatar  # noqa: E402
from fica_jax.export.torch_runtime import TorchAvatar  # noqa: E402
from fica_jax.models.upm import view_direction  # noqa: E402
from fica_jax.quality.image import psnr  # noqa: E402


def _timed(fn, frames: int) -> tuple[float, float, object]:
    """(first call ms, median ms over `frames` more, last output)."""

    def once():
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return 1000 * (time.perf_counter() - t), out

    first, out = once()
    times = []
    for _ in range(frames):
        ms, out = once()
        times.append(ms)
    return first, float(np.median(times)), out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--avatar", default=None, help="a saved avatar folder (default: built)")
    p.add_argument("--uv", type=int, default=64, help="UV map of the built avatar")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.torch_threads:  # on a shared, oversubscribed CPU one thread can be 10x faster
        torch.set_num_threads(args.torch_threads)
    r = args.uv
    rec = make_identity(0, SynthConfig(uv_resolution=r, image_size=64, n_frames=1), seed=0)
    if args.avatar:
        directory = pathlib.Path(args.avatar)
        av = Avatar.load(directory)
    else:
        tex, geo, mask = rec["uv_texture"] / 255.0, rec["uv_geometry"], rec["uv_mask"]
        av = Avatar.create(model_for(r), tex, geo, mask)
        directory = av.save(pathlib.Path(tempfile.mkdtemp()) / "avatar")
    e, gaze, viewmat = rec["view_expression"][1], rec["view_gaze"][1], rec["view_viewmat"][1]
    k = rec["view_K"][1].copy()
    k[:2] *= args.size / rec["view_image"].shape[2]
    h = args.size
    view = np.asarray(view_direction(viewmat))

    backends = {"jax": None, "torch-cpu": "cpu"}
    if torch.cuda.is_available():
        backends["torch-gsplat"] = "gsplat"
    rows, ref = [], None
    for name, backend in backends.items():
        if backend is None:
            drive = lambda: av.drive(e, view, gaze)["means"]
            render = lambda: av.render(viewmat, k, h, h, expression=e, gaze=gaze)[:2]
        else:
            dev = "cuda" if backend == "gsplat" else "cpu"
            tav = TorchAvatar.load(directory, device=dev)
            drive = lambda tav=tav: tav.drive(e, view, gaze)["means"]
            render = lambda tav=tav, b=backend: tav.render(
                viewmat, k, h, h, expression=e, gaze=gaze, backend=b
            )[:2]
        drive_first, drive_ms, _ = _timed(drive, args.frames)
        render_first, render_ms, (img, alpha) = _timed(render, args.frames)
        img = np.asarray(img.cpu() if torch.is_tensor(img) else img)
        ref = img if ref is None else ref
        row = {
            "backend": name,
            "uv_map": r,
            "N": r * r,
            "size": h,
            "drive_ms": round(drive_ms, 2),
            "drive_first_ms": round(drive_first, 1),
            "render_ms": round(render_ms, 2),
            "render_first_ms": round(render_first, 1),
            "fps": round(1000 / render_ms, 2),
            "psnr_vs_jax": round(float(psnr(img, ref)), 1),
            "coverage": round(
                float((np.asarray(alpha.cpu() if torch.is_tensor(alpha) else alpha) > 0.5).mean()),
                3,
            ),  # fmt: skip
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {
        "benchmark": "gsplat_render",
        "device": device,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "avatar": str(args.avatar) if args.avatar else f"upm_drive.model_for({r}), identity 0",
        "frames": args.frames,
        "command": "python " + " ".join(sys.argv),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # > cpu_count: other work shared the cores
        "rows": rows,
    }
    tag = "cuda" if torch.cuda.is_available() else "cpu"
    write_result(result, args.out or REPO / f"benchmarks/results/gsplat_render_{tag}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
