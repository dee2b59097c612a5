"""FLOPs and collective traffic read from HLO text, with while-loop trip counts applied.

XLA's `cost_analysis()` counts a while body once (docs/architecture.md §10), so a model whose 28 blocks
run under `nnx.scan` would be under-counted 28x. Here every computation is walked from ENTRY and a
while body is weighted by its `known_trip_count` (compiled HLO) or, failing that, by the bound of
its `counter < N` condition (HLO before optimisation). Counted: `dot` and `convolution` FLOPs (the
matmul work that sets the roofline; elementwise work is ignored; a convolution counts only the
kernel taps that read real input, not padding or the holes of a dilated input, as XLA's
HloCostAnalysis does) and the bytes each device moves in all-gather / reduce-scatter /
all-reduce / all-to-all / collective-permute (ring algorithm).

`reduce_scatter=True` counts an all-reduce whose every user is a `dynamic-slice` keeping 1/n of it
(n = group size) as the reduce-scatter it is: that is the SPMD partitioner's output for a gradient
reduced onto a sharded parameter, which the TPU/GPU pipelines rewrite to a reduce-scatter
(XLA's `ReduceScatterCreator`) and the CPU pipeline leaves alone.

The HLO text reader here (`computations`, `parse_shapes`, `shape_bytes`, `dot_flops`,
`conv_flops`, `trip_count`) also serves the per-op analyser, `op_costs.py` (HBM bytes and FLOPs
of every instruction: the per-op roofline of `fica plan`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import numpy as np

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")  # dtype, dims, layout
_OFF_HBM = re.compile(r"S\([1-9]\d*\)")  # a layout's memory space other than 0 (HBM)
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
COND = re.compile(r"condition=%?([\w.\-]+)")
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def parse_shapes(text: str, hbm_only: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every shape in `text`; `hbm_only` drops those whose layout places them off
    HBM (a TPU keeps some tensors in VMEM, layout `S(1)`, and scalars in SMEM, `S(2)`; CPU layouts
    never do)."""
    out = []
    for dtype, dims, layout in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES and not (hbm_only and _OFF_HBM.search(layout)):
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def shape_bytes(text: str, hbm_only: bool = False) -> int:
    return sum(_DTYPE_BYTES[d] * math.prod(s) for d, s in parse_shapes(text, hbm_only))


