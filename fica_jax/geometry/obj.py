"""Load a user head template from Wavefront OBJ (+ landmarks, optional bases) and write one.

Lets users replace the procedural template with their own capture topology (FiCA's UV maps of
Sec. 2.2 are defined on the template's atlas). Supported OBJ subset: `v x y z`, `vt u v`
(OBJ v points up; stored as 1 - v so that v runs down like image rows), `f` with `a/b`, `a/b/c`
or `a//c` corners (polygons are fan-triangulated; negative indices count from the end), and
`o`/`g` names `eye_left`, `eye_right`, `mouth` that tag parts (everything else is skin).
A vertex used with several UVs is split; `weld` keeps track of the shared position.

Landmarks: a JSON list (or {"landmarks": [...]}) or whitespace/comma separated text of >= 68
zero-based OBJ `v` indices in iBUG-68 order. Bases: an optional .npz with `shape_basis`
[S, P, 3] / `expr_basis` [E, P, 3] over OBJ positions and optional `expr_names`/`shape_names`;
missing bases are empty (S or E = 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fica_jax.errors import UserError
from fica_jax.files import atomic_file, write_text
from fica_jax.geometry.procedural import PART_EYE_L, PART_EYE_R, PART_MOUTH, PART_NAMES, PART_SKIN
from fica_jax.geometry.template import N_LANDMARKS, HeadTemplate

_PARTS = {name: k for k, name in enumerate(PART_NAMES)}


def _index(tok: str, n: int, path, lineno: int, what: str) -> int:
    try:
        i = int(tok)
    except ValueError:
        raise UserError(f"{path}:{lineno}: {what} index {tok!r} is not an integer") from None
    i = i - 1 if i > 0 else n + i
    if not 0 <= i < n:
        raise UserError(f"{path}:{lineno}: {what} index {tok} out of range (have {n})")
    return i


def _parse_obj(path: Path):
    pos, uv, corners, part_of_face = [], [], [], []
    part = PART_SKIN
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read OBJ file ({e})") from None
    for lineno, line in enumerate(lines, 1):
        tok = line.split("#", 1)[0].split()
        if not tok:
            continue
        try:
            if tok[0] == "v":
                pos.append([float(t) for t in tok[1:4]])
                if len(pos[-1]) != 3:
                    raise ValueError
            elif tok[0] == "vt":
                uv.append([float(t) for t in tok[1:3]])
                if len(uv[-1]) != 2:
                    raise ValueError
            elif tok[0] in ("o", "g"):
                part = _PARTS.get(tok[1] if len(tok) > 1 else "", PART_SKIN)
            elif tok[0] == "f":
                if len(tok) < 4:
                    raise UserError(f"{path}:{lineno}: face needs at least 3 corners")
                face = []
                for c in tok[1:]:
                    parts = c.split("/")
                    if len(parts) < 2 or not parts[1]:
                        raise UserError(
                            f"{path}:{lineno}: face corner {c!r} has no UV index (expected v/vt)"
                        )
                    face.append(
                        (
                            _index(parts[0], len(pos), path, lineno, "vertex"),
                            _index(parts[1], len(uv), path, lineno, "UV"),
                        )
                    )
                for k in range(1, len(face) - 1):  # fan triangulation
                    corners.append([face[0], face[k], face[k + 1]])
                    part_of_face.append(part)
        except ValueError:
            raise UserError(f"{path}:{lineno}: cannot parse {line.strip()!r}") from None
    if not corners:
        raise UserError(f"{path}: no faces with UVs found (expected 'f v/vt ...' lines)")
    return np.asarray(pos), np.asarray(uv), np.asarray(corners), np.asarray(part_of_face)


def _load_landmarks(path: Path, n_pos: int) -> np.ndarray:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read landmark file ({e})") from None
    try:
        data = json.loads(text)
        if isinstance(data, dict):
            data = data.get("landmarks", data.get("landmark_ids"))
        ids = np.asarray(data, np.int64).reshape(-1)
    except (json.JSONDecodeError, TypeError, ValueError):
        try:
            ids = np.asarray([int(t) for t in text.replace(",", " ").split()], np.int64)
        except ValueError:
            raise UserError(
                f"{path}: landmarks must be a JSON list or text of vertex indices"
            ) from None
    if len(ids) < N_LANDMARKS:
        raise UserError(f"{path}: {len(ids)} landmarks, expected at least {N_LANDMARKS}")
    if ids.min() < 0 or ids.max() >= n_pos:
        raise UserError(f"{path}: landmark index out of range 0..{n_pos - 1}")
    return ids


def load_obj_template(
    obj_path: str | Path,
    landmarks_path: str | Path | None = None,
    bases_path: str | Path | None = None,
    name: str | None = None,
) -> HeadTemplate:
    """Reads an OBJ head (+ landmarks, optional bases) into a HeadTemplate; without a landmark
    file the template has none (a capture topology: no keypoints, the whole head is the face
    region)."""
    obj_path = Path(obj_path)
    pos, uv, corners, face_part = _parse_obj(obj_path)
    pair = corners[..., 0].astype(np.int64) * len(uv) + corners[..., 1]  # [F, 3]
    keys, first, inverse = np.unique(pair.reshape(-1), return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    keys = keys[order]
    faces = rank[inverse].reshape(-1, 3).astype(np.int32)
    weld = (keys // len(uv)).astype(np.int32)
    uvs = uv[keys % len(uv)] * [1, -1] + [0, 1]
    part_pos = np.full(len(pos), PART_SKIN, np.int8)
    part_pos[corners[..., 0].reshape(-1)] = np.repeat(face_part, 3)
    vpart = part_pos[weld]

    lm_pos = (np.zeros(0, np.int64) if landmarks_path is None
              else _load_landmarks(Path(landmarks_path), len(pos)))  # fmt: skip
    first_vertex = np.full(len(pos), -1, np.int64)
    first_vertex[weld[::-1]] = np.arange(len(weld))[::-1]
    if (first_vertex[lm_pos] < 0).any():
        raise UserError(f"{landmarks_path}: a landmark names an OBJ vertex used by no face")

    shape = np.zeros((0, len(weld), 3), np.float32)
    expr = np.zeros((0, len(weld), 3), np.float32)
    shape_names: tuple[str, ...] = ()
    expr_names: tuple[str, ...] = ()
    if bases_path is not None:
        try:
            with np.load(bases_path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise UserError(f"{bases_path}: cannot read bases .npz ({e})") from None
        for key in ("shape_basis", "expr_basis"):
            if key in data and (data[key].ndim != 3 or data[key].shape[1:] != (len(pos), 3)):
                raise UserError(
                    f"{bases_path}: {key} has shape {list(data[key].shape)}, "
                    f"expected [N, {len(pos)}, 3] over the OBJ's vertices"
                )
        if "shape_basis" in data:
            shape = data["shape_basis"][:, weld].astype(np.float32)
            shape_names = tuple(
                str(s) for s in data.get("shape_names", [f"shape_{i}" for i in range(len(shape))])
            )
        if "expr_basis" in data:
            expr = data["expr_basis"][:, weld].astype(np.float32)
            expr_names = tuple(
                str(s) for s in data.get("expr_names", [f"expr_{i}" for i in range(len(expr))])
            )

    eye_masks = np.stack([vpart == PART_EYE_L, vpart == PART_EYE_R])
    verts = pos[weld].astype(np.float32)
    centres = np.stack([verts[m].mean(0) if m.any() else np.zeros(3) for m in eye_masks])
    return HeadTemplate(
        name=name or obj_path.stem,
        verts=verts,
        faces=faces,
        uvs=uvs.astype(np.float32),
        weld=weld,
        part_ids=vpart.astype(np.int8),
        landmark_ids=first_vertex[lm_pos].astype(np.int32),
        shape_basis=shape,
        expr_basis=expr,
        eye_centres=centres.astype(np.float32),
        eye_masks=eye_masks,
        shape_names=shape_names,
        expr_names=expr_names,
    )


def write_obj_template(
    template: HeadTemplate,
    obj_path: str | Path,
    landmarks_path: str | Path,
    bases_path: str | Path | None = None,
) -> None:
    """Writes template as OBJ (welded positions, one vt per vertex, parts as groups) + landmarks
    JSON (+ bases .npz over the welded positions). `load_obj_template` reads it back."""
    n_pos = int(template.weld.max()) + 1
    pos = np.zeros((n_pos, 3), np.float32)
    pos[template.weld] = template.verts
    face_part = template.part_ids[template.faces[:, 0]]
    lines = [f"# {template.name}"]
    lines += [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in pos]
    lines += [f"vt {u:.9g} {1 - v:.9g}" for u, v in template.uvs]
    for part in (PART_SKIN, PART_EYE_L, PART_EYE_R, PART_MOUTH):
        sel = np.flatnonzero(face_part == part)
        if not len(sel):
            continue
        lines.append(f"g {PART_NAMES[part]}")
        for f in template.faces[sel]:
            lines.append("f " + " ".join(f"{template.weld[i] + 1}/{i + 1}" for i in f))
    write_text(obj_path, "\n".join(lines) + "\n")
    write_text(landmarks_path, json.dumps([int(template.weld[i]) for i in template.landmark_ids]))
    if bases_path is not None:

        def to_pos(b):
            out = np.zeros((len(b), n_pos, 3), np.float32)
            out[:, template.weld] = b
            return out

        with atomic_file(bases_path) as tmp:
            np.savez(
                tmp,
                shape_basis=to_pos(template.shape_basis),
                expr_basis=to_pos(template.expr_basis),
                shape_names=np.asarray(template.shape_names),
                expr_names=np.asarray(template.expr_names),
            )
