"""Square crops of capture images with the intrinsics and per-pixel maps that go with them.

A crop is `(x0, y0, side)` in continuous pixel coordinates of the source (pixel centres at +0.5,
as every K here): source point x lands at (x - x0) * size / side in the size x size crop, so the
intrinsics are pre-multiplied by that affine map with no half-pixel shift. Used by `fica data
convert` (the multi-view formats' head crops, the folder format's `--align`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def crop_box(xy: np.ndarray, fill: float) -> tuple[float, float, float]:
    """(x0, y0, side) of the square centred on the points' bounding box, which fills `fill` of
    its side."""
    lo, hi = xy.min(0), xy.max(0)
    side = float(max(hi - lo)) / fill
    c = (lo + hi) / 2
    return float(c[0] - side / 2), float(c[1] - side / 2), side


def crop_image(img: np.ndarray, box: tuple[float, float, float], size: int,
               pad: str = "constant") -> np.ndarray:  # fmt: skip
    """The square `box` of `img` [H, W, 3] uint8 (continuous pixel coordinates; beyond the image
    black, or with `pad="edge"` its edge pixels repeated) resized to size x size, area-weighted
    when shrinking."""
    x0, y0, side = box
    h, w = img.shape[:2]
    # the whole pixels the box touches, padded where they leave the image; then the filter
    # reads only those (an integer box is cut exactly and resized whole)
    ix0, iy0 = int(np.floor(x0)), int(np.floor(y0))
    ix1, iy1 = int(np.ceil(x0 + side)), int(np.ceil(y0 + side))
    cut = img[max(iy0, 0) : max(min(iy1, h), 0), max(ix0, 0) : max(min(ix1, w), 0)]
    pads = ((max(-iy0, 0), max(iy1 - max(h, iy0), 0)), (max(-ix0, 0), max(ix1 - max(w, ix0), 0)))
    if cut.size == 0:  # wholly outside: nothing to repeat
        cut, pad = np.zeros((1, 1, 3), np.uint8), "constant"
        pads = ((0, iy1 - iy0 - 1), (0, ix1 - ix0 - 1))
    cut = np.pad(cut, (*pads, (0, 0)), mode=pad)
    # PIL's bilinear filter widens its support when shrinking (area-weighted, no aliasing)
    out = Image.fromarray(cut).resize(
        (size, size),
        Image.Resampling.BILINEAR,
        box=(x0 - ix0, y0 - iy0, x0 - ix0 + side, y0 - iy0 + side),
    )
    return np.asarray(out, np.uint8)


def crop_intrinsics(K: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """K of the crop: source pixel coordinate x maps to (x - x0) * size / side (no half-pixel
    shift: both use pixel centres at +0.5)."""
    x0, y0, side = box
    s = size / side
    a = np.array([[s, 0, -x0 * s], [0, s, -y0 * s], [0, 0, 1]])
    return (a @ K).astype(np.float32)


def crop_nearest(values: np.ndarray, box: tuple[float, float, float], size: int) -> np.ndarray:
    """The same crop of a per-pixel map [H, W, ...] (masks, UV / vertex / normal images) by
    nearest sampling at the crop's pixel centres; zero beyond the source."""
    x0, y0, side = box
    h, w = values.shape[:2]
    centres = (np.arange(size) + 0.5) * side / size
    ix = np.floor(x0 + centres).astype(np.int64)
    iy = np.floor(y0 + centres).astype(np.int64)
    inside = ((iy >= 0) & (iy < h))[:, None] & ((ix >= 0) & (ix < w))[None, :]
    out = values[np.clip(iy, 0, h - 1)][:, np.clip(ix, 0, w - 1)]
    return out * inside.reshape(inside.shape + (1,) * (values.ndim - 2)).astype(values.dtype)
