"""HBM bytes and dot/conv FLOPs of every top-level instruction of a compiled step, read from its
HLO text: the per-op roofline of `fica plan` (`chips.roofline`, docs/architecture.md §9).

The step's totals (FLOPs, collective bytes) are `hlo_stats.analyze`; this is the other analyser,
one row per op, with while-loop trip counts applied the same way (`hlo_stats.trip_count`). It
reads the CPU compiler's HLO or, with `fica plan --topology`, the TPU compiler's own (libtpu, no
chip needed); TPU async forms (`*-start`/`*-done`, `async-start` wrapping a collective) are
walked, and collectives are left to the collective term.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

from fica_jax.perf.hlo_stats import (
    BRANCHES,
    CALLS,
    COLLECTIVES,
    COND,
    computations,
    conv_flops,
    dot_flops,
    parse_shapes,
    shape_bytes,
    trip_count,
)


@dataclasses.dataclass
class OpCost:
    """One top-level HLO instruction of the per-device step: HBM bytes and dot/conv FLOPs per
    execution, `count` executions per step (while trip counts applied)."""

    name: str
    kind: str  # matmul, slice-update, convert, copy, broadcast, reduce, elementwise or opcode
    label: str  # instruction name without its number, and the JAX op it came from
    count: int
    bytes: float
    flops: float


_NO_TRAFFIC = {  # move no HBM bytes of their own (while/call/conditional bodies are walked)
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "add-dependency", "while", "call",
    "conditional", "copy-done",
}  # fmt: skip
_SAME_ELEMENTS = ("convert", "bitcast", "copy", "reshape", "transpose")  # slice-transparent


def _hlo_computations(text: str) -> tuple[dict[str, list], str]:
    """`computations`, refusing text without an ENTRY computation."""
    comps, entry = computations(text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _args(rest: str) -> list[str]:
    return re.findall(r"%([\w.\-]+)", rest.split(")")[0])


def _n(result: str) -> int:
    return max(sum(math.prod(s) for _, s in parse_shapes(result)), 1)


def _dot_conv_flops(result: str, op: str, rest: str, shapes: dict) -> float:
    if op == "dot":
        return dot_flops(result, _args(rest), rest, shapes)
    return conv_flops(result, _args(rest), rest, shapes) if op == "convolution" else 0.0


def _fusion_bytes(insts: dict, operand_bytes: list[float], comps: dict | None = None) -> float:
    """HBM bytes of one fusion, counted as XLA's HloCostAnalysis counts a fusion: operands read
    and outputs written in full, except an operand only dynamic-sliced or sliced (the slice is
    read), also inside a nested fusion (TPU programs slice a scanned layer's weights there; needs
    `comps`), and one updated in place (a dynamic-update-slice of a parameter at the root: only
    the update is written). Converts, bitcasts, copies, reshapes and transposes between parameter
    and slice or update (the CPU's f32 detour for bf16) do not change which elements move."""
    root = next(n for n, v in insts.items() if v[3])
    written, in_place = 0.0, set()
    source = lambda name: _element_source(insts, name)
    for out in _args(insts[root][2]) if insts[root][1] == "tuple" else [root]:
        d, full = source(out), shape_bytes(insts[out][0], hbm_only=True)
        args = _args(insts[d][2])
        if insts[d][1] == "dynamic-update-slice" and insts[source(args[0])][1] == "parameter":
            in_place.add(d)
            full *= _n(insts[args[1]][0]) / _n(insts[d][0])
        written += full
    fractions = _read_fractions(insts, in_place, comps)
    return written + sum(b * fractions.get(k, 0.0) for k, b in enumerate(operand_bytes))


def _element_source(insts: dict, name: str) -> str:
    """Up operand 0 through element-preserving ops."""
    while insts[name][1] in _SAME_ELEMENTS:
        name = _args(insts[name][2])[0]
    return name


def _read_fractions(insts: dict, in_place: set, comps: dict | None) -> dict[int, float]:
    """{parameter number: fraction of it the computation reads} (see `_fusion_bytes`)."""
    users: dict[str, list] = {}
    for name, (_, _, rest, _) in insts.items():
        for i, a in enumerate(_args(rest)):
            users.setdefault(a, []).append((name, i))

    def nested(user: str, i: int) -> float | None:  # fraction a nested fusion reads of operand i
        called = [c for c in CALLS.findall(insts[user][2]) if comps and c in comps]
        if insts[user][1] != "fusion" or not called:
            return None
        inner = {j[0]: j[1:] for j in comps[called[0]][1:]}
        return _read_fractions(inner, set(), comps).get(i, 0.0)

    def read_fraction(name) -> float:
        frac = 0.0
        for user, i in users.get(name, []):
            op = insts[user][1]
            if op in _SAME_ELEMENTS:
                frac += read_fraction(user)
            elif op in ("dynamic-slice", "slice") and i == 0:
                frac += _n(insts[user][0]) / _n(insts[name][0])
            elif (f := nested(user, i)) is not None:
                frac += f
            elif not (op == "dynamic-update-slice" and i == 0 and user in in_place):
                return 1.0
        return min(frac, 1.0)

    out = {}
    for name, (_, op, rest, _) in insts.items():
        if op == "parameter":
            out[int(re.match(r"\s*(\d+)", rest).group(1))] = read_fraction(name)
    return out


def _kind(op: str, comp: list | None, flops: float) -> str:
    if flops > 0:
        return "matmul"
    ops = {i[2] for i in comp[1:]} if comp else {op}
    if ops & {"dynamic-update-slice", "dynamic-slice", "slice"}:
        return "slice-update"
    if ops <= {"convert", "bitcast", "copy", "parameter", "constant", "broadcast", "tuple"}:
        return next((k for k in ("convert", "copy", "broadcast") if k in ops), op)
    if ops & {"reduce", "reduce-window"}:
        return "reduce"
    return "elementwise" if op == "fusion" else op


def op_costs(hlo_text: str) -> list[OpCost]:
    """HBM bytes and dot/conv FLOPs of every top-level instruction of a compiled (partitioned,
    per-device) step: ENTRY, while bodies (times their trip counts), called computations and
    conditional branches; a fusion's bytes are its operands and outputs (`_fusion_bytes`), its
    FLOPs the dots and convs inside. Collectives are left to the collective term; parameters,
    constants, tuples and bitcasts move nothing. docs/architecture.md §9."""
    comps, entry = _hlo_computations(hlo_text)
    shapes_of = lambda comp: {i[0]: s[0][1] for i in comp[1:] if (s := parse_shapes(i[1]))}

    @functools.cache
    def flops_in(name: str) -> float:  # dot/conv FLOPs of a fused computation, nested included
        comp, shapes = comps[name], shapes_of(comps[name])
        f = sum(_dot_conv_flops(i[1], i[2], i[3], shapes) for i in comp[1:])
        return f + sum(flops_in(c) for i in comp[1:] for c in CALLS.findall(i[3]) if c in comps)

    out: list[OpCost] = []

    def walk(name: str, mult: int) -> None:
        comp = comps[name]
        by_name, shapes = {i[0]: i for i in comp[1:]}, shapes_of(comp)
        for iname, result, op, rest, _ in comp[1:]:
            args, called = _args(rest), [c for c in CALLS.findall(rest) if c in comps]
            if op == "while":
                cond = COND.search(rest)
                n = trip_count(rest, args, by_name, comps)
                for c in (c for c in called if not cond or c != cond.group(1)):
                    walk(c, mult * n)
            elif op in ("call", "conditional"):
                for group in BRANCHES.findall(rest):
                    called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
                for c in (c for c in called if c in comps):
                    walk(c, mult)
            elif op == "async-start":  # TPU: wraps a collective (skipped below) or other op
                for c in called:
                    walk(c, mult)
            base = op.removesuffix("-start").removesuffix("-done")
            if op in _NO_TRAFFIC or base in COLLECTIVES or op.startswith("async-"):
                continue
            if op == "custom-call" and 'custom_call_target="AllocateBuffer"' in rest:
                continue  # TPU: reserves a buffer, moves nothing
            arg_bytes = [
                shape_bytes(by_name[a][1], hbm_only=True) if a in by_name else 0.0 for a in args
            ]
            fused = comps[called[0]] if op == "fusion" and called else None
            if fused and any(i[2].removesuffix("-start") in COLLECTIVES for i in fused[1:]):
                continue  # TPU collective fusion (e.g. all-reduce-scatter): the collective term
            flops = flops_in(called[0]) if fused else _dot_conv_flops(result, op, rest, shapes)
            if fused:
                nb = _fusion_bytes({i[0]: i[1:] for i in fused[1:]}, arg_bytes, comps)
            elif op in ("dynamic-slice", "slice"):
                nb = 2.0 * shape_bytes(result, hbm_only=True)
            elif op == "dynamic-update-slice":
                nb = 2.0 * arg_bytes[1]
            elif op == "copy-start":  # (source alias, destination, context): HBM side(s) move
                nb = shape_bytes(result, hbm_only=True)
            else:
                nb = sum(dict(zip(args, arg_bytes, strict=True)).values()) + shape_bytes(
                    result, hbm_only=True
                )
            meta = re.search(r'op_name="([^"]*)"', rest)
            label = re.sub(r"\.\d+$", "", iname) + (f" {meta.group(1)}" if meta else "")
            out.append(OpCost(iname, _kind(op, fused, flops), label, mult, nb, flops))

    walk(entry, 1)
    return out
