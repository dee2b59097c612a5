"""The sections of `fica plan`'s JSON report that need more than a figure: bytes per device,
FLOPs two ways, and the notes that say how collectives and the roofline were counted
(docs/architecture.md §9). `planner.plan` measures; this says what the measurements mean."""

from __future__ import annotations

import math

COLLECTIVE_NOTE = (
    "ring-algorithm bytes sent per device, loops unrolled: all-gather (n-1)/n x "
    "result, reduce-scatter (n-1) x result, all-reduce 2 (n-1)/n x operand. Counted in "
    "the step as partitioned (bf16 where the program moves bf16; an all-reduce feeding "
    "only 1/n dynamic-slices is the reduce-scatter TPU/GPU compilers emit for it). "
    "`cpu_compiled`: the same count on the CPU executable, where bf16 collectives are "
    "upcast to f32 and reduce-scatters stay all-reduce + slice (an upper bound)"
)
_FLOPS_NOTE = (
    "model FLOPs (MaxText MFU convention, docs/architecture.md §9): 3 x the "
    "dot+conv FLOPs of the stage loss's forward pass for the global batch, compiled with "
    "remat off on one device; remat recomputation and partitioner duplication are not "
    "counted, and per-device = global / devices. hardware FLOPs: dot+conv FLOPs of the "
    "compiled, partitioned train step on one device with loop trip counts applied "
    "(includes remat recomputation). XLA's cost_analysis counts loop bodies once"
)
_ROOFLINE_NOTE = (
    "per chip, per device: compute_s = hardware FLOPs / peak; hbm_s = HBM "
    "bytes of all ops / HBM bandwidth; op_roofline_s = sum over the step's ops of max(op "
    "FLOPs / peak, op bytes / HBM bandwidth); collective_s = collective bytes / interconnect; "
    "step_s = max(op_roofline_s, collective_s) (perfect overlap), step_s_no_overlap = their "
    "sum; mfu / mfu_no_overlap = model FLOPs / (peak x step_s / step_s_no_overlap) (MaxText "
    "MFU); hfu = hardware FLOPs / (peak x step_s). Ops: top-level instructions of ENTRY and of "
    "while bodies x trip count; a fusion moves its operands and outputs, a dynamic-slice reads "
    "its slice, a dynamic-update-slice writes its update in place. Peak matmul throughput is "
    "assumed for every dot (no efficiency factor); no latency term. "
)
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


def tree_bytes(tree) -> tuple[int, int]:
    """(global elements, bytes held by one device) of an abstract tree with shardings."""
    import jax
    import numpy as np

    count, per_device = 0, 0
    for a in jax.tree.leaves(tree):
        count += math.prod(a.shape)
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        per_device += math.prod(shard) * np.dtype(a.dtype).itemsize
    return count, per_device


def memory_section(abstract_state: dict, mem) -> tuple[int, dict]:
    """(parameter count, bytes per device): params / optimizer state / EMA from their shardings,
    then XLA's memory analysis `mem` and the peak it implies."""
    n_params, params_b = tree_bytes(abstract_state["params"])
    _, opt_b = tree_bytes(abstract_state["opt"])
    _, ema_b = tree_bytes(abstract_state["ema"])
    peak_mem = mem.argument_size_in_bytes + mem.output_size_in_bytes
    peak_mem += mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return n_params, {
        "params": params_b,
        "optimizer_state": opt_b,
        "ema": ema_b,
        "arguments": mem.argument_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,
        "temp_activations": mem.temp_size_in_bytes,
        "peak_estimate": peak_mem,
    }


def flops_section(
    flops: float, trips: list[int], model_global: float, n_dev: int, xla: float | None
) -> dict:
    """Hardware FLOPs (`flops` per device, counted in the compiled step with its while `trips`)
    next to model FLOPs (`model_global`, `planner.model_flops`) and XLA's `xla` figure."""
    model_dev = model_global / n_dev
    return {
        "model_per_device_per_step": model_dev,
        "model_global_per_step": model_global,
        "hardware_per_device_per_step": flops,
        "hardware_global_per_step": flops * n_dev,
        "hardware_over_model": flops / model_dev if model_dev > 0 else None,
        "per_device_per_step": flops,  # = hardware_per_device_per_step (older readers)
        "xla_cost_analysis_per_device": xla,
        "while_trip_counts": trips,
        "note": _FLOPS_NOTE,
    }


def roofline_note(topology: str | None) -> str:
    """How the roofline was computed, and how far the op costs it reads are the target's."""
    return _ROOFLINE_NOTE + (_TPU_NOTE if topology else _CPU_NOTE)
