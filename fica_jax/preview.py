"""Preview sheets: labelled grids of images, the one picture format every stage's previews,
`fica sample`, `fica render --out x.png`, the eval report and the demo write (PNG, atomically)."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from fica_jax.files import atomic_file


def write_sheet(
    rows: list[list[tuple[str, np.ndarray]]], path: str | os.PathLike, tile: int = 128
) -> np.ndarray:
    """A labelled grid of `tile`-px images, written atomically; returns the RGB array."""
    label_h = 14
    w, h = tile * max(len(r) for r in rows), (tile + label_h) * len(rows)
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, (label, img) in enumerate(row):
            u8 = (np.clip(np.asarray(img, np.float32), 0, 1) * 255).astype(np.uint8)
            sheet.paste(
                Image.fromarray(u8).resize((tile, tile), Image.NEAREST),
                (j * tile, i * (tile + label_h) + label_h),
            )
            draw.text((j * tile + 2, i * (tile + label_h)), label, fill="black")
    with atomic_file(path) as tmp:
        sheet.save(tmp, format="PNG")
    return np.asarray(sheet)
