"""`fica data convert`: a real-capture folder -> capture shards (layout: SCHEMA.md "Real captures").

Each `SRC/<identity>/` directory becomes one schema record. Required: `portrait.png`,
`uv_texture.png`, `uv_geometry.npy`, `cameras.json`; everything else is optional and either
derived (uv_normal from the geometry, uv_mask from non-zero geometry, view_depth from the dense
vertex maps, partial_uv by unwrapping the portrait's dense maps into UV as FiCA Sec. 2.1 does with
Sapiens' predictions, with the synthetic generator's `fica_jax.geometry.unwrap`) or filled with zeros as documented. Every missing or ill-shaped file is a
`UserError` naming the file and the expected shape.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines import schema
from data_pipelines.crops import crop_image, crop_intrinsics, crop_nearest
from data_pipelines.shards import DEFAULT_RECORDS_PER_SHARD, DatasetWriter
from fica_jax.errors import UserError
from fica_jax.geometry.unwrap import unwrap_partial


# ----------------------------------------------------------------------------- file readers
def read_rgb(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 [H, W, 3] and, for RGBA files, the alpha channel as a 0/1 mask."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im.convert("RGBA" if mode in ("RGBA", "LA", "PA") else "RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None
    if arr.shape[-1] == 4:
        return np.ascontiguousarray(arr[..., :3]), (arr[..., 3] > 127).astype(np.uint8)
    return arr, None


def read_mask(path: Path, hw: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read mask ({e})") from None
    _check_shape(path, arr, hw)
    return (arr > 127).astype(np.uint8)


def read_npy(path: Path, shape: tuple[int | None, ...]) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: cannot read .npy ({e})") from None
    if not np.issubdtype(arr.dtype, np.number):
        raise UserError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    _check_shape(path, arr, shape)
    return arr.astype(np.float32)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None


def _check_shape(path: Path, arr: np.ndarray, shape: tuple[int | None, ...]) -> None:
    ok = arr.ndim == len(shape) and all(
        w is None or a == w for a, w in zip(arr.shape, shape, strict=False)
    )
    if not ok:
        want = "x".join("?" if w is None else str(w) for w in shape)
        raise UserError(f"{path}: shape {list(arr.shape)}, expected [{want}]")


def _array(path: Path, key: str, value: Any, shape: tuple[int | None, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {key!r} is not a numeric array") from None
    _check_shape(path.with_name(f"{path.name}:{key}"), arr, shape)
    return arr


# ----------------------------------------------------------------------------- derivations
def normals_from_geometry(geom: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[R, R, 3] position map -> unit normals (cross of the UV tangents), pointing away from the
    surface centroid (atlas charts may be mirrored, so the sign is fixed per texel)."""
    du = np.gradient(geom, axis=1)
    dv = np.gradient(geom, axis=0)
    n = np.cross(du, dv)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    centroid = geom[mask > 0].mean(0) if mask.any() else np.zeros(3, np.float32)
    flip = np.sum(n * (geom - centroid), -1, keepdims=True) < 0
    n = np.where(flip, -n, n)
    return (n * (mask[..., None] > 0)).astype(np.float32)


