"""Synthetic capture throughput: capture render and `make_identity` at the default sizes.

  python benchmarks/synth.py [--identities 8]

Prints JSON and writes benchmarks/results/synth_cpu.json. The issue-2 target is 8 identities
synthesised *and written* by `fica data synth` in under 2 minutes on 2 CPU cores.
"""

import argparse
import json
import os
import pathlib
import tempfile
import time

import jax


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=8)
    args = ap.parse_args()

    from data_pipelines.synth import synthesize
    from data_pipelines.synthetic.generator import SynthConfig, make_identity

    cfg = SynthConfig()
    t = time.perf_counter()
    make_identity(0, cfg, 0)
    first = time.perf_counter() - t
    times = []
    for i in range(1, 4):
        t = time.perf_counter()
        make_identity(i, cfg, 0)
        times.append(time.perf_counter() - t)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        synthesize(pathlib.Path(tmp) / "d", args.identities, cfg, progress=False)
        cli_total = time.perf_counter() - t
    result = {
        "device": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "config": {
            "uv_resolution": cfg.uv_resolution,
            "image_size": cfg.image_size,
            "n_frames": cfg.n_frames,
        },
        "make_identity_first_call_s": round(first, 2),
        "make_identity_warm_s": [round(x, 2) for x in times],
        f"synthesize_{args.identities}_identities_s": round(cli_total, 1),
    }
    print(json.dumps(result, indent=2))
    out = pathlib.Path(__file__).parent / "results" / "synth_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
