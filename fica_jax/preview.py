"""Preview sheets: labelled grids of images, the one picture format every stage's previews,
`fica sample`, `fica render --out x.png`, `fica data inspect`, the eval report and the demo
write (PNG, atomically)."""

from __future__ import annotations

import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw

from fica_jax.files import atomic_file

LABEL_H = 14  # px of label text above each tile (and of the optional title above the grid)


def tile_image(img, tile: int) -> Image.Image:
    """An image as a `tile` x `tile` RGB tile. `img`: float in [0, 1] or uint8, [h, w], [h, w, 1]
    or [h, w, 3], or a PIL image. Enlarged with nearest neighbour (texels stay visible), shrunk
    bilinearly."""
    if isinstance(img, Image.Image):
        im = img.convert("RGB")
    else:
        a = np.asarray(img)
        if a.dtype != np.uint8:
            a = (np.clip(np.asarray(img, np.float32), 0, 1) * 255).astype(np.uint8)
        im = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a).convert("RGB")
    return im.resize((tile, tile), Image.BILINEAR if min(im.size) > tile else Image.NEAREST)


def sheet_image(
    rows: list[list[tuple[str, np.ndarray | Image.Image]]], tile: int = 128, title: str = ""
) -> Image.Image:
    """A labelled grid: one (label, image) per tile (`tile_image`), rows top to bottom."""
    top = LABEL_H if title else 0
    w, h = tile * max(len(r) for r in rows), top + (tile + LABEL_H) * len(rows)
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((2, 0), title, fill="black")
    for i, row in enumerate(rows):
        y = top + i * (tile + LABEL_H)
        for j, (label, img) in enumerate(row):
            sheet.paste(tile_image(img, tile), (j * tile, y + LABEL_H))
            draw.text((j * tile + 2, y), label, fill="black")
    return sheet


def write_sheet(
    rows: list[list[tuple[str, np.ndarray | Image.Image]]],
    path: str | os.PathLike,
    tile: int = 128,
    title: str = "",
) -> np.ndarray:
    """`sheet_image` written atomically as a PNG; returns the RGB array [H, W, 3] uint8."""
    sheet = sheet_image(rows, tile, title)
    with atomic_file(path) as tmp:
        sheet.save(tmp, format="PNG")
    return np.asarray(sheet)


def write_step_sheet(
    rows: list[list[tuple[str, np.ndarray | Image.Image]]], workdir: str | os.PathLike, step: int
) -> np.ndarray | None:
    """A training run's preview at `step`: `WORKDIR/samples/step_XXXXXXX.png` and the image
    `samples` of its TensorBoard log (`WORKDIR/tb`). Process 0 writes; the others return None."""
    import jax

    if jax.process_index() != 0:
        return None
    sheet = write_sheet(rows, pathlib.Path(workdir) / "samples" / f"step_{step:07d}.png")
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(pathlib.Path(workdir) / "tb")) as tb:
        tb.add_image("samples", sheet, step, dataformats="HWC")
    return sheet
