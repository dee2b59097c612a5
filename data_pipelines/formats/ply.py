"""Minimal PLY reader: the `vertex` element's x, y, z, from ASCII or binary PLY.

Ava-256 and Goliath store one registration mesh per frame as a PLY without faces inside
`kinematic_tracking/registration_vertices.zip` (ava-256 `data/ava_dataset.py` reads it with
`plyfile`, goliath `ca_code/utils/dataloader.py` with pytorch3d's `load_ply`). Neither library is a
dependency here, so this reads the subset those files use: a header of `element`/`property`
lines, scalar vertex properties (x y z plus any others, which are skipped), and whatever elements
follow the vertices (faces), which are ignored. Elements before `vertex` are skipped if their
rows have a fixed size (binary) or one line each (ASCII).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.formats.common import bad

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_ORDER = {"binary_little_endian": "<", "binary_big_endian": ">", "ascii": ""}


def read_ply_vertices(data: bytes, file: Path | str, member: str | None = None) -> np.ndarray:
    """Returns the vertex positions of a PLY file as float64 [N, 3] (units as stored)."""

    def fail(what: str):
        return bad(file, f"bad PLY ({what})", member)

    end = data.find(b"end_header")
    nl = data.find(b"\n", max(end, 0))
    if not data.startswith(b"ply") or end < 0 or nl < 0:
        raise fail("missing 'ply' magic or 'end_header' line")
    body = nl + 1
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, str | None]]]] = []  # name, count, props
    for line in data[:end].decode("ascii", "replace").splitlines()[1:]:
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        if tok[0] == "format" and len(tok) >= 2:
            fmt = tok[1]
        elif tok[0] == "element" and len(tok) == 3 and tok[2].isdigit():
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property" and elements and len(tok) == 3 and tok[1] in _TYPES:
            elements[-1][2].append((tok[2], _TYPES[tok[1]]))
        elif tok[0] == "property" and elements and len(tok) == 5 and tok[1] == "list":
            elements[-1][2].append((tok[4], None))  # list property: variable row size
        else:
            raise fail(f"cannot parse header line {line.strip()!r}")
    if fmt not in _ORDER:
        raise fail(f"format {fmt!r}, expected ascii or binary_little_endian")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise fail("no 'vertex' element")
    k = names.index("vertex")
    _, n, props = elements[k]
    pnames = [p[0] for p in props]
    if any(c not in pnames for c in "xyz"):
        raise fail(f"vertex properties {pnames}, expected x, y and z")
    if any(t is None for _, t in props):
        raise fail("list property in the vertex element")

    if fmt == "ascii":
        lines = data[body:].decode("ascii", "replace").splitlines()
        skip = sum(e[1] for e in elements[:k])
        rows = lines[skip : skip + n]
        try:
            table = np.asarray([[float(t) for t in r.split()[: len(props)]] for r in rows])
        except ValueError:
            raise fail("non-numeric vertex row") from None
        if len(rows) < n or table.shape != (n, len(props)):
            raise fail(f"expected {n} vertex rows of {len(props)} values")
        xyz = table[:, [pnames.index(c) for c in "xyz"]]
    else:
        offset = body
        for _, count, eprops in elements[:k]:
            if any(t is None for _, t in eprops):
                raise fail("list property in an element before 'vertex'")
            offset += count * sum(np.dtype(t).itemsize for _, t in eprops)
        dtype = np.dtype([(name, _ORDER[fmt] + t) for name, t in props])
        if len(data) < offset + n * dtype.itemsize:
            raise fail(f"truncated: {n} vertices need {n * dtype.itemsize} bytes")
        rec = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        xyz = np.stack([rec[c].astype(np.float64) for c in "xyz"], axis=1)
    if not np.isfinite(xyz).all():
        raise fail("non-finite vertex coordinates")
    return xyz.astype(np.float64)


def write_ply_vertices(vertices: np.ndarray, *, binary: bool = True) -> bytes:
    """PLY bytes holding only a float32 `vertex` element (what the fixtures store per frame)."""
    v = np.asarray(vertices, dtype=np.float32)
    fmt = "binary_little_endian" if binary else "ascii"
    head = f"ply\nformat {fmt} 1.0\nelement vertex {len(v)}\n"
    head += "property float x\nproperty float y\nproperty float z\nend_header\n"
    if binary:
        return head.encode() + v.astype("<f4").tobytes()
    return (head + "".join(f"{x:.9g} {y:.9g} {z:.9g}\n" for x, y, z in v)).encode()
