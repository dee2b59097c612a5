"""Head templates as data: stored beside a dataset, carried into exports, looked up by key.

A dataset's UV layout is defined by its template (topology, UV atlas, landmark vertices, eye and
mouth parts, linear shape/expression bases; `template.HeadTemplate`). The synthetic heads use the
procedural template; a converted capture uses the dataset's own topology (`fica data convert
--topology OBJ`) with an expression basis fitted to its tracked meshes. Either way the dataset
folder holds `template.npz` (`save`) and `metadata.json["template"]` names it by **key**:

- a procedural template's key is its name, `fica-procedural-head-rN`, rebuilt on demand;
- any other template's key is `NAME@DIGEST` (the first 12 hex digits of the sha256 of its arrays),
  registered in this process when its dataset or an export carrying it is read (`register`).

Models refer to a template by key in their configs (the UPM's `eye_template`), so an export that
carries the template's arrays (`to_arrays`) rebuilds the same model anywhere, and two templates
with the same name but different arrays never pass for each other.
"""

from __future__ import annotations

import hashlib
import io
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from fica_jax.errors import UserError
from fica_jax.files import atomic_file
from fica_jax.geometry.template import HeadTemplate, make_head_template, uv_regions

TEMPLATE_FILE = "template.npz"
PROCEDURAL = "fica-procedural-head-r"
# canonical dtypes: an export stores every array as float32 and `from_arrays` casts them back
_ARRAYS = {"verts": np.float32, "faces": np.int32, "uvs": np.float32, "weld": np.int32,
           "part_ids": np.int8, "landmark_ids": np.int32, "shape_basis": np.float32,
           "expr_basis": np.float32, "eye_centres": np.float32, "eye_masks": bool}  # fmt: skip
_NAMES = ("shape_names", "expr_names")
_REGISTRY: dict[str, HeadTemplate] = {}


def to_arrays(t: HeadTemplate, names: bool = True) -> dict[str, np.ndarray]:
    """The template as flat numpy arrays in canonical dtypes, `from_arrays`' input; with
    `names`, also its name and basis names as unicode arrays (an export keeps those in JSON)."""
    out = {k: np.asarray(getattr(t, k), dtype) for k, dtype in _ARRAYS.items()}
    if names:
        out |= {k: np.asarray(getattr(t, k), dtype=np.str_) for k in _NAMES}
        out["name"] = np.asarray(t.name, dtype=np.str_)
    return out


def from_arrays(arrays: dict, where: str) -> HeadTemplate:
    """Inverse of `to_arrays` (names may be lists, as an export's JSON holds them)."""
    missing = [k for k in (*_ARRAYS, *_NAMES, "name") if k not in arrays]
    if missing:
        raise UserError(f"{where}: template arrays lack {missing}")
    return HeadTemplate(
        name=str(arrays["name"]),
        **{k: np.asarray(arrays[k]).astype(dtype) for k, dtype in _ARRAYS.items()},
        **{k: tuple(str(s) for s in np.asarray(arrays[k]).reshape(-1)) for k in _NAMES},
    )


