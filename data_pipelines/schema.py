"""Record schema of fica-jax capture shards (documented for users in `data_pipelines/SCHEMA.md`).

One record = one identity. Every record is a flat dict of numpy arrays serialised with
`np.savez` (no pickle). Symbols: R = UV resolution, H = W = image size, V = number of views
(view 0 is the *portrait*, views 1.. are multi-view "dome" frames), L = landmarks, S = identity
shape dims, E = expression dims.

Conventions (all views): cameras are OpenCV (x right, y down, z forward); `view_viewmat` maps
*head* coordinates (metres, canonical head frame, +y up, +z towards the face) to camera
coordinates; `view_K` are pixel intrinsics with pixel centres at +0.5. Per-pixel maps hold the
quantities FiCA's fine-tuned Sapiens predicts: UV coordinates in [0, 1] (u right, v down in the
UV image), vertex positions of the *posed* surface in head coordinates, and unit normals in head
coordinates; all are zero outside the mask.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fica_jax.errors import UserError

SCHEMA_VERSION = 2  # 2: partial_uv by fica_jax.geometry.unwrap (SCHEMA.md history)

# Partial UV maps (FiCA Sec. 2.1): [UV_RGB (3), UV_mask (1), UV_nrm (3), UV_vtx (3)].
PARTIAL_UV_CHANNELS = (("rgb", 3), ("mask", 1), ("nrm", 3), ("vtx", 3))
PARTIAL_UV_DIM = sum(c for _, c in PARTIAL_UV_CHANNELS)


@dataclass(frozen=True)
class Field:
    dtype: str
    shape: tuple  # symbolic dims: "R", "H", "W", "V", "L", "S", "E" or ints
    doc: str


FIELDS: dict[str, Field] = {
    # identity-level
    "schema_version": Field("int32", (), "record schema version (SCHEMA_VERSION)"),
    "identity": Field("str", (), "identity id, unique within a dataset"),
    "split": Field("str", (), "'train' or 'test' (identity-level split)"),
    "id_coeffs": Field(
        "float32", ("S",), "identity shape coefficients (synthetic data; zeros for real)"
    ),
    "uv_texture": Field("uint8", ("R", "R", 3), "ground-truth UV texture, sRGB"),
    "uv_geometry": Field(
        "float32",
        ("R", "R", 3),
        "ground-truth UV position map of the neutral head (head coords, m)",
    ),
    "uv_normal": Field("float16", ("R", "R", 3), "unit normals of the neutral head in UV space"),
    "uv_mask": Field("uint8", ("R", "R"), "1 where the UV atlas has surface"),
    "partial_uv": Field(
        "float16",
        ("R", "R", PARTIAL_UV_DIM),
        "portrait unwrapped into UV: [rgb 0..1, mask, nrm, vtx]",
    ),
    # per view (view 0 = portrait)
    "view_image": Field("uint8", ("V", "H", "W", 3), "RGB image, sRGB, background included"),
    "view_mask": Field("uint8", ("V", "H", "W"), "1 on the head (foreground)"),
    "view_uv": Field("float16", ("V", "H", "W", 2), "per-pixel UV coordinates in [0, 1]"),
    "view_vtx": Field(
        "float16", ("V", "H", "W", 3), "per-pixel posed surface position (head coords, m)"
    ),
    "view_nrm": Field("float16", ("V", "H", "W", 3), "per-pixel unit normal (head coords)"),
    "view_depth": Field("float16", ("V", "H", "W"), "camera-space z in metres, 0 on background"),
    "view_kpts": Field("float32", ("V", "L", 2), "projected 2D landmarks in pixels (x, y)"),
    "view_kpts_visible": Field("uint8", ("V", "L"), "1 where the landmark is not self-occluded"),
    "view_K": Field("float32", ("V", 3, 3), "pinhole intrinsics (pixels)"),
    "view_viewmat": Field("float32", ("V", 4, 4), "head-to-camera transform (OpenCV)"),
    "view_expression": Field(
        "float32", ("V", "E"), "expression code driving the template blendshapes"
    ),
    "view_gaze": Field("float32", ("V", 2), "eye gaze (yaw, pitch) in radians"),
    "view_uv_geometry": Field(
        "float16", ("V", "R", "R", 3), "UV position map of the posed head per view"
    ),
}

REQUIRED = tuple(FIELDS)


def _dims(record: Mapping[str, np.ndarray]) -> dict[str, int]:
    tex = np.asarray(record["uv_texture"])
    img = np.asarray(record["view_image"])
    return {
        "R": tex.shape[0],
        "V": img.shape[0],
        "H": img.shape[1],
        "W": img.shape[2],
        "L": np.asarray(record["view_kpts"]).shape[1],
        "S": np.asarray(record["id_coeffs"]).shape[0],
        "E": np.asarray(record["view_expression"]).shape[1],
    }


def validate(record: Mapping[str, np.ndarray], where: str = "record") -> None:
    """Raises UserError naming `where` and the key if the record does not follow the schema."""
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise UserError(f"{where}: missing keys {missing} (schema version {SCHEMA_VERSION})")
    version = int(np.asarray(record["schema_version"]))
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{where}: schema version {version}, expected {SCHEMA_VERSION}; "
            "re-create the shards with this version of fica-jax"
        )
    dims = _dims(record)
    for key, field in FIELDS.items():
        arr = np.asarray(record[key])
        if field.dtype == "str":
            if arr.dtype.kind != "U" or arr.shape != ():
                raise UserError(
                    f"{where}: key {key!r} must be a string, got {arr.dtype} {arr.shape}"
                )
            continue
        want = tuple(dims[d] if isinstance(d, str) else d for d in field.shape)
        if arr.dtype != np.dtype(field.dtype) or arr.shape != want:
            raise UserError(
                f"{where}: key {key!r} is {arr.dtype}{list(arr.shape)}, "
                f"expected {field.dtype}{list(want)}"
            )
    if str(np.asarray(record["split"])) not in ("train", "test"):
        raise UserError(f"{where}: split must be 'train' or 'test'")


def encode(record: Mapping[str, np.ndarray]) -> bytes:
    """Serialises a validated record (npz without pickle)."""
    validate(record)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(record[k]) for k in REQUIRED})
    return buf.getvalue()


# numpy parses each array header with `ast.literal_eval`; CPython 3.11's AST validator keeps a
# process-wide recursion counter, and Grain's reader threads parsing headers at the same time
# crash it ("SystemError: AST constructor recursion depth mismatch"). One lock serialises the
# (cheap) header parsing; the array bytes are copied outside any Python-level work.
_NPZ_LOCK = threading.Lock()


def load_npz(data: bytes, where: str = "record") -> dict[str, np.ndarray]:
    """npz bytes (no pickle) -> arrays; corrupt or truncated data is a UserError naming `where`."""
    try:
        with _NPZ_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise UserError(f"{where}: corrupt or truncated record ({type(e).__name__}: {e})") from None


def decode(data: bytes, where: str = "record") -> dict[str, np.ndarray]:
    """Parses bytes from a shard into a validated record (`load_npz`, then `validate`)."""
    record = load_npz(data, where)
    validate(record, where)
    return record
