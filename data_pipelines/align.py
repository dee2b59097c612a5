"""Finding the face in an in-the-wild portrait and framing it like a training portrait.

FiCA's dense predictor (paper Sec. 2.1) only sees portraits framed the way its training captures
are: a head filling roughly half the frame, near the centre. A phone photo, an upper-body shot or
a group picture is framed differently, so `fica generate` (and `data_pipelines/convert.py` for
real captures) first finds the face and cuts out the square that puts it where the training
portraits have theirs.

* Detector: OpenCV's Viola-Jones Haar cascades, whose weights ship inside the
  `opencv-python-headless` wheel (`cv2.data.haarcascades`; nothing is downloaded at run time).
  The frontal-face cascade runs first; only when it finds nothing does the profile cascade run,
  on the image and on its mirror (it knows one facing direction). Of several faces the largest
  is taken: a portrait's subject is the biggest face in it. The image is scaled before detecting
  so that its short side is at least `DETECT_MIN` px (the cascades' 24 px window needs it on
  64 px portraits) and, otherwise, its long side at most `DETECT_MAX` px (speed).
  scikit-image's LBP cascade was measured too (`measure_framing`'s procedure, 200 synthetic
  portraits): fewer synthetic faces at 2x, false faces at 4x, a stray box on the astronaut photo
  and ~8x slower; the Haar cascades win on both kinds of image.
* Rule: `FRAMING`, one row per cascade: the face box's side and its centre's offset from the
  frame centre, both as fractions of the frame side, as the detector sees them on the synthetic
  training portraits (`data_pipelines/synthetic/generator.py`, view 0). `crop_box` inverts it:
  the square whose frame puts the detected box at that relative size and offset.
* Outside the image the square is filled by repeating the edge pixels.
* Known gap: on the narrow procedural heads the frontal box spans about the whole head width
  (1.07x the mask's width), on a real face only cheek to cheek, so a real head with its hair
  fills more of its crop (about 0.7 of the side on tests/data/astronaut.jpg) than a synthetic
  head does of its frame (about 0.47): the face matches the training framing, the head does not.

`align_portrait(image, size)` is the whole path for callers holding an array;
`detect_faces`, `crop_box` and `crop_square` are its parts.
"""

from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from data_pipelines.crops import crop_image
from fica_jax.errors import UserError

MIN_SIDE = 32  # px: below this an image cannot carry a face the predictor could use
DETECT_MIN, DETECT_MAX = 128, 1024  # px: short side scaled up to / long side down to
MIN_NEIGHBOURS = 4  # overlapping hits a face needs (OpenCV's 3 also fired on coins and a clock)
BLANK_RANGE = 4  # grey levels: an image whose pixels all lie within this range is blank


@dataclasses.dataclass(frozen=True)
class Framing:
    """Where a cascade's face box sits in a training portrait (fractions of the frame side)."""

    side: float  # box side / frame side
    dx: float  # (box centre - frame centre) / frame side, x right; for the un-mirrored cascade
    dy: float  # the same, y down


# Measured by `measure_framing(identities=200, image_size=64, seed=0)`: the median over the
# synthetic portraits (view 0 of generator identities 0..199) whose chosen face came from that
# cascade. Frontal: 35 portraits (the others are turned beyond its reach, or too stylised for
# it); profile: 50 of the rest; 115 had no face. The spread (interquartile range) of `side` is
# 0.074 for frontal and 0.115 for profile: the generator itself varies the head's size by
# +-17 % (image extent 0.32-0.45 m), so a training portrait is within that much of the rule, not
# on it. At 128 px (80 identities, detected at 1x) frontal measures 0.453 / 0.004 / -0.027.
FRAMING = {
    "frontal": Framing(side=0.469, dx=-0.004, dy=-0.051),
    "profile": Framing(side=0.562, dx=-0.023, dy=-0.049),
}
CASCADES = {
    "frontal": "haarcascade_frontalface_default.xml",
    "profile": "haarcascade_profileface.xml",
}


class NoFace(UserError):
    """No face in the image: callers with a way around it (`--no-align`) add it to the line."""


@dataclasses.dataclass(frozen=True)
class Face:
    """A detected face: its box in the image's pixels and the cascade that found it."""

    box: tuple[float, float, float, float]  # x, y, width, height
    kind: str  # a key of FRAMING
    mirrored: bool = False  # found on the mirrored image (profile faces turned the other way)


@functools.cache
def _cascade(kind: str) -> cv2.CascadeClassifier:
    c = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADES[kind])
    if c.empty():  # a wheel without the data files (opencv 5.x dropped them)
        raise RuntimeError(f"OpenCV has no {CASCADES[kind]}; install opencv-python-headless<5")
    return c


def _detect_scale(h: int, w: int) -> float:
    up = DETECT_MIN / min(h, w)
    return up if up > 1 else min(1.0, DETECT_MAX / max(h, w))


