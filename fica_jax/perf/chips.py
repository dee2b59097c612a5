"""The one table of accelerator figures used by MFU logging (`metrics`) and `fica plan`.

Peak dense bf16 FLOP/s, HBM bytes, HBM bandwidth and per-chip interconnect bytes/s, from the
vendors' published specifications (docs/architecture.md §9); interconnect figures are upper bounds.
A100/H100 are the 80 GB SXM parts. `kinds` are substrings of `jax.Device.device_kind`.
Also the roofline that `fica plan` puts over them: per-op time max(FLOPs / peak, bytes / HBM
bandwidth) summed over the step's ops (`op_costs.op_costs`), against the collectives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from fica_jax.perf.op_costs import OpCost


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float
    hbm_bytes: float
    link_bytes_per_s: float
    kinds: tuple[str, ...]
    hbm_bytes_per_s: float  # HBM bandwidth (`fica plan`'s per-op roofline)
    vector_ops_per_s: float | None = None  # f32 element ops/s outside the matrix units (below)


# vector_ops_per_s, for kernels that run on the vector units (the renderer's compositing,
# `fica_jax.plan.render_cost`). TPU: cores x (8 x 128) lanes x 2 f32 VALU issue slots (a
# multiply and an add per bundle, measured on v4: ayaka14732.github.io/pallas-tpu-tutorial,
# ch. 1 §7) x clock, the clock being the bf16 peak / (MXUs x 128^2 x 2) of JAX's own table
# (`pltpu.get_tpu_info_for_chip`: v5p 2 cores x 4 MXUs, 1.75 GHz; v5e 1 x 4, 1.5 GHz). GPU: CUDA
# cores x boost clock, one f32 op each per cycle (A100 6912 x 1.41 GHz, H100/H200 SXM 16896 x
# 1.98 GHz). v6e: not derived (its vector unit is not described in a public source we use).
CHIPS: dict[str, Chip] = {
    "v5p": Chip(459e12, 95e9, 1200e9, ("v5p",), 2765e9, 2 * 1024 * 2 * 1.75e9),
    "v6e": Chip(918e12, 32e9, 800e9, ("v6e", "v6 lite"), 1640e9),
    "v5e": Chip(197e12, 16e9, 400e9, ("v5e", "v5 lite"), 819e9, 1 * 1024 * 2 * 1.5e9),
    "a100": Chip(312e12, 80e9, 600e9, ("a100",), 2039e9, 6912 * 1.41e9),
    "h100": Chip(989e12, 80e9, 900e9, ("h100",), 3350e9, 16896 * 1.98e9),
    "h200": Chip(989e12, 141e9, 900e9, ("h200",), 4800e9, 16896 * 1.98e9),
}


def chip_of(device: jax.Device | None = None) -> Chip | None:
    """The table entry for a device (the first local one by default); None for CPUs etc."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for chip in CHIPS.values():
        if any(k in kind for k in chip.kinds):
            return chip
    return None


def op_seconds(op: OpCost, chip: Chip) -> float:
    """All executions of one op: max(FLOPs / peak, HBM bytes / bandwidth) each."""
    return op.count * max(op.flops / chip.peak_flops, op.bytes / chip.hbm_bytes_per_s)


ASYNC_KINDS = ("copy-start",)  # DMA the TPU runs beside compute (prefetch into / out of VMEM)


def op_roofline(ops: Sequence[OpCost], chip: Chip) -> float:
    """Seconds of a step's synchronous ops run one after another on `chip`, each at its own
    roofline (async copies are `async_copy_seconds`)."""
    return sum(op_seconds(o, chip) for o in ops if o.kind not in ASYNC_KINDS)


def async_copy_seconds(ops: Sequence[OpCost], chip: Chip) -> float:
    """HBM time of the asynchronous copies (`copy-start`; only TPU programs have them)."""
    return sum(op_seconds(o, chip) for o in ops if o.kind in ASYNC_KINDS)


def top_ops(ops: Sequence[OpCost], chip: str, n: int = 10) -> dict:
    """Predicted time by op kind and the `n` costliest op groups (same kind, instruction name
    without its number, JAX op name) on `chip`: count = executions per step; bytes, flops and
    seconds summed over them."""
    c = CHIPS[chip]
    rows: dict[tuple, dict] = {}
    kinds: dict[str, dict] = {}
    for o in ops:
        s = op_seconds(o, c)
        for key, table in (((o.kind, o.label), rows), (o.kind, kinds)):
            r = table.setdefault(key, {"count": 0, "bytes": 0.0, "flops": 0.0, "seconds": 0.0})
            r["count"] += o.count
            r["bytes"] += o.count * o.bytes
            r["flops"] += o.count * o.flops
            r["seconds"] += s
    best = sorted(rows.items(), key=lambda kv: -kv[1]["seconds"])[:n]
    return {
        "chip": chip,
        "by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]["seconds"])),
        "top": [{"kind": k, "name": label, **r} for (k, label), r in best],
    }


def roofline(
    hw_flops: float,
    model_flops: float,
    coll_bytes: float,
    mem_bytes: float,
    chips: Sequence[str],
    ops: Sequence[OpCost] | None = None,
) -> dict:
    """Per-chip roofline of one step from per-device figures (docs/architecture.md §9).

    op_roofline_s = sum over the step's synchronous ops (`op_costs`) of max(FLOPs / peak, HBM
    bytes / HBM bandwidth); async_copy_s = the asynchronous copies' bytes / HBM bandwidth (a TPU
    program's `copy-start`s: DMA beside compute); collective_s = bytes / interconnect. With
    perfect overlap the step takes max(op_roofline_s, hbm_s, collective_s) (async copies and
    collectives hide behind compute, but all bytes still cross HBM once: hbm_s); with none, the
    sum op_roofline_s + async_copy_s + collective_s. MFU is MaxText's: model FLOPs / (peak x step
    time), for both step times; `hfu` is hardware FLOPs over the same. compute_s = hardware FLOPs
    / peak and hbm_s = all op bytes / HBM bandwidth are the two pure bounds. Without `ops` (no
    HLO) the op roofline falls back to compute_s.
    """
    out = {}
    ratio = lambda num, den: num / den if den > 0 else None
    for chip in chips:
        c = CHIPS[chip]
        compute_s = hw_flops / c.peak_flops
        ops_s = op_roofline(ops, c) if ops is not None else compute_s
        async_s = async_copy_seconds(ops, c) if ops is not None else 0.0
        hbm_s = sum(o.count * o.bytes for o in ops) / c.hbm_bytes_per_s if ops else None
        comm_s = coll_bytes / c.link_bytes_per_s
        step_s = max(ops_s, hbm_s or 0.0, comm_s)
        step_serial = ops_s + async_s + comm_s
        out[chip] = {
            "compute_s": compute_s,
            "model_compute_s": model_flops / c.peak_flops,
            "hbm_s": hbm_s,
            "op_roofline_s": ops_s,
            "async_copy_s": async_s,
            "collective_s": comm_s,
            "step_s": step_s,
            "step_s_no_overlap": step_serial,
            "mfu": ratio(model_flops, c.peak_flops * step_s),
            "mfu_no_overlap": ratio(model_flops, c.peak_flops * step_serial),
            "hfu": ratio(hw_flops, c.peak_flops * step_s),
            "fits_hbm": mem_bytes <= c.hbm_bytes,
        }
    return out