def _group_size(attrs: str) -> int:
    """Devices per replica group, from any of XLA's three printed forms."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([\w]+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([\w]+)'", m.group(2)))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return len([t for t in m.group(1).split(",") if t])
    m = re.search(r"source_target_pairs=\{", attrs)
    return 2 if m else 1


@dataclasses.dataclass
class HloStats:
    flops: float  # dot + convolution FLOPs of one step on one device, loops unrolled
    collective_bytes: dict[str, float]  # per device, by collective kind
    while_trip_counts: list[int]

    @property
    def total_collective_bytes(self) -> float:
        return float(sum(self.collective_bytes.values()))


def dot_flops(result: str, operands: list[str], attrs: str, shapes: dict) -> float:
    out = parse_shapes(result)
    lhs = shapes.get(operands[0]) if operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    if not out or lhs is None or m is None:
        return 0.0
    contract = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i)
    return 2.0 * math.prod(out[0][1]) * contract


def _window(attrs: str, key: str, n: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([\dx_\-]+)", attrs)
    if not m:
        return [default] * n
    return [int(v) for v in m.group(1).split("x")]


def _valid_taps(
    out: int, kernel: int, size: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int
) -> int:
    """(output position, kernel tap) pairs of one spatial dim that read a real input element
    (not padding, not a hole of lhs dilation): XLA's HloCostAnalysis convention. In closed form,
    vectorised over taps: the TPU compiler writes some scans as convs whose dim, window and base
    dilation are all a million wide."""
    last = (size - 1) * lhs_dil
    off = np.arange(kernel, dtype=np.int64) * rhs_dil - pad_lo  # output o reads o * stride + off
    lo = np.maximum(0, -(off // stride))  # first o with o * stride + off >= 0
    hi = np.minimum(out - 1, np.floor_divide(last - off, stride))
    # o * stride + off = 0 (mod lhs_dil): solvable where g = gcd(stride, lhs_dil) divides off,
    # then o = o0 (mod lhs_dil / g)
    g = math.gcd(stride, lhs_dil)
    period = lhs_dil // g
    inv = pow(stride // g, -1, period) if period > 1 else 0
    o0 = ((-off) // g % period) * inv % period
    first = lo + (o0 - lo) % period
    n = np.where((off % g == 0) & (first <= hi), (hi - first) // period + 1, 0)
    return int(n.sum())


def conv_flops(result: str, operands: list[str], attrs: str, shapes: dict) -> float:
    """2 x output batch x output features x kernel input features x valid taps. Padding and
    the holes of a base (lhs) dilation are not multiplied: a transposed (strided) conv's input
    gradient is not counted at stride^2 times its real work."""
    out = parse_shapes(result)
    lhs = shapes.get(operands[0]) if operands else None
    rhs = shapes.get(operands[1]) if len(operands) > 1 else None
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not out or lhs is None or rhs is None or m is None:
        return 0.0
    lab_l, lab_r, lab_o = m.groups()
    o_shape = out[0][1]
    spatial = sorted(c for c in lab_o if c.isdigit())
    nd = len(spatial)
    stride = _window(attrs, "stride", nd, 1)
    lhs_dil = _window(attrs, "lhs_dilate", nd, 1)
    rhs_dil = _window(attrs, "rhs_dilate", nd, 1)
    pm = re.search(r"\bpad=([\d_x\-]+)", attrs)
    pads = [int(p.split("_")[0]) for p in pm.group(1).split("x")] if pm else [0] * nd
    taps = 1
    for i, d in enumerate(spatial):
        taps *= _valid_taps(
            o_shape[lab_o.index(d)],
            rhs[lab_r.index(d)],
            lhs[lab_l.index(d)],
            stride[i],
            pads[i],
            lhs_dil[i],
            rhs_dil[i],
        )
    batch, feat, cin = o_shape[lab_o.index("b")], o_shape[lab_o.index("f")], rhs[lab_r.index("i")]
    return 2.0 * batch * feat * cin * taps


def _traffic(op: str, result: str, attrs: str) -> float:
    n, size = _group_size(attrs), shape_bytes(result)
    if op.endswith("-start"):  # async form returns (operands..., results...): count results
        size = size / 2
    if n <= 1:
        return 0.0
    base = op.removesuffix("-start")
    if base == "all-reduce":
        return 2.0 * size * (n - 1) / n
    if base == "reduce-scatter":
        return float(size * (n - 1))
    if base == "collective-permute":
        return float(size)
    return size * (n - 1) / n  # all-gather, all-to-all


def _elements(result: str) -> int:
    s = parse_shapes(result)
    return math.prod(s[0][1]) if len(s) == 1 else -1


def trip_count(rest: str, operands: list[str], insts: dict, comps: dict) -> int:
    """`known_trip_count`, else N - init of a `get-tuple-element(p, k) < constant(N)` condition."""
    t = _TRIP.search(rest)
    if t:
        return int(t.group(1))
    cond = COND.search(rest)
    body = comps.get(cond.group(1), []) if cond else []
    by_name = {i[0]: i for i in body if i[0] != "__params__"}
    root = next((i for i in body if i[0] != "__params__" and i[-1]), None)
    if root is None or root[2] != "compare" or "direction=LT" not in root[3]:
        return 1
    args = re.findall(r"%([\w.\-]+)", root[3].split(")")[0])
    if len(args) != 2 or args[1] not in by_name or by_name[args[1]][2] != "constant":
        return 1
    bound = re.match(r"\s*(-?\d+)", by_name[args[1]][3])
    gte = by_name.get(args[0])
    k = re.search(r"index=(\d+)", gte[3]) if gte and gte[2] == "get-tuple-element" else None
    if bound is None or k is None:
        return 1
    init = 0
    tup = insts.get(operands[0]) if operands else None
    if tup is not None and tup[2] == "tuple":
        elems = re.findall(r"%([\w.\-]+)", tup[3].split(")")[0])
        src = insts.get(elems[int(k.group(1))]) if int(k.group(1)) < len(elems) else None
        if src is not None and src[2] == "constant":
            m = re.match(r"\s*(-?\d+)", src[3])
            init = int(m.group(1)) if m else 0
    return max(int(bound.group(1)) - init, 0)


def computations(hlo_text: str) -> tuple[dict[str, list], str]:
    """{computation: [("__params__", {name: type}), (name, result, op, rest, is_root), ...]}
    and the ENTRY computation's name, from HLO text."""
    comps: dict[str, list] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if h := _HEADER.match(line):
            current = h.group(1)
            params = dict(re.findall(r"([\w.\-]+):\s*([^,()]+\[[\d,]*\])", h.group(2)))
            comps[current] = [("__params__", params)]
            entry = current if line.startswith("ENTRY") else entry
        elif current is not None and (m := _INST.match(line)):
            comps[current].append((*m.groups(), line.lstrip().startswith("ROOT ")))
    return comps, entry


