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

TILE = 192
LABEL_H = 18
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


def _tile(img: np.ndarray, label: str) -> Image.Image:
    """uint8 [h, w] or [h, w, 3] -> labelled TILE x (TILE + LABEL_H) image."""
    im = Image.fromarray(img if img.ndim == 3 else np.repeat(img[..., None], 3, -1))
    im = im.resize((TILE, TILE), Image.NEAREST if min(img.shape[:2]) < TILE else Image.BILINEAR)
    out = Image.new("RGB", (TILE, TILE + LABEL_H), (32, 32, 32))
    out.paste(im, (0, LABEL_H))
    ImageDraw.Draw(out).text((3, 3), label, fill=(255, 255, 255))
    return out


def _frame_tile(rec: dict, v: int, label: str) -> Image.Image:
    img = rec["view_image"][v]
    t = _tile(img, label)
    d = ImageDraw.Draw(t)
    sx, sy = TILE / img.shape[1], TILE / img.shape[0]
    for (x, y), vis in zip(rec["view_kpts"][v], rec["view_kpts_visible"][v], strict=True):
        px, py = x * sx, y * sy + LABEL_H
        color = (0, 255, 0) if vis else (255, 64, 64)
        d.ellipse((px - 3, py - 3, px + 3, py + 3), outline=color, fill=color)
    return t


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


def contact_sheet(rec: dict, title: str) -> Image.Image:
    uv_mask = rec["uv_mask"].astype(np.float32)
    p = np.asarray(rec["partial_uv"], np.float32)
    pmask = p[..., 3]
    row1 = [
        _tile(rec["view_image"][0], "portrait (view 0)"),
        _tile(_u8(p[..., 0:3]), "partial UV rgb"),
        _tile(_u8(pmask), "partial UV mask"),
        _tile(_u8(_normals(p[..., 4:7], pmask)), "partial UV normal"),
        _tile(_u8(_normalise(p[..., 7:10], pmask)), "partial UV vertex"),
    ]
    m0 = rec["view_mask"][0].astype(np.float32)
    uv0 = np.asarray(rec["view_uv"][0], np.float32)
    row2 = [
        _tile(rec["uv_texture"], "GT UV texture"),
        _tile(_u8(_normalise(rec["uv_geometry"], uv_mask)), "GT UV geometry (xyz)"),
        _tile(_u8(_normals(rec["uv_normal"], uv_mask)), "GT UV normal"),
        _tile(_u8(uv_mask), "UV mask"),
        _tile(
            _u8(np.concatenate([uv0, np.zeros_like(uv0[..., :1])], -1) * m0[..., None]),
            "portrait per-pixel uv",
        ),
    ]
    n_views = rec["view_image"].shape[0]
    row3 = [_frame_tile(rec, 0, "portrait + keypoints")]
    row3 += [_frame_tile(rec, v, f"frame {v} + keypoints") for v in range(1, n_views)]
    row3 = row3[:MAX_FRAMES]
    rows = [row1, row2, row3]
    cols = max(len(r) for r in rows)
    th, title_h = TILE + LABEL_H, 22
    sheet = Image.new("RGB", (cols * TILE, title_h + len(rows) * th), (0, 0, 0))
    ImageDraw.Draw(sheet).text((4, 5), title, fill=(255, 255, 0))
    for r, row in enumerate(rows):
        for c, t in enumerate(row):
            sheet.paste(t, (c * TILE, title_h + r * th))
    return sheet


def write_contact_sheet(
    data_dir: str | os.PathLike, png: str | os.PathLike, identity: str | None, split: str | None
) -> Path:
    """Renders one identity of `data_dir` to `png` (written to a temp name, then renamed)."""
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
    sheet = contact_sheet(rec, title)
    png = Path(png)
    if not png.parent.is_dir():
        raise UserError(f"{png.parent}: output directory does not exist")
    tmp = png.with_name(f".{png.name}.tmp")
    try:
        sheet.save(tmp, format="PNG")
        os.replace(tmp, png)
    finally:
        tmp.unlink(missing_ok=True)
    return png
