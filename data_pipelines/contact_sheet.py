"""`fica data inspect`: a labelled contact sheet of one identity, for a person to check data.

Rows: (1) the portrait and its partial UV maps [rgb, mask, normal, vertex] (FiCA Sec. 2.1, the
diffusion model's condition); (2) the ground-truth UV texture, geometry, normal and mask (the
diffusion/UPM targets) plus the portrait's per-pixel UV coordinates; (3) dome frames with their
2D keypoints (green visible, red occluded). Position maps are shown min-max normalised per
channel over the mask, normals as (n + 1) / 2.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_pipelines.source import CaptureSource
from fica_jax.errors import UserError
from fica_jax.preview import tile_image, write_sheet

TILE = 192
MAX_FRAMES = 5


def _u8(x: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(x, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def _normalise(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """[..., C] -> [0, 1] per channel using the range inside the mask."""
    x = np.asarray(x, np.float32)
    sel = x[mask > 0] if mask is not None and mask.any() else x.reshape(-1, x.shape[-1])
    lo, hi = sel.min(0), sel.max(0)
    out = (x - lo) / np.maximum(hi - lo, 1e-8)
    return out * (mask[..., None] > 0) if mask is not None else out


def _normals(n: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    out = (np.asarray(n, np.float32) + 1) / 2
    return out * (mask[..., None] > 0) if mask is not None else out


def _frame_tile(rec: dict, v: int, label: str) -> tuple[str, Image.Image]:
    """(label, frame v at TILE px with its 2D keypoints drawn on)."""
    img = rec["view_image"][v]
    t = tile_image(img, TILE)
    d = ImageDraw.Draw(t)
    sx, sy = TILE / img.shape[1], TILE / img.shape[0]
    for (x, y), vis in zip(rec["view_kpts"][v], rec["view_kpts_visible"][v], strict=True):
        px, py = x * sx, y * sy
        color = (0, 255, 0) if vis else (255, 64, 64)
        d.ellipse((px - 3, py - 3, px + 3, py + 3), outline=color, fill=color)
    return label, t


def select_record(src: CaptureSource, identity: str | None) -> dict:
    if identity is None:
        return src[0]
    if identity.isdigit() and int(identity) < len(src):
        return src[int(identity)]
    for i in range(len(src)):
        rec = src[i]
        if str(rec["identity"]) == identity:
            return rec
    raise UserError(
        f"{src.data_dir}: no identity {identity!r} in split {src.split!r} "
        f"({len(src)} records; give an index or an identity id)"
    )


def contact_rows(rec: dict) -> list[list[tuple[str, np.ndarray | Image.Image]]]:
    """The sheet's three rows of (label, image) (module doc)."""
    uv_mask = rec["uv_mask"].astype(np.float32)
    p = np.asarray(rec["partial_uv"], np.float32)
    pmask = p[..., 3]
    row1 = [
        ("portrait (view 0)", rec["view_image"][0]),
        ("partial UV rgb", _u8(p[..., 0:3])),
        ("partial UV mask", _u8(pmask)),
        ("partial UV normal", _u8(_normals(p[..., 4:7], pmask))),
        ("partial UV vertex", _u8(_normalise(p[..., 7:10], pmask))),
    ]
    m0 = rec["view_mask"][0].astype(np.float32)
    uv0 = np.asarray(rec["view_uv"][0], np.float32)
    row2 = [
        ("GT UV texture", rec["uv_texture"]),
        ("GT UV geometry (xyz)", _u8(_normalise(rec["uv_geometry"], uv_mask))),
        ("GT UV normal", _u8(_normals(rec["uv_normal"], uv_mask))),
        ("UV mask", _u8(uv_mask)),
        (
            "portrait per-pixel uv",
            _u8(np.concatenate([uv0, np.zeros_like(uv0[..., :1])], -1) * m0[..., None]),
        ),
    ]
    n_views = rec["view_image"].shape[0]
    row3 = [_frame_tile(rec, 0, "portrait + keypoints")]
    row3 += [_frame_tile(rec, v, f"frame {v} + keypoints") for v in range(1, n_views)]
    return [row1, row2, row3[:MAX_FRAMES]]


def write_contact_sheet(
    data_dir: str | os.PathLike, png: str | os.PathLike, identity: str | None, split: str | None
) -> Path:
    """Renders one identity of `data_dir` to `png` (`fica_jax.preview.write_sheet`)."""
    from data_pipelines.shards import read_metadata

    meta = read_metadata(data_dir)
    if split is None:
        split = next((s for s, i in meta["splits"].items() if i.get("num_records")), "train")
    src = CaptureSource(data_dir, split)
    if len(src) == 0:
        raise UserError(f"{data_dir}: split {split!r} has no records")
    rec = select_record(src, identity)
    title = (
        f"{Path(data_dir).name}  identity {rec['identity']} ({rec['split']})  "
        f"R={rec['uv_texture'].shape[0]}  image={rec['view_image'].shape[1]}  "
        f"views={rec['view_image'].shape[0]}"
    )
    png = Path(png)
    if not png.parent.is_dir():
        raise UserError(f"{png.parent}: output directory does not exist")
    write_sheet(contact_rows(rec), png, TILE, title)
    return png
