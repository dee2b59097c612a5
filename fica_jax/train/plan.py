"""`fica plan`: compile the real train step ahead of time for a virtual pod and print its costs.

The step is built by the same code as `fica train` (`fica_jax/train/step.py`) on a mesh of fake CPU
devices (`--xla_force_host_platform_device_count`, set in a fresh subprocess because the device
count is fixed once JAX starts). Nothing is allocated: the state and batch are abstract
`ShapeDtypeStruct`s carrying their shardings, and the step is `lower(...).compile()`d.

Reported (per device unless named global): parameter count; bytes of params / optimizer state /
EMA from their shardings; XLA's memory analysis (arguments, outputs, temporaries = activations);
FLOPs per step from the HLO with while-loop trip counts applied (`hlo_stats`) next to XLA's own
`cost_analysis()` figure (which counts a scanned body once, docs/architecture.md §10); collective bytes
by kind; and a roofline per chip (docs/architecture.md §9): compute time = FLOPs / peak, collective
time = bytes / interconnect bandwidth, step time = max of the two (perfect overlap, so an upper
bound on speed) and the MFU that implies. The HBM term is left out: the CPU compiler's fusion
decisions say little about a TPU's memory traffic.

  python -m fica_jax.train.plan --config configs/toy.py --mesh data=2,fsdp=4
  python -m fica_jax.train.plan --golden configs/dit.py:paper --mesh data=8,fsdp=8 \
      --out tests/golden/sharding_dit_paper.json      # regenerate a golden sharding file
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from fica_jax.errors import UserError
from fica_jax.train.chips import CHIPS

REPO = pathlib.Path(__file__).resolve().parents[2]


def parse_mesh(text: str) -> dict[str, int]:
    """`data=8,fsdp=8[,tensor=1]` -> {"data": 8, "fsdp": 8, "tensor": 1}."""
    out = {}
    for part in text.split(","):
        key, eq, value = part.strip().partition("=")
        if not eq or key not in ("data", "fsdp", "tensor") or not value.isdigit() or value == "0":
            raise UserError(
                f"--mesh {text!r}: expected comma-separated data=D,fsdp=F[,tensor=T] with "
                f"positive integers; bad part {part!r}"
            )
        out[key] = int(value)
    return out


def parse_chips(text: str) -> list[str]:
    chips = [c.strip().lower() for c in text.split(",") if c.strip()]
    unknown = [c for c in chips if c not in CHIPS]
    if unknown:
        raise UserError(f"--chips {text!r}: unknown {unknown}; expected some of {sorted(CHIPS)}")
    return chips


def _tree_bytes(tree) -> tuple[int, int]:
    """(global elements, bytes held by one device) of an abstract tree with shardings."""
    import jax
    import numpy as np

    count, per_device = 0, 0
    for a in jax.tree.leaves(tree):
        count += math.prod(a.shape)
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        per_device += math.prod(shard) * np.dtype(a.dtype).itemsize
    return count, per_device


def roofline(flops: float, coll_bytes: float, mem_bytes: float, chips: Sequence[str]) -> dict:
    out = {}
    for chip in chips:
        c = CHIPS[chip]
        compute_s = flops / c.peak_flops
        comm_s = coll_bytes / c.link_bytes_per_s
        step_s = max(compute_s, comm_s)
        out[chip] = {
            "compute_s": compute_s,
            "collective_s": comm_s,
            "step_s": step_s,
            "step_s_no_overlap": compute_s + comm_s,
            "mfu": compute_s / step_s if step_s > 0 else None,
            "fits_hbm": mem_bytes <= c.hbm_bytes,
        }
    return out


def plan(cfg, mesh_shape: Mapping[str, int], chips: Sequence[str]) -> dict:
    """Compiles the train step of `cfg` for `mesh_shape` on the available (fake) devices."""
    import jax

    from fica_jax import sharding as shd
    from fica_jax.train.hlo_stats import analyze
    from fica_jax.train.metrics import compiled_flops
    from fica_jax.train.stage import get_stage
    from fica_jax.train.step import build

    stage = get_stage(cfg.stage)
    mesh = shd.make_mesh(dict(mesh_shape))
    n_dev = mesh.size
    batch = int(cfg.data.batch_size)
    if batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise UserError(
            f"config data.batch_size={batch} does not split over data x fsdp = "
            f"{mesh.shape['data'] * mesh.shape['fsdp']} devices"
        )
    t0 = time.perf_counter()
    setup = build(cfg, stage, mesh)
    lowered = setup.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    s = setup.abstract_state
    n_params, params_b = _tree_bytes(s["params"])
    _, opt_b = _tree_bytes(s["opt"])
    _, ema_b = _tree_bytes(s["ema"])
    mem = compiled.memory_analysis()
    peak_mem = mem.argument_size_in_bytes + mem.output_size_in_bytes
    peak_mem += mem.temp_size_in_bytes - mem.alias_size_in_bytes
    hlo = analyze(compiled.as_text())
    flops = hlo.flops
    return {
        "config": {"stage": cfg.stage, "model": cfg.model.to_dict(), "train": cfg.train.to_dict()},
        "mesh": dict(mesh.shape),
        "devices": n_dev,
        "global_batch": batch,
        "param_count": n_params,
        "per_device_bytes": {
            "params": params_b,
            "optimizer_state": opt_b,
            "ema": ema_b,
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,
            "temp_activations": mem.temp_size_in_bytes,
            "peak_estimate": peak_mem,
        },
        "flops": {
            "per_device_per_step": flops,
            "global_per_step": flops * n_dev,
            "xla_cost_analysis_per_device": compiled_flops(compiled),
            "while_trip_counts": hlo.while_trip_counts,
            "note": "dot+conv FLOPs from the compiled HLO with loop trip counts applied "
            "(includes remat recomputation); XLA's cost_analysis counts loop bodies once",
        },
        "collective_bytes_per_device": {
            **hlo.collective_bytes,
            "total": hlo.total_collective_bytes,
            "note": "ring-algorithm bytes sent per device, loops unrolled, from the CPU-compiled "
            "HLO: gradient reductions may show as all-reduce where TPU/GPU compilers emit "
            "reduce-scatter, so this is an upper bound",
        },
        "roofline": roofline(flops, hlo.total_collective_bytes, peak_mem, chips),
        "compile_s": {"trace_lower": t1 - t0, "compile": t2 - t1},
        "jax_version": jax.__version__,
    }


def sharding_table(cfg, mesh_shape: Mapping[str, int]) -> dict[str, list]:
    """{param path: PartitionSpec as a list} on an abstract mesh (no devices, no arrays)."""
    import jax
    from flax import nnx
    from jax.sharding import AbstractMesh, AxisType

    from fica_jax import sharding as shd
    from fica_jax.train.stage import get_stage

    stage = get_stage(cfg.stage)
    sizes = tuple(int(mesh_shape.get(a, 1)) for a in shd.MESH_AXES)
    mesh = AbstractMesh(sizes, shd.MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes))
    model = nnx.eval_shape(lambda: stage.make_model(cfg, nnx.Rngs(params=0, default=0)))
    params = nnx.state(model, nnx.Param)
    specs = shd.param_specs(params, shd.rules_for(stage.rules), mesh).to_pure_dict()
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, tuple))[0]
    shapes = dict(jax.tree_util.tree_flatten_with_path(params.to_pure_dict())[0])
    out = {}
    for path, spec in flat:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        out[key] = {
            "shape": list(shapes[path].shape),
            "spec": [list(a) if isinstance(a, tuple) else a for a in spec],
        }
    return dict(sorted(out.items()))


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=float)


def dumps_table(table: Mapping[str, object]) -> str:
    """One parameter per line, so a layout change reads as a one-line diff in review."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in table.items()]
    return "{\n" + ",\n".join(lines) + "\n}"


