"""Tracked-mesh files as vertex arrays: PLY (Ava-256 / Goliath), Multiface's float32 `.bin`,
and OBJ `v` lines; and a folder of them as a sequence (`fica render --meshes DIR`).

Only positions are read (the topology comes from the dataset's template); values stay in the
file's unit, which the caller converts (both public datasets store millimetres).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_pipelines.formats.common import bad
from data_pipelines.formats.ply import read_ply_vertices

SUFFIXES = (".ply", ".bin", ".obj")


def read_vertices(path: Path) -> np.ndarray:
    """[N, 3] float64 vertex positions of one mesh file, in its own unit."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise bad(path, f"unknown mesh file type (expected one of {', '.join(SUFFIXES)})")
    if not path.is_file():
        raise bad(path, "file not found (expected a tracked mesh)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise bad(path, f"cannot read ({e})") from None
    if path.suffix == ".ply":
        v = read_ply_vertices(data, path)
    elif path.suffix == ".bin":
        if not data or len(data) % 12:
            raise bad(path, f"{len(data)} bytes, expected float32 x, y, z triples (12 bytes each)")
        v = np.frombuffer(data, dtype="<f4").reshape(-1, 3).astype(np.float64)
    else:
        rows = []
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if line.startswith("v "):
                try:
                    rows.append([float(t) for t in line.split()[1:4]])
                except ValueError:
                    raise bad(path, f"line {n}: cannot parse {line.strip()!r}") from None
        if not rows or any(len(r) != 3 for r in rows):
            raise bad(path, "expected 'v x y z' lines")
        v = np.asarray(rows, np.float64)
    if not np.isfinite(v).all():
        raise bad(path, "non-finite vertex coordinates")
    return v


def read_sequence(folder: Path) -> tuple[list[str], np.ndarray]:
    """(file names, [T, N, 3] positions) of the mesh files in `folder`, in name order; every
    frame must have the same vertex count."""
    folder = Path(folder)
    if not folder.is_dir():
        raise bad(folder, "not a folder (expected tracked meshes: *.ply, *.bin or *.obj)")
    files = sorted(p for p in folder.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise bad(folder, "no mesh files (*.ply, *.bin or *.obj)")
    meshes = [read_vertices(p) for p in files]
    for p, m in zip(files, meshes, strict=True):
        if m.shape != meshes[0].shape:
            raise bad(p, f"{len(m)} vertices, but {files[0].name} has {len(meshes[0])}")
    return [p.name for p in files], np.stack(meshes)
