"""`fica plan`: compile the real train step ahead of time for a virtual pod and print its costs.

The step is built by the same code as `fica train` (`fica_jax/train/step.py`) on a mesh of fake CPU
devices (`--xla_force_host_platform_device_count`, set in a fresh subprocess because the device
count is fixed once JAX starts). Nothing is allocated: the state and batch are abstract
`ShapeDtypeStruct`s carrying their shardings, and the step is `lower(...).compile()`d.

Reported (per device unless named global): parameter count; bytes of params / optimizer state /
EMA from their shardings; XLA's memory analysis (arguments, outputs, temporaries = activations);
FLOPs per step, two ways (docs/architecture.md §9): *hardware* FLOPs, counted in the compiled
step's HLO with while-loop trip counts applied (`hlo_stats`; includes remat recomputation), next
to XLA's own `cost_analysis()` figure (which counts a scanned body once, §10), and *model* FLOPs
(MaxText's MFU numerator: 3 x the forward's matmul/conv/attention FLOPs, remat off,
`model_flops`); collective bytes by kind, counted in the step as the SPMD partitioner left it
(`collectives`); HBM bytes and FLOPs of every op of the compiled per-device step
(`hlo_stats.op_costs`); and a roofline per chip (`chips.roofline`): op time = sum over ops of
max(FLOPs / peak, bytes / HBM bandwidth), async DMA and collective time beside it, step time =
their max (perfect overlap) or their sum (none), MFU = model FLOPs / (peak x step time) for both.
By default the op bytes and the memory analysis are the CPU compiler's: it fuses less than a
TPU/GPU compiler, runs bf16 matmuls and elementwise ops in f32 and keeps f32 copies of some bf16
tensors, so both are pessimistic. `--topology v5p:4x4x4` compiles the same step with the TPU
compiler instead (libtpu on this CPU host, `topology_devices`): TPU fusion, collectives and
memory analysis, roofline for that chip only.

  python -m fica_jax.plan.planner --config configs/toy.py --mesh data=2,fsdp=4
  python -m fica_jax.plan.planner --config configs/dit.py:paper --mesh data=2,fsdp=32 \
      --topology v5p:4x4x4                             # the TPU compiler's program
  python -m fica_jax.plan.planner --golden configs/dit.py:paper --mesh data=8,fsdp=8 \
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
import tempfile
import time
from collections.abc import Mapping, Sequence

from fica_jax.errors import UserError
from fica_jax.files import write_text
from fica_jax.perf import hlo_stats as hs
from fica_jax.perf.chips import CHIPS, roofline, top_ops

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


# `pip install --target` libtpu here (or name another folder in FICA_LIBTPU / `--libtpu`).
LIBTPU_DIR = pathlib.Path(os.environ.get("FICA_LIBTPU", "~/.cache/fica/libtpu")).expanduser()
TOPOLOGY_CHIPS = {"v5p": "v5p", "v6e": "v6e", "v5e": "v5e", "v5litepod": "v5e"}
TOPOLOGY_ENV = {  # where the environment does not say otherwise
    "JAX_PLATFORMS": "cpu",  # libtpu only compiles; JAX's own backend stays the CPU
    "TPU_SKIP_MDS_QUERY": "1",  # do not look for a TPU VM's metadata server
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # no chip is touched, so plans may run side by side
}
# A plan reads what the compiler does (SPMD dumps, HLO): a cached executable would skip it.
NO_CACHE_ENV = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


def topology_chip(topology: str) -> str:
    """`v5p:4x4x4` -> "v5p": the `CHIPS` entry whose compiler the plan runs."""
    name, sep, dims = topology.partition(":")
    chip = TOPOLOGY_CHIPS.get(name.lower())
    if not sep or chip is None or not all(d.isdigit() for d in dims.split("x")):
        raise UserError(
            f"--topology {topology!r}: expected CHIP:AxBxC with CHIP one of "
            f"{sorted(TOPOLOGY_CHIPS)}, e.g. v5p:4x4x4 (64 chips) or v6e:8x8"
        )
    return chip


def topology_devices(topology: str, libtpu: str | None = None) -> list:
    """The devices of a TPU slice that need not exist: libtpu's topology description, so
    `compile()` runs the TPU compiler on this (CPU) host (MaxText's `train_compile.py` way).
    libtpu comes from `libtpu` (a folder made by `pip install --target`), `LIBTPU_DIR`, or the
    environment; it never becomes JAX's backend here (the parent sets JAX_PLATFORMS=cpu)."""
    topology_chip(topology)
    for d in (libtpu, LIBTPU_DIR):
        if d and pathlib.Path(d).is_dir() and str(d) not in sys.path:
            sys.path.insert(0, str(d))
    try:
        import libtpu  # noqa: F401
    except ImportError:
        where = libtpu or LIBTPU_DIR
        raise UserError(
            f"--topology needs libtpu (the TPU compiler), not found in {where} or the "
            f"environment: pip install --target {where} 'libtpu==0.0.42.*'"
        ) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu's own message names what it refused
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--topology {topology!r}: libtpu refused it ({msg})") from None
    return list(desc.devices)


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


def model_flops(cfg, stage) -> float:
    """Global *model* FLOPs of one train step: 3 x the dot/conv FLOPs of the loss forward.

    MaxText's convention (docs/architecture.md §9): the matmul/conv/attention work of forward +
    backward (backward = 2 x forward), independent of remat and of sharding. Measured, not
    modelled, so it holds for any stage: the stage's loss is built with `train.remat="none"`,
    jitted *forward only* on one device for the global batch (all microbatches of a step), compiled
    and counted by `hlo_stats.analyze` with loop trip counts.
    """
    import jax
    from flax import nnx

    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.train.remat = "none"
    plain = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
    model = nnx.eval_shape(lambda: stage.make_model(cfg, nnx.Rngs(params=0, default=0)))
    graphdef, state = nnx.split(model)
    loss_fn = stage.make_loss(cfg)

    def forward(state, batch, rng):
        return loss_fn(nnx.merge(graphdef, state), batch, rng)[0]

    batch = plain(dict(stage.batch_spec(cfg)))
    rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
    compiled = jax.jit(forward).lower(plain(state), batch, rng).compile()  # unsharded
    return 3.0 * hs.analyze(compiled.as_text()).flops


SPMD_PASS = "spmd-partitioning"  # the pass after which XLA dumps the partitioned step


def spmd_dump_flags(dump_dir: str) -> str:
    """XLA_FLAGS that dump the train step's HLO right after SPMD partitioning into `dump_dir`."""
    return (
        f"--xla_dump_to={dump_dir} --xla_dump_hlo_pass_re=^{SPMD_PASS}$ "
        "--xla_dump_hlo_module_re=^jit_step_fn$"
    )


def _spmd_hlo(dump_dir: str | None) -> str | None:
    if not dump_dir:
        return None
    files = sorted(pathlib.Path(dump_dir).glob(f"*jit_step_fn*after_{SPMD_PASS}.*.txt"))
    return files[-1].read_text() if files else None


def collectives(compiled_text: str, spmd_text: str | None, topology: str | None = None) -> dict:
    """Collective bytes per device by kind, as a TPU pipeline would send them (see `plan`):
    counted in the TPU-compiled step itself with `topology`."""
    if topology:
        tpu = hs.analyze(compiled_text, reduce_scatter=True)
        return {
            **tpu.collective_bytes,
            "total": tpu.total_collective_bytes,
            "source": f"TPU-compiled HLO ({topology}, libtpu): as the TPU will send them; its "
            "all-reduce-scatter fusions (all-reduce + 1/n dynamic-slice) count as reduce-scatter",
        }
    cpu = hs.analyze(compiled_text)
    cpu_bytes = {**cpu.collective_bytes, "total": cpu.total_collective_bytes}
    if spmd_text is None:
        return {**cpu_bytes, "source": "cpu-compiled HLO (no SPMD dump): an upper bound"}
    tpu = hs.analyze(spmd_text, reduce_scatter=True)
    return {
        **tpu.collective_bytes,
        "total": tpu.total_collective_bytes,
        "source": f"HLO after XLA's {SPMD_PASS} pass, all-reduce + 1/n dynamic-slice counted "
        "as reduce-scatter",
        "cpu_compiled": cpu_bytes,
    }


_CPU_NOTE = (
    "An estimate from the CPU-compiled step, whose fusion decisions differ from a TPU/GPU "
    "compiler's: the CPU fuses less, runs bf16 matmuls and elementwise math in f32 (f32 matmul "
    "operands, bf16<->f32 convert fusions, kind 'convert' in top_ops) and splits the optimizer "
    "into several passes, so op_roofline_s is likely pessimistic (`fica plan --topology` reads "
    "the TPU compiler's own program). Collectives are counted after SPMD partitioning (bf16 as "
    "the program sends them, not the CPU's f32 upcast)"
)
_TPU_NOTE = (
    "Read from the TPU compiler's own program for this slice (libtpu, compiled on this host "
    "without a chip): its fusions, layouts, bf16 collectives and reduce-scatters, and its memory "
    "analysis. What remains an estimate is the roofline itself (op time = max(FLOPs / peak, bytes "
    "/ HBM bandwidth), collectives at the link bandwidth, no latency or scheduling term)"
)


def plan(
    cfg,
    mesh_shape: Mapping[str, int],
    chips: Sequence[str],
    hlo_out: str | None = None,
    spmd_dump_dir: str | None = None,
    topology: str | None = None,
    libtpu: str | None = None,
) -> dict:
    """Compiles the train step of `cfg` for `mesh_shape` on the available (fake) devices, or with
    `topology` (e.g. `v5p:4x4x4`) for that TPU slice by the TPU compiler (`topology_devices`).

    `hlo_out`: also write the compiled, partitioned HLO text there (for reading collectives).
    `spmd_dump_dir`: where this process's XLA dumps the step after SPMD partitioning
    (`spmd_dump_flags`, set by `plan_in_subprocess`); collectives are counted there, as the
    partitioner placed them. The CPU pipeline then upcasts bf16 collectives to f32 (it has no
    bf16 all-reduce/all-gather) and never forms reduce-scatters, neither of which a TPU does;
    without a dump the CPU-compiled figure (an upper bound) is reported. A TPU-compiled step
    is counted as compiled: its fusion, bf16 collectives, reduce-scatters and memory analysis are
    the TPU's own, and the roofline is given for that chip only.
    """
    import jax

    from fica_jax import sharding as shd
    from fica_jax.train.metrics import compiled_flops
    from fica_jax.train.stage import get_stage
    from fica_jax.train.step import build

    stage = get_stage(cfg.stage)
    devices = topology_devices(topology, libtpu) if topology else None
    if devices is not None and len(devices) != math.prod(mesh_shape.values()):
        raise UserError(
            f"--mesh {dict(mesh_shape)} needs {math.prod(mesh_shape.values())} devices; "
            f"--topology {topology} has {len(devices)}"
        )
    if topology:
        chips = [topology_chip(topology)]
    mesh = shd.make_mesh(dict(mesh_shape), devices)
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
    model_global = model_flops(cfg, stage)
    t3 = time.perf_counter()

    s = setup.abstract_state
    n_params, params_b = _tree_bytes(s["params"])
    _, opt_b = _tree_bytes(s["opt"])
    _, ema_b = _tree_bytes(s["ema"])
    mem = compiled.memory_analysis()
    peak_mem = mem.argument_size_in_bytes + mem.output_size_in_bytes
    peak_mem += mem.temp_size_in_bytes - mem.alias_size_in_bytes
    text = compiled.as_text()
    if hlo_out:
        pathlib.Path(hlo_out).write_text(text)
    hlo = hs.analyze(text)
    ops = hs.op_costs(text)
    coll = collectives(text, _spmd_hlo(spmd_dump_dir), topology)
    flops = hlo.flops
    model_dev = model_global / n_dev
    return {
        "config": {"stage": cfg.stage, "model": cfg.model.to_dict(), "train": cfg.train.to_dict()},
        "mesh": dict(mesh.shape),
        "devices": n_dev,
        "compiler": f"tpu ({topology}, libtpu)" if topology else "cpu (fake devices)",
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
            "model_per_device_per_step": model_dev,
            "model_global_per_step": model_global,
            "hardware_per_device_per_step": flops,
            "hardware_global_per_step": flops * n_dev,
            "hardware_over_model": flops / model_dev if model_dev > 0 else None,
            "per_device_per_step": flops,  # = hardware_per_device_per_step (older readers)
            "xla_cost_analysis_per_device": compiled_flops(compiled),
            "while_trip_counts": hlo.while_trip_counts,
            "note": "model FLOPs (MaxText MFU convention, docs/architecture.md §9): 3 x the "
            "dot+conv FLOPs of the stage loss's forward pass for the global batch, compiled with "
            "remat off on one device; remat recomputation and partitioner duplication are not "
            "counted, and per-device = global / devices. hardware FLOPs: dot+conv FLOPs of the "
            "compiled, partitioned train step on one device with loop trip counts applied "
            "(includes remat recomputation). XLA's cost_analysis counts loop bodies once",
        },
        "collective_bytes_per_device": {
            **coll,
            "note": "ring-algorithm bytes sent per device, loops unrolled: all-gather (n-1)/n x "
            "result, reduce-scatter (n-1) x result, all-reduce 2 (n-1)/n x operand. Counted in "
            "the step as partitioned (bf16 where the program moves bf16; an all-reduce feeding "
            "only 1/n dynamic-slices is the reduce-scatter TPU/GPU compilers emit for it). "
            "`cpu_compiled`: the same count on the CPU executable, where bf16 collectives are "
            "upcast to f32 and reduce-scatters stay all-reduce + slice (an upper bound)",
        },
        "roofline": roofline(flops, model_dev, coll["total"], peak_mem, chips, ops),
        "roofline_note": "per chip, per device: compute_s = hardware FLOPs / peak; hbm_s = HBM "
        "bytes of all ops / HBM bandwidth; op_roofline_s = sum over the step's ops of max(op "
        "FLOPs / peak, op bytes / HBM bandwidth); collective_s = collective bytes / interconnect; "
        "step_s = max(op_roofline_s, collective_s) (perfect overlap), step_s_no_overlap = their "
        "sum; mfu / mfu_no_overlap = model FLOPs / (peak x step_s / step_s_no_overlap) (MaxText "
        "MFU); hfu = hardware FLOPs / (peak x step_s). Ops: top-level instructions of ENTRY and of "
        "while bodies x trip count; a fusion moves its operands and outputs, a dynamic-slice reads "
        "its slice, a dynamic-update-slice writes its update in place. Peak matmul throughput is "
        "assumed for every dot (no efficiency factor); no latency term. "
        + (_TPU_NOTE if topology else _CPU_NOTE),
        "top_ops": top_ops(ops, chips[0]) if chips else None,
        "compile_s": {"trace_lower": t1 - t0, "compile": t2 - t1, "model_flops": t3 - t2},
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
    config: str,
    mesh_text: str,
    chips_text: str,
    overrides: Sequence[str] = (),
    topology: str | None = None,
    libtpu: str | None = None,
) -> dict:
    """Runs `plan` in a fresh Python whose JAX sees prod(mesh) fake CPU devices, or, with
    `topology`, the TPU slice's devices from libtpu (`topology_devices`)."""
    mesh = parse_mesh(mesh_text)
    parse_chips(chips_text)
    if topology:
        topology_chip(topology)
    n = math.prod(mesh.values())
    env = dict(os.environ) | NO_CACHE_ENV
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "fica_jax.plan.planner", "--config", config, "--mesh", mesh_text]
    cmd += ["--chips", chips_text]
    with tempfile.TemporaryDirectory(prefix="fica_plan_") as dump:
        if topology:  # no fake devices
            env = {**TOPOLOGY_ENV, **env}
            cmd += ["--topology", topology] + (["--libtpu", libtpu] if libtpu else [])
        else:
            flags = f"--xla_force_host_platform_device_count={n} {spmd_dump_flags(dump)}"
            env["XLA_FLAGS"] = flags
            cmd += ["--spmd-dump-dir", dump]
        proc = subprocess.run(cmd + list(overrides), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        if lines and lines[-1].startswith("error: "):
            raise UserError(lines[-1].removeprefix("error: "))
        raise RuntimeError(f"fica plan subprocess failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the planning subprocess (device count already set by the parent)."""
    p = argparse.ArgumentParser(prog="python -m fica_jax.plan.planner")
    p.add_argument("--config", help="FILE[:ARG] to plan")
    p.add_argument("--golden", help="FILE[:ARG]: write its per-parameter sharding specs instead")
    p.add_argument("--mesh", required=True)
    p.add_argument("--chips", default="v5p,v6e,a100,h100")
    p.add_argument("--out", default=None)
    p.add_argument("--hlo-out", default=None, help="also write the compiled HLO text here")
    p.add_argument("--spmd-dump-dir", default=None, help="XLA's dump dir (spmd_dump_flags)")
    p.add_argument("--topology", default=None, help="TPU slice, e.g. v5p:4x4x4 (needs libtpu)")
    p.add_argument("--libtpu", default=None, help="folder holding the libtpu package")
    args, extra = p.parse_known_args(argv)
    os.environ.update(NO_CACHE_ENV)
    if args.topology:  # run directly, not through `plan_in_subprocess`: same environment
        for key, value in TOPOLOGY_ENV.items():
            os.environ.setdefault(key, value)
    from fica_jax.config import load_config

    try:
        mesh = parse_mesh(args.mesh)
        if args.golden:
            text = dumps_table(sharding_table(load_config(args.golden, extra), mesh))
        else:
            if not args.config:
                raise UserError("give --config FILE[:ARG] (or --golden FILE[:ARG])")
            cfg = load_config(args.config, extra)
            chips = parse_chips(args.chips)
            report = plan(
                cfg, mesh, chips, args.hlo_out, args.spmd_dump_dir, args.topology, args.libtpu
            )
            text = dumps(report)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_text(args.out, text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