def detect_faces(image: np.ndarray) -> list[Face]:  # image: [H, W, 3] uint8 RGB
    """Every face the frontal cascade finds, or, where it finds none, the profile cascade's (on
    the image and its mirror); boxes in the input's pixels, largest first."""
    h, w = image.shape[:2]
    s = _detect_scale(h, w)
    grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    if s != 1.0:
        interp = cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA
        grey = cv2.resize(grey, (round(w * s), round(h * s)), interpolation=interp)
    gw = grey.shape[1]
    for kind, mirrors in (("frontal", (False,)), ("profile", (False, True))):
        faces = []
        for mirrored in mirrors:
            g = np.ascontiguousarray(grey[:, ::-1]) if mirrored else grey
            hits = _cascade(kind).detectMultiScale(g, 1.1, MIN_NEIGHBOURS, minSize=(24, 24))
            for x, y, bw, bh in np.reshape(hits, (-1, 4)):
                x = gw - x - bw if mirrored else x
                box = (float(x) / s, float(y) / s, float(bw) / s, float(bh) / s)
                faces.append(Face(box, kind, mirrored))
        if faces:
            return sorted(faces, key=lambda f: -f.box[2] * f.box[3])
    return []


def crop_box(face: Face, framing: dict[str, Framing] | None = None) -> tuple[int, int, int, int]:
    """The square (x0, y0, x1, y1), input pixels, whose frame puts `face` at its cascade's
    training-portrait size and offset. It may reach past the image (the caller pads)."""
    f = (framing or FRAMING)[face.kind]
    x, y, bw, bh = face.box
    side = max(1, round(bw / f.side))
    dx = -f.dx if face.mirrored else f.dx
    cx, cy = x + bw / 2 - dx * side, y + bh / 2 - f.dy * side
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    return x0, y0, x0 + side, y0 + side


def centre_box(h: int, w: int) -> tuple[int, int, int, int]:
    """The centred square of an H x W image (the crop without alignment)."""
    s = min(h, w)
    x0, y0 = (w - s) // 2, (h - s) // 2
    return x0, y0, x0 + s, y0 + s


def crop_square(image: np.ndarray, box, size: int) -> np.ndarray:  # [H, W, 3] uint8 -> [S, S, 3]
    """`box` [x0, y0, x1, y1] cut out of `image` (edge pixels repeated where it leaves the
    image), resized to `size` x `size` (`crops.crop_image`)."""
    x0, y0, x1, _ = (float(v) for v in box)
    return crop_image(image, (x0, y0, x1 - x0), size, pad="edge")


def check_portrait(image: np.ndarray, where: str = "portrait") -> None:
    """Refuses, as one `UserError` line, an image too small or too uniform to be a portrait."""
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise UserError(
            f"{where}: {w}x{h} px is too small for a portrait (at least {MIN_SIDE} px a side)"
        )
    if int(image.max()) - int(image.min()) < BLANK_RANGE:
        raise UserError(f"{where}: the image is blank (one colour throughout); expected a portrait")


def find_crop(image: np.ndarray, where: str = "portrait") -> tuple[int, int, int, int]:
    """`crop_box` of the largest face in `image` [H, W, 3] uint8; `NoFace` where none is found."""
    faces = detect_faces(image)
    if not faces:
        h, w = image.shape[:2]
        raise NoFace(f"{where}: no face found (OpenCV's frontal and profile cascades, {w}x{h} px)")
    return crop_box(faces[0])


def align_portrait(
    image: np.ndarray,  # [H, W, 3] uint8 RGB, any framing
    size: int,
    *,
    where: str = "portrait",  # names the image in error messages
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(the portrait framed like a training portrait [size, size, 3] uint8, its crop box
    (x0, y0, x1, y1) in `image`'s pixels, possibly reaching past the image where it was padded).

    The largest detected face decides the crop (see the module docstring). For converting real
    captures (`data_pipelines/convert.py`) as well as `fica generate`. A blank or tiny image, or
    one where no face is found (`NoFace`), is a `UserError` naming `where`."""
    check_portrait(image, where)
    box = find_crop(image, where)
    return crop_square(image, box, size), box


def measure_framing(identities: int = 200, image_size: int = 64, seed: int = 0) -> dict:
    """Re-derives `FRAMING` from synthetic training portraits (view 0 of generator identities
    0..identities-1): {kind: {"side", "dx", "dy", "count", "iqr_side"}} over the portraits whose
    largest detected face came from that cascade. ~1 minute for 200 at 64 px on 2 CPU cores."""
    from data_pipelines.synthetic import generator

    cfg = generator.SynthConfig(image_size=image_size, uv_resolution=32, n_frames=0)
    rows: dict[str, list] = {k: [] for k in FRAMING}
    for i in range(identities):
        img = generator.make_identity(i, cfg, seed)["view_image"][0]
        faces = detect_faces(img)
        if faces:
            f, n = faces[0], img.shape[0]
            x, y, bw, bh = f.box
            dx = (x + bw / 2) / n - 0.5
            rows[f.kind].append((bw / n, -dx if f.mirrored else dx, (y + bh / 2) / n - 0.5))
    out = {}
    for kind, r in rows.items():
        a = np.asarray(r, np.float64).reshape(-1, 3)
        med = np.median(a, 0) if len(a) else np.full(3, np.nan)
        iqr = np.subtract(*np.percentile(a[:, 0], [75, 25])) if len(a) else np.nan
        out[kind] = {"side": round(float(med[0]), 3), "dx": round(float(med[1]), 3),
                     "dy": round(float(med[2]), 3), "count": len(a),
                     "iqr_side": round(float(iqr), 3)}  # fmt: skip
    return out


if __name__ == "__main__":  # python -m data_pipelines.align: re-measure the rule
    import json

    print(json.dumps(measure_framing(), indent=1))
