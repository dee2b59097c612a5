"""FLOPs and collective traffic read from compiled HLO text, with while-loop trip counts applied.

XLA's `cost_analysis()` counts a while body once (docs/architecture.md §10), so a model whose 28 blocks
run under `nnx.scan` would be under-counted 28x. Here every computation is walked from ENTRY and a
while body is weighted by its `known_trip_count`. Counted: `dot` and `convolution` FLOPs (the
matmul work that sets the roofline; elementwise work is ignored) and the bytes each device moves
in all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute (ring algorithm).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

_DTYPE_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\((.*)\)\s*->.*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
    return out


def _bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[d] * math.prod(s) for d, s in _shapes(text))


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


def _dot_flops(result: str, operands: list[str], attrs: str, shapes: dict) -> float:
    out = _shapes(result)
    lhs = shapes.get(operands[0]) if operands else None
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
    if not out or lhs is None or m is None:
        return 0.0
    contract = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i)
    return 2.0 * math.prod(out[0][1]) * contract


def _conv_flops(result: str, operands: list[str], attrs: str, shapes: dict) -> float:
    out = _shapes(result)
    rhs = shapes.get(operands[1]) if len(operands) > 1 else None
    m = re.search(r"dim_labels=\w+_(\w+)->", attrs)
    if not out or rhs is None or m is None:
        return 0.0
    kernel_out = rhs[m.group(1).index("o")]
    return 2.0 * math.prod(out[0][1]) * math.prod(rhs) / max(kernel_out, 1)


def _traffic(op: str, result: str, attrs: str) -> float:
    n, size = _group_size(attrs), _bytes(result)
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


def analyze(hlo_text: str) -> HloStats:
    """Walks the module from ENTRY; a while body counts `known_trip_count` times."""
    comps: dict[str, list] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        h = _HEADER.match(line)
        if h:
            current = h.group(1)
            comps[current] = []
            params = {}
            for pname, ptype in re.findall(r"([\w.\-]+):\s*([^,()]+\[[\d,]*\])", h.group(2)):
                params[pname] = ptype
            comps[current].append(("__params__", params))
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        m = _INST.match(line)
        if m:
            comps[current].append(m.groups())
    trips: list[int] = []

    @functools.cache
    def walk(name: str) -> tuple[float, tuple[tuple[str, float], ...]]:
        insts = comps.get(name, [])
        shapes: dict[str, tuple[int, ...]] = {}
        flops, coll = 0.0, {}
        for inst in insts:
            if inst[0] == "__params__":
                for pname, ptype in inst[1].items():
                    s = _shapes(ptype)
                    if s:
                        shapes[pname] = s[0][1]
                continue
            iname, result, op, rest = inst
            s = _shapes(result.split(")")[0] if result.startswith("(") else result)
            if s:
                shapes[iname] = s[0][1]
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            if op == "dot":
                flops += _dot_flops(result, operands, rest, shapes)
            elif op == "convolution":
                flops += _conv_flops(result, operands, rest, shapes)
            elif op.removesuffix("-start") in COLLECTIVES:
                kind = op.removesuffix("-start")
                coll[kind] = coll.get(kind, 0.0) + _traffic(op, result, rest)
            called = _CALLS.findall(rest)
            for group in _BRANCHES.findall(rest):
                called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            mult = 1
            if op == "while":
                t = _TRIP.search(rest)
                mult = int(t.group(1)) if t else 1
                trips.append(mult)
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