def plan_in_subprocess(
    config: str, mesh_text: str, chips_text: str, overrides: Sequence[str] = ()
) -> dict:
    """Runs `plan` in a fresh Python whose JAX sees prod(mesh) fake CPU devices."""
    mesh = parse_mesh(mesh_text)
    parse_chips(chips_text)
    n = math.prod(mesh.values())
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "fica_jax.train.plan", "--config", config, "--mesh", mesh_text]
    cmd += ["--chips", chips_text, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if lines and lines[-1].startswith("error: "):
            raise UserError(lines[-1].removeprefix("error: "))
        raise RuntimeError(f"fica plan subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the planning subprocess (device count already set by the parent)."""
    p = argparse.ArgumentParser(prog="python -m fica_jax.train.plan")
    p.add_argument("--config", help="FILE[:ARG] to plan")
    p.add_argument("--golden", help="FILE[:ARG]: write its per-parameter sharding specs instead")
    p.add_argument("--mesh", required=True)
    p.add_argument("--chips", default="v5p,v6e,a100,h100")
    p.add_argument("--out", default=None)
    args, extra = p.parse_known_args(argv)
    from fica_jax.config import load_config

    try:
        mesh = parse_mesh(args.mesh)
        if args.golden:
            text = dumps_table(sharding_table(load_config(args.golden, extra), mesh))
        else:
            if not args.config:
                raise UserError("give --config FILE[:ARG] (or --golden FILE[:ARG])")
            text = dumps(plan(load_config(args.config, extra), mesh, parse_chips(args.chips)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
