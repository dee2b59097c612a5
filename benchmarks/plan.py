"""Scale plans: AOT-compile train steps for virtual pods and record `fica plan`'s JSON.

  python benchmarks/plan.py                       # every plan below whose config exists
  python benchmarks/plan.py --only dit_paper_64   # one of them

Each writes `benchmarks/results/plan_NAME.json` (the `fica plan` report plus the command that made
it). Nothing here runs on an accelerator. Plans without a topology compile for fake CPU devices;
`*_tpu` plans are compiled by the TPU compiler itself for a v5p slice that is not there
(`fica plan --topology`, libtpu on this CPU host; skipped with a note when libtpu is absent). The
numbers are the compiler's memory analysis, HLO-counted hardware and model FLOPs, collective bytes,
per-op HBM bytes and a per-op roofline with MaxText-convention MFU (docs/architecture.md §9-§10).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fica_jax.errors import UserError  # noqa: E402
from fica_jax.plan.planner import plan_in_subprocess  # noqa: E402

# name: (config, mesh, overrides, TPU topology or None for fake CPU devices)
PLANS = {
    "toy_wide_64": ("configs/toy.py:wide", "data=8,fsdp=8", ["--config.data.batch_size=128"], None),
    "dit_paper_64": ("configs/dit.py:paper", "data=8,fsdp=8", [], None),
    "dit_paper_64_fullfsdp": ("configs/dit.py:paper", "data=1,fsdp=64", [], None),
    "dit_paper1024_16": ("configs/dit.py:paper1024", "data=1,fsdp=16", [], None),
    "dit_paper_64_tpu": ("configs/dit.py:paper", "data=2,fsdp=32", [], "v5p:4x4x4"),
    "dit_paper_64_8x8_tpu": ("configs/dit.py:paper", "data=8,fsdp=8", [], "v5p:4x4x4"),
    "dit_paper_64_4x16_tpu": ("configs/dit.py:paper", "data=4,fsdp=16", [], "v5p:4x4x4"),
    "dit_paper_64_fullfsdp_tpu": ("configs/dit.py:paper", "data=1,fsdp=64", [], "v5p:4x4x4"),
    "dit_paper1024_16_tpu": ("configs/dit.py:paper1024", "data=1,fsdp=16", [], "v5p:2x2x4"),
    # the renderer's stages: their compositing kernel priced analytically (`renderer` section)
    "upm_paper_64_tpu": ("configs/upm.py:paper", "data=64", [], "v5p:4x4x4"),
    "refiner_paper_64_tpu": ("configs/refiner.py:paper", "data=64", [], "v5p:4x4x4"),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", action="append", help="plan name(s) to run; default all")
    p.add_argument("--chips", default="v5p,v6e,a100,h100")
    args = p.parse_args()
    names = args.only or list(PLANS)
    for name in names:
        config, mesh, overrides, topology = PLANS[name]
        if not (REPO / config.split(":")[0]).exists():
            print(f"skip {name}: {config} not in the repository", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        try:
            report = plan_in_subprocess(config, mesh, args.chips, overrides, topology)
        except UserError as e:  # e.g. no libtpu for a *_tpu plan
            print(f"skip {name}: {e}", file=sys.stderr)
            continue
        cmd = ["fica plan --config", config, "--mesh", mesh, "--chips", args.chips, *overrides]
        report["command"] = " ".join(cmd + (["--topology", topology] if topology else []))
        report["wall_s"] = time.perf_counter() - t0
        out = REPO / "benchmarks" / "results" / f"plan_{name}.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        v5p = report["roofline"].get("v5p", {})
        summary = {
            "params": report["param_count"],
            "peak_bytes_per_device": report["per_device_bytes"]["peak_estimate"],
            "hardware_flops_per_device": report["flops"]["hardware_per_device_per_step"],
            "model_flops_per_device": report["flops"]["model_per_device_per_step"],
            "collective_bytes_per_device": report["collective_bytes_per_device"]["total"],
            "hardware_over_model": report["flops"]["hardware_over_model"],
            "v5p_compute_s": v5p.get("compute_s"),
            "v5p_hbm_s": v5p.get("hbm_s"),
            "v5p_op_roofline_s": v5p.get("op_roofline_s"),
            "v5p_async_copy_s": v5p.get("async_copy_s"),
            "v5p_collective_s": v5p.get("collective_s"),
            "v5p_step_s": v5p.get("step_s"),
            "v5p_mfu": v5p.get("mfu"),
            "v5p_mfu_no_overlap": v5p.get("mfu_no_overlap"),
        }
        if report.get("renderer"):
            summary["v5p_step_with_renderer"] = report["renderer"]["step"].get("v5p")
        print(json.dumps({name: summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