def analyze(hlo_text: str, reduce_scatter: bool = False) -> HloStats:
    """Walks the module from ENTRY; a while body counts its trip count times (see module doc)."""
    comps, entry = computations(hlo_text)
    trips: list[int] = []

    @functools.cache
    def walk(name: str) -> tuple[float, tuple[tuple[str, float], ...]]:
        insts = comps.get(name, [])
        by_name = {i[0]: i for i in insts if i[0] != "__params__"}
        users: dict[str, list] = {}
        if reduce_scatter:
            for i in by_name.values():
                for o in set(re.findall(r"%([\w.\-]+)", i[3].split(")")[0])):
                    users.setdefault(o, []).append(i)
        shapes: dict[str, tuple[int, ...]] = {}
        flops, coll = 0.0, {}
        for inst in insts:
            if inst[0] == "__params__":
                for pname, ptype in inst[1].items():
                    s = parse_shapes(ptype)
                    if s:
                        shapes[pname] = s[0][1]
                continue
            iname, result, op, rest, _ = inst
            s = parse_shapes(result.split(")")[0] if result.startswith("(") else result)
            if s:
                shapes[iname] = s[0][1]
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            if op == "dot":
                flops += dot_flops(result, operands, rest, shapes)
            elif op == "convolution":
                flops += conv_flops(result, operands, rest, shapes)
            elif op.removesuffix("-start") in COLLECTIVES:
                kind, traffic = op.removesuffix("-start"), _traffic(op, result, rest)
                if (
                    reduce_scatter
                    and op == "all-reduce"
                    and _is_scatter(iname, result, rest, users)
                ):
                    kind = "reduce-scatter"
                    traffic = _traffic("reduce-scatter", users[iname][0][1], rest)
                coll[kind] = coll.get(kind, 0.0) + traffic
            called = CALLS.findall(rest)
            for group in BRANCHES.findall(rest):
                called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            mult = 1
            if op == "while":
                mult = trip_count(rest, operands, by_name, comps)
                trips.append(mult)
                cond = COND.search(rest)
                called = [c for c in called if not cond or c != cond.group(1)]
            if op in ("async-update", "async-done"):  # the wrapped op runs once, at its start
                called = []
            for c in called:
                if c in comps and not (op in COLLECTIVES or op.startswith("reduce")):
                    f, cc = walk(c)
                    flops += mult * f
                    for k, v in cc:
                        coll[k] = coll.get(k, 0.0) + mult * v
        return flops, tuple(sorted(coll.items()))

    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    flops, coll = walk(entry)
    return HloStats(flops=flops, collective_bytes=dict(coll), while_trip_counts=trips)


def _is_scatter(name: str, result: str, attrs: str, users: dict) -> bool:
    """An all-reduce read only by dynamic-slices that each keep 1/n of it (n = group size)."""
    n, total, us = _group_size(attrs), _elements(result), users.get(name, [])
    if n <= 1 or total <= 0 or not us:
        return False
    return all(u[2] == "dynamic-slice" and _elements(u[1]) * n == total for u in us)
