"""Standard 3DGS .ply I/O (docs/architecture.md §7), the layout common splat viewers read.

Binary little-endian, one `vertex` element with float32 properties, in this order:
x y z, nx ny nz (zeros), f_dc_0..2 = (rgb - 0.5) / 0.28209479 (SH band 0), opacity (logit),
scale_0..2 (log), rot_0..3 (w x y z). Extra f_rest_* properties (higher SH bands) written by
other tools are accepted on import and ignored. Writes are atomic (temp file + rename).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fica_jax.errors import UserError
from fica_jax.files import atomic_file

SH_C0 = 0.28209479177387814

PROPS = (
    ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
    + [f"scale_{i}" for i in range(3)]
    + [f"rot_{i}" for i in range(4)]
)


def save_ply(
    path: str | os.PathLike,
    means: np.ndarray,  # [N, 3]
    quats: np.ndarray,  # [N, 4] (w, x, y, z)
    scales: np.ndarray,  # [N, 3] activated
    opacities: np.ndarray,  # [N] in (0, 1)
    colors: np.ndarray,  # [N, 3] RGB in [0, 1]
) -> None:
    """Writes a standard 3DGS .ply (atomically)."""
    means, quats, scales, colors = (
        np.asarray(a, np.float64).reshape(-1, k)
        for a, k in ((means, 3), (quats, 4), (scales, 3), (colors, 3))
    )
    opacities = np.asarray(opacities, np.float64).reshape(-1)
    n = means.shape[0]
    if not all(a.shape[0] == n for a in (quats, scales, colors, opacities)):
        raise ValueError("means, quats, scales, opacities and colors must have the same N")
    o = np.clip(opacities, 1e-7, 1 - 1e-7)
    cols = [
        means,
        np.zeros((n, 3)),
        (colors - 0.5) / SH_C0,
        np.log(o / (1 - o))[:, None],
        np.log(np.maximum(scales, 1e-30)),
        quats,
    ]
    data = np.concatenate(cols, 1).astype("<f4")
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element vertex {n}\n" + "".join(f"property float {p}\n" for p in PROPS) + "end_header\n"
    )
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(header.encode("ascii"))
        f.write(data.tobytes())


_TYPES = {
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
    "uchar": "u1", "uint8": "u1", "char": "i1", "int8": "i1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
}  # fmt: skip


def load_ply(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a 3DGS .ply -> dict(means [N,3], quats [N,4], scales [N,3], opacities [N],
    colors [N,3]) with activations applied (exp scale, sigmoid opacity, SH DC -> RGB)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read .ply file {path}: {e.strerror}") from None
    end = raw.find(b"end_header\n")
    if not raw.startswith(b"ply\n") or end < 0:
        raise UserError(f"{path} is not a .ply file (expected a 'ply' ... 'end_header' header)")
    lines = raw[:end].decode("ascii", "replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise UserError(f"{path}: expected 'format binary_little_endian 1.0' in the .ply header")
    n, fields, in_vertex = None, [], False
    for line in lines:
        parts = line.split()
        if parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                n = int(parts[2])
            elif n is None:
                raise UserError(f"{path}: the 'vertex' element must come first in the .ply")
        elif parts[:1] == ["property"] and in_vertex:
            if parts[1] == "list" or parts[1] not in _TYPES:
                raise UserError(f"{path}: unsupported vertex property {' '.join(parts[1:])!r}")
            fields.append((parts[2], "<" + _TYPES[parts[1]]))
    names = [f for f, _ in fields]
    missing = [p for p in PROPS if p not in names and p not in ("nx", "ny", "nz")]
    if n is None or missing:
        raise UserError(f"{path}: not a 3DGS .ply; missing vertex properties {missing}")
    dtype = np.dtype(fields)
    body = raw[end + len(b"end_header\n") :]
    if len(body) < n * dtype.itemsize:
        raise UserError(
            f"{path}: truncated; {n} vertices need {n * dtype.itemsize} bytes, found {len(body)}"
        )
    v = np.frombuffer(body, dtype, count=n)
    col = lambda *ks: np.stack([v[k].astype(np.float32) for k in ks], -1)
    return {
        "means": col("x", "y", "z"),
        "quats": col("rot_0", "rot_1", "rot_2", "rot_3"),
        "scales": np.exp(col("scale_0", "scale_1", "scale_2")),
        "opacities": 1 / (1 + np.exp(-v["opacity"].astype(np.float32))),
        "colors": col("f_dc_0", "f_dc_1", "f_dc_2") * SH_C0 + 0.5,
    }