def digest(t: HeadTemplate) -> str:
    """sha256 over the template's arrays and names (hex)."""
    h = hashlib.sha256()
    for k, v in sorted(to_arrays(t).items()):
        v = np.ascontiguousarray(v)
        h.update(f"{k}:{v.dtype.str}:{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


@lru_cache(maxsize=16)  # templates are immutable and hash by identity
def key(t: HeadTemplate) -> str:
    """How configs and metadata name `t` (module docstring)."""
    if t.name.startswith(PROCEDURAL) and procedural(t.name) is not None:
        if digest(procedural(t.name)) == digest(t):
            return t.name
    return f"{t.name}@{digest(t)[:12]}"


def procedural(name: str) -> HeadTemplate | None:
    """The procedural template `name` names (`fica-procedural-head-rN`), else None."""
    n = name[len(PROCEDURAL) :]
    return make_head_template(int(n)) if name.startswith(PROCEDURAL) and n.isdigit() else None


def register(t: HeadTemplate) -> str:
    """Makes `t` resolvable by its key in this process; returns the key."""
    k = key(t)
    _REGISTRY.setdefault(k, t)
    return k


def resolve(template_key: str) -> HeadTemplate:
    """The template a key names: procedural ones are rebuilt, others must be registered (by
    reading their dataset with `dataset_template` or an export that carries them)."""
    if template_key in _REGISTRY:
        return _REGISTRY[template_key]
    if (t := procedural(template_key)) is not None:
        return t
    raise UserError(
        f"head template {template_key!r} is not loaded: read the dataset or the export that "
        "carries it first (its template.npz)"
    )


@lru_cache(maxsize=8)
def named_uv_regions(template_key: str, resolution: int) -> dict[str, np.ndarray]:
    """`template.uv_regions` of the template `template_key` names (`resolve`); cached."""
    return uv_regions(resolve(template_key), resolution)


def metadata(t: HeadTemplate) -> dict:
    """What a dataset's metadata.json says of its template (the arrays are in template.npz)."""
    return {
        "template": t.name,
        "key": key(t),
        "digest": digest(t),
        "file": TEMPLATE_FILE,
        "n_vertices": int(t.n_verts),
        "n_faces": int(len(t.faces)),
        "n_landmarks": int(len(t.landmark_ids)),
        "landmark_layout": "ibug68" if len(t.landmark_ids) >= 68 else "none",
        "shape_dims": int(t.n_shape),
        "shape_names": list(t.shape_names),
        "expression_dims": int(t.n_expr),
        "expression_names": list(t.expr_names),
        "has_eyes": bool(t.eye_masks.any()),
    }


def save(t: HeadTemplate, directory: str | os.PathLike) -> Path:
    """Writes `directory/template.npz` atomically."""
    path = Path(directory) / TEMPLATE_FILE
    buf = io.BytesIO()
    np.savez_compressed(buf, **to_arrays(t))
    with atomic_file(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def load(path: str | os.PathLike, expect_digest: str | None = None) -> HeadTemplate:
    """Reads a template.npz (checked against `expect_digest` when given) and registers it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            t = from_arrays({k: z[k] for k in z.files}, str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the head template ({e})") from None
    if expect_digest and digest(t) != expect_digest:
        raise UserError(f"{path}: template digest {digest(t)[:12]} != metadata's "
                        f"{expect_digest[:12]} (the file was replaced)")  # fmt: skip
    register(t)
    return t


def from_metadata(info: dict, directory: str | os.PathLike, where: str) -> HeadTemplate | None:
    """The template `metadata.json["template"]` (`info`) describes, read from `directory`; None
    when the dataset has none (a folder-layout conversion without --topology)."""
    if info.get("file"):
        return load(Path(directory) / info["file"], info.get("digest"))
    name = info.get("template", "")
    if not name:
        return None
    if (t := procedural(name)) is None:
        raise UserError(f"{where}: template {name!r} has no {TEMPLATE_FILE} and is not "
                        f"procedural ({PROCEDURAL}N)")  # fmt: skip
    return t


def check_same(a: dict, b: dict, what_a: str, what_b: str) -> None:
    """One line when two template metadata dicts (`metadata`) name different templates; silent
    when either side has no template recorded (older exports, folder conversions)."""
    ka, kb = a.get("key") or a.get("template"), b.get("key") or b.get("template")
    if ka and kb and ka != kb:
        raise UserError(f"{what_a} is laid out on head template {ka!r}, {what_b} on {kb!r}: "
                        "UV maps of different templates cannot be mixed")  # fmt: skip


# ----------------------------------------------------------------------------- exports
def export_stats(t: HeadTemplate) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON, arrays) an export carries so that it rebuilds its template anywhere."""
    arrays = {f"template.{k}": v for k, v in to_arrays(t, names=False).items()}
    return {"template": metadata(t)}, arrays


def register_export(stats: dict, arrays: dict[str, np.ndarray], where: str) -> str | None:
    """Registers the template an export carries (`export_stats`); returns its key, None when the
    export carries none (a procedural key in its metadata alone still resolves)."""
    info = stats.get("template", {})
    found = {k[len("template.") :]: v for k, v in arrays.items() if k.startswith("template.")}
    if not found:
        return info.get("key") or None
    names = {"name": info.get("template", ""), "shape_names": info.get("shape_names", []),
             "expr_names": info.get("expression_names", [])}  # fmt: skip
    t = from_arrays(found | names, where)
    k = register(t)
    if info.get("key") and info["key"] != k:
        raise UserError(f"{where}: carries template {k!r} but its metadata names {info['key']!r}")
    return k