def depth_from_vtx(vtx: np.ndarray, viewmat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    z = vtx @ viewmat[2, :3] + viewmat[2, 3]
    return (z * (mask > 0)).astype(np.float32)


# ----------------------------------------------------------------------------- one identity
def convert_identity(d: Path, split: str, align: bool = False) -> dict[str, np.ndarray]:
    """Reads `d` (one identity folder) into a schema record; with `align`, the portrait (and its
    mask, dense maps, keypoints and K) is cropped as `fica generate` crops a photo
    (`data_pipelines.align`)."""
    _check_required(d)
    portrait, alpha = read_rgb(d / "portrait.png")
    H, W = portrait.shape[:2]
    tex, geom, uv_mask, uv_normal = _read_uv_maps(d)
    R = tex.shape[0]
    images, masks = _read_views(d, portrait, alpha)
    V = len(images)
    Ks, vms = _read_cameras(d / "cameras.json", V)
    expr, gaze, kpts, vis = _read_annotations(d / "annotations.json", V)
    maps = _read_dense(d, masks, (H, W))
    if align:
        _align_portrait(d, images, masks, maps, Ks, kpts, vis)
    posed = np.repeat(geom[None], V, 0)
    for v in range(V):
        p = d / "uv_geometry_posed" / f"{v:03d}.npy"
        if p.is_file():
            posed[v] = read_npy(p, (R, R, 3))

    img = np.stack(images)
    msk = np.stack(masks)
    depth = np.stack([depth_from_vtx(maps["vtx"][v], vms[v], msk[v]) for v in range(V)])
    depth *= np.any(maps["vtx"] != 0, -1)  # no vertex map -> no depth
    partial = np.zeros((R, R, schema.PARTIAL_UV_DIM), np.float32)
    if np.any(maps["uv"][0]):  # without the portrait's UV map there is nothing to unwrap
        partial = np.asarray(unwrap_partial(img[0] / 255.0, msk[0], maps["uv"][0], maps["nrm"][0],
                                            maps["vtx"][0], resolution=R))  # fmt: skip
    rec = {
        "schema_version": np.int32(schema.SCHEMA_VERSION),
        "identity": np.str_(d.name),
        "split": np.str_(split),
        "id_coeffs": np.zeros((0,), np.float32),
        "uv_texture": tex,
        "uv_geometry": geom,
        "uv_normal": uv_normal.astype(np.float16),
        "uv_mask": uv_mask,
        "partial_uv": partial.astype(np.float16),
        "view_image": img,
        "view_mask": msk,
        "view_uv": maps["uv"].astype(np.float16),
        "view_vtx": maps["vtx"].astype(np.float16),
        "view_nrm": maps["nrm"].astype(np.float16),
        "view_depth": depth.astype(np.float16),
        "view_kpts": kpts,
        "view_kpts_visible": (vis > 0).astype(np.uint8),
        "view_K": np.stack(Ks),
        "view_viewmat": np.stack(vms),
        "view_expression": expr,
        "view_gaze": gaze,
        "view_uv_geometry": posed.astype(np.float16),
    }
    schema.validate(rec, where=str(d))
    return rec


def _align_portrait(d: Path, images, masks, maps, Ks, kpts, vis) -> None:
    """View 0 re-cropped in place by the face detector's rule, at its own size."""
    from data_pipelines.align import align_portrait

    h, w = images[0].shape[:2]
    if h != w:
        raise UserError(f"{d / 'portrait.png'}: --align keeps the portrait's size and needs a "
                        f"square one, got {w}x{h}")  # fmt: skip
    _, (x0, y0, x1, _) = align_portrait(images[0], h, where=str(d / "portrait.png"))
    box = (float(x0), float(y0), float(x1 - x0))
    images[0] = crop_image(images[0], box, h, pad="edge")  # as `fica generate` crops
    masks[0] = crop_nearest(masks[0], box, h)
    for k in maps:
        maps[k][0] = crop_nearest(maps[k][0], box, h)
    Ks[0] = crop_intrinsics(Ks[0], box, h)
    s = h / box[2]
    kpts[0] = (kpts[0] - np.array([box[0], box[1]])) * s
    vis[0] *= np.all((kpts[0] >= 0) & (kpts[0] < h), -1)


def _check_required(d: Path) -> None:
    for name in ("portrait.png", "uv_texture.png", "cameras.json"):
        if not (d / name).is_file():
            raise UserError(f"{d / name}: required file is missing")
    if not (d / "uv_geometry.npy").is_file():
        if (d / "uv_geometry.exr").is_file():
            raise UserError(
                f"{d / 'uv_geometry.exr'}: EXR is not supported (no OpenEXR dependency); "
                "save the position map as uv_geometry.npy (float32 [R, R, 3])"
            )
        raise UserError(f"{d / 'uv_geometry.npy'}: required file is missing")


def _read_uv_maps(d: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(texture [R, R, 3] uint8, geometry [R, R, 3], mask [R, R], normals [R, R, 3]); the
    optional mask and normals derived from the geometry where their files are absent."""
    tex, _ = read_rgb(d / "uv_texture.png")
    R = tex.shape[0]
    _check_shape(d / "uv_texture.png", tex, (R, R, 3))
    geom = read_npy(d / "uv_geometry.npy", (R, R, 3))
    uv_mask = (
        read_mask(d / "uv_mask.png", (R, R))
        if (d / "uv_mask.png").is_file()
        else np.any(geom != 0, -1).astype(np.uint8)
    )
    uv_normal = (
        read_npy(d / "uv_normal.npy", (R, R, 3))
        if (d / "uv_normal.npy").is_file()
        else normals_from_geometry(geom, uv_mask)
    )
    return tex, geom, uv_mask, uv_normal


def _read_views(
    d: Path, portrait: np.ndarray, alpha: np.ndarray | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images [H, W, 3] and masks [H, W] of view 0 = the portrait, then frames/NNN.png in name
    order; a mask is its own file, else the image's alpha, else all ones."""
    H, W = portrait.shape[:2]
    frames = sorted((d / "frames").glob("[0-9][0-9][0-9].png")) if (d / "frames").is_dir() else []
    images, masks = [portrait], []
    if (d / "portrait_mask.png").is_file():
        masks.append(read_mask(d / "portrait_mask.png", (H, W)))
    else:
        masks.append(alpha if alpha is not None else np.ones((H, W), np.uint8))
    for f in frames:
        img, a = read_rgb(f)
        _check_shape(f, img, (H, W, 3))
        images.append(img)
        m = f.with_name(f"{f.stem}_mask.png")
        masks.append(
            read_mask(m, (H, W))
            if m.is_file()
            else (a if a is not None else np.ones((H, W), np.uint8))
        )
    return images, masks


def _read_cameras(cams_path: Path, V: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """K [3, 3] and viewmat [4, 4] of each of the V views."""
    cams = read_json(cams_path)
    views = cams.get("views") if isinstance(cams, dict) else None
    if not isinstance(views, list) or len(views) != V:
        raise UserError(
            f"{cams_path}: expected {{'views': [...]}} with {V} entries "
            f"(portrait + {V - 1} frames), got {len(views) if isinstance(views, list) else views!r}"
        )
    Ks, vms = [], []
    for i, v in enumerate(views):
        if not isinstance(v, dict) or "K" not in v or "viewmat" not in v:
            raise UserError(f"{cams_path}: views[{i}] needs 'K' (3x3) and 'viewmat' (4x4)")
        Ks.append(_array(cams_path, f"views[{i}].K", v["K"], (3, 3)))
        vms.append(_array(cams_path, f"views[{i}].viewmat", v["viewmat"], (4, 4)))
    return Ks, vms


def _read_annotations(ann_path: Path, V: int) -> tuple[np.ndarray, ...]:
    """(expression [V, E], gaze [V, 2], kpts [V, L, 2], kpts_visible [V, L]); zeros (visible:
    ones) for what the optional file leaves out."""
    ann = read_json(ann_path) if ann_path.is_file() else {}
    if not isinstance(ann, dict):
        raise UserError(f"{ann_path}: expected a JSON object")
    expr = _array(ann_path, "expression", ann.get("expression", np.zeros((V, 0))), (V, None))
    gaze = _array(ann_path, "gaze", ann.get("gaze", np.zeros((V, 2))), (V, 2))
    kpts = _array(ann_path, "kpts", ann.get("kpts", np.zeros((V, 0, 2))), (V, None, 2))
    L = kpts.shape[1]
    vis = _array(ann_path, "kpts_visible", ann.get("kpts_visible", np.ones((V, L))), (V, L))
    return expr, gaze, kpts, vis


def _read_dense(d: Path, masks: list[np.ndarray], hw: tuple[int, int]) -> dict[str, np.ndarray]:
    """{"uv": [V, H, W, 2], "vtx", "nrm": [V, H, W, 3]} from dense/NNN_KEY.npy, masked by each
    view's mask; zeros where a file is absent."""
    dense = {"uv": 2, "vtx": 3, "nrm": 3}
    maps = {k: np.zeros((len(masks), *hw, c), np.float32) for k, c in dense.items()}
    for v in range(len(masks)):
        for k, c in dense.items():
            p = d / "dense" / f"{v:03d}_{k}.npy"
            if p.is_file():
                maps[k][v] = read_npy(p, (*hw, c)) * (masks[v][..., None] > 0)
    return maps


def read_split(src: Path, identities: list[str]) -> dict[str, str]:
    """identity -> split from SRC/split.json ({"test": [ids]}; unlisted ids are train)."""
    path = src / "split.json"
    if not path.is_file():
        return dict.fromkeys(identities, "train")
    spec = read_json(path)
    if not isinstance(spec, dict) or set(spec) - {"train", "test"}:
        raise UserError(f"{path}: expected {{'train': [ids], 'test': [ids]}} (either optional)")
    out = dict.fromkeys(identities, "train")
    for split, ids in spec.items():
        if not isinstance(ids, list):
            raise UserError(f"{path}: {split!r} must be a list of identity folder names")
        for i in ids:
            if i not in out:
                raise UserError(f"{path}: identity {i!r} has no folder {src / str(i)}")
            out[i] = split
    return out


def convert_capture(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    align: bool = False,
) -> int:
    """Converts every identity folder of `src` into shards at `out`; returns the count. `align`
    crops each portrait by the face detector's rule (`convert_identity`)."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"{src}: capture folder does not exist")
    ids = sorted(p.name for p in src.iterdir() if p.is_dir() and p.name[0] not in "._")
    if not ids:
        raise UserError(f"{src}: no identity folders (expected SRC/<identity>/portrait.png ...)")
    splits = read_split(src, ids)
    gen = {"name": "fica data convert", "src": str(src.resolve()), "identities": len(ids)}
    with DatasetWriter(
        out, overwrite=overwrite, records_per_shard=records_per_shard, generator=gen
    ) as w:
        for i in ids:
            w.add(convert_identity(src / i, splits[i], align), where=str(src / i))
    return len(ids)
