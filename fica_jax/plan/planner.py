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
(`op_costs`); and a roofline per chip (`chips.roofline`): op time = sum over ops of
max(FLOPs / peak, bytes / HBM bandwidth), async DMA and collective time beside it, step time =
their max (perfect overlap) or their sum (none), MFU = model FLOPs / (peak x step time) for both.
By default the op bytes and the memory analysis are the CPU compiler's: it fuses less than a
TPU/GPU compiler, runs bf16 matmuls and elementwise ops in f32 and keeps f32 copies of some bf16
tensors, so both are pessimistic. `--topology v5p:4x4x4` compiles the same step with the TPU
compiler instead (libtpu on this CPU host, `topology.py`): TPU fusion, collectives and
memory analysis, roofline for that chip only. What each figure of the report means, and how it
was counted, is said in its notes (`report.py`).

  python -m fica_jax.plan.planner --config configs/toy.py --mesh data=2,fsdp=4
  python -m fica_jax.plan.planner --config configs/dit.py:paper --mesh data=2,fsdp=32 \
      --topology v5p:4x4x4                             # the TPU compiler's program
  python -m fica_jax.plan.planner --golden configs/dit.py:paper --mesh data=8,fsdp=8 \
      --out tests/golden/sharding_dit_paper.json      # regenerate a golden sharding file
"""

from __future__ import annotations

import argparse
import contextlib
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
from fica_jax.perf.op_costs import op_costs
from fica_jax.plan.render_cost import kernel_calls, renderer_cost, renderer_split
from fica_jax.plan.report import COLLECTIVE_NOTE, flops_section, memory_section, roofline_note
from fica_jax.plan.topology import TOPOLOGY_ENV, topology_chip, topology_devices

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


# A plan reads what the compiler does (SPMD dumps, HLO): a cached executable would skip it.
NO_CACHE_ENV = {"JAX_ENABLE_COMPILATION_CACHE": "false"}


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

    from fica_jax.render.rasterize import target_platform
    from fica_jax.train.metrics import compiled_flops
    from fica_jax.train.stage import get_stage
    from fica_jax.train.step import build

    stage = get_stage(cfg.stage)
    mesh, chips = _plan_mesh(cfg, mesh_shape, chips, topology, libtpu)
    n_dev = mesh.size
    t0 = time.perf_counter()
    # a TPU slice's step renders with the TPU kernel (`render/kernels.py`), as it would there
    with target_platform("tpu") if topology else contextlib.nullcontext():
        setup = build(cfg, stage, mesh)
        lowered = setup.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    model_global = model_flops(cfg, stage)
    t3 = time.perf_counter()

    n_params, per_device = memory_section(setup.abstract_state, compiled.memory_analysis())
    text = compiled.as_text()
    if hlo_out:
        write_text(hlo_out, text)
    hlo = hs.analyze(text)
    ops = op_costs(text)
    coll = collectives(text, _spmd_hlo(spmd_dump_dir), topology)
    flops = flops_section(
        hlo.flops, hlo.while_trip_counts, model_global, n_dev, compiled_flops(compiled)
    )
    model_dev, peak_mem = flops["model_per_device_per_step"], per_device["peak_estimate"]
    roof = roofline(hlo.flops, model_dev, coll["total"], peak_mem, chips, ops)
    renderer = None
    if stage.renders is not None:
        renderer = renderer_cost(stage.renders(cfg), chips, n_dev, int(cfg.data.batch_size))
        renderer["kernels_in_step"] = kernel_calls(text)
        renderer["step"] = renderer_split(roof, renderer["kernel_s"])
    return {
        "config": {"stage": cfg.stage, "model": cfg.model.to_dict(), "train": cfg.train.to_dict()},
        "mesh": dict(mesh.shape),
        "devices": n_dev,
        "compiler": f"tpu ({topology}, libtpu)" if topology else "cpu (fake devices)",
        "global_batch": int(cfg.data.batch_size),
        "param_count": n_params,
        "per_device_bytes": per_device,
        "flops": flops,
        "collective_bytes_per_device": {**coll, "note": COLLECTIVE_NOTE},
        "roofline": roof,
        "roofline_note": roofline_note(topology),
        "renderer": renderer,
        "top_ops": top_ops(ops, chips[0]) if chips else None,
        "compile_s": {"trace_lower": t1 - t0, "compile": t2 - t1, "model_flops": t3 - t2},
        "jax_version": jax.__version__,
    }


def _plan_mesh(cfg, mesh_shape: Mapping[str, int], chips, topology, libtpu):
    """-> (the mesh the step compiles for: fake CPU devices, or the `topology`'s TPU devices;
    the chips its roofline is given for: the topology's own chip only)."""
    from fica_jax import sharding as shd

    devices = topology_devices(topology, libtpu) if topology else None
    if devices is not None and len(devices) != math.prod(mesh_shape.values()):
        raise UserError(
            f"--mesh {dict(mesh_shape)} needs {math.prod(mesh_shape.values())} devices; "
            f"--topology {topology} has {len(devices)}"
        )
    if topology:
        chips = [topology_chip(topology)]
    mesh = shd.make_mesh(dict(mesh_shape), devices)
    batch = int(cfg.data.batch_size)
    if batch % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise UserError(
            f"config data.batch_size={batch} does not split over data x fsdp = "
            f"{mesh.shape['data'] * mesh.shape['fsdp']} devices"
        )
    return mesh, chips


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
