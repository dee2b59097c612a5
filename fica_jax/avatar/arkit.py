"""Driving an avatar from an ARKit-52 blendshape track (the Live Link Face CSV layout).

Live Link Face (and most iPhone face trackers) record one row per frame: `Timecode`,
`BlendShapeCount`, the 52 ARKit blendshape weights in [0, 1] by name (`EyeBlinkLeft`, ...,
`JawOpen`, ..., `TongueOut`), then head and eye rotations. Our template's expression code is
its own blendshape weights (`expression_names` in the avatar's info); `TABLE` maps each of them
from the ARKit names it corresponds to (the mean when several, the max for the brow raise, whose
inner and outer parts are one blendshape here). ARKit "left" is the subject's left, as ours.

Gaze comes from the eye-look blendshapes, not the eye rotation columns (their units differ
between apps): yaw = GAZE_MAX * mean(LookOutLeft - LookInLeft, LookInRight - LookOutRight),
positive towards the subject's left (our template's +x); pitch = GAZE_MAX * mean(LookUp -
LookDown), positive up.

Ignored (no counterpart in the template): `EyeSquint*`, `EyeWide*`, `JawForward`, `JawLeft`,
`JawRight`, `MouthClose`, `MouthFunnel`, `MouthDimple*`, `MouthRoll*`, `MouthShrug*`,
`MouthPress*`, `CheekSquint*`, `TongueOut`, and the head/eye rotation columns (the head pose is
the camera's business when rendering).
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from fica_jax.errors import UserError

# our expression name -> (how to combine, ARKit names)
TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "jaw_open": ("mean", ("JawOpen",)),
    "lips_pucker": ("mean", ("MouthPucker",)),
    "lips_stretch": ("mean", ("MouthStretchLeft", "MouthStretchRight")),
    "smile_left": ("mean", ("MouthSmileLeft",)),
    "smile_right": ("mean", ("MouthSmileRight",)),
    "frown": ("mean", ("MouthFrownLeft", "MouthFrownRight")),
    "brow_up_left": ("max", ("BrowOuterUpLeft", "BrowInnerUp")),
    "brow_up_right": ("max", ("BrowOuterUpRight", "BrowInnerUp")),
    "brow_down_left": ("mean", ("BrowDownLeft",)),
    "brow_down_right": ("mean", ("BrowDownRight",)),
    "blink_left": ("mean", ("EyeBlinkLeft",)),
    "blink_right": ("mean", ("EyeBlinkRight",)),
    "cheek_puff": ("mean", ("CheekPuff",)),
    "mouth_left": ("mean", ("MouthLeft",)),
    "mouth_right": ("mean", ("MouthRight",)),
    "upper_lip_raise": ("mean", ("MouthUpperUpLeft", "MouthUpperUpRight")),
    "lower_lip_depress": ("mean", ("MouthLowerDownLeft", "MouthLowerDownRight")),
    "nose_wrinkle": ("mean", ("NoseSneerLeft", "NoseSneerRight")),
}
GAZE = ("EyeLookOutLeft", "EyeLookInLeft", "EyeLookInRight", "EyeLookOutRight",
        "EyeLookUpLeft", "EyeLookUpRight", "EyeLookDownLeft", "EyeLookDownRight")  # fmt: skip
GAZE_MAX = math.radians(30.0)  # eye turn at a look blendshape of 1


def read_arkit_csv(
    path: str | os.PathLike, expression_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """-> (codes [T, E] in the template's expression order, gaze [T, 2] radians).
    Expression names the table does not know stay 0; a needed ARKit column missing is an error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--arkit {path}: unreadable ({e})") from None
    if len(rows) < 2:
        raise UserError(f"--arkit {path}: expected a header row and at least one frame")
    header = [h.strip() for h in rows[0]]
    col = {h: i for i, h in enumerate(header)}
    used = {n for name in expression_names if name in TABLE for n in TABLE[name][1]} | set(GAZE)
    missing = sorted(used - set(col))
    if missing:
        raise UserError(
            f"--arkit {path}: no column {missing[0]!r} ({len(missing)} ARKit names missing); "
            "expected the Live Link Face CSV layout (Timecode, BlendShapeCount, EyeBlinkLeft, ...)"
        )
    data = np.zeros((len(rows) - 1, len(header)), np.float32)
    for t, row in enumerate(rows[1:], start=2):
        for name in used:
            try:
                data[t - 2, col[name]] = float(row[col[name]])
            except (IndexError, ValueError):
                raise UserError(f"--arkit {path}: line {t}, column {name}: not a number") from None
    w = lambda name: np.clip(data[:, col[name]], 0.0, 1.0)
    codes = np.zeros((len(data), len(expression_names)), np.float32)
    for k, name in enumerate(expression_names):
        if name in TABLE:
            how, src = TABLE[name]
            stack = np.stack([w(s) for s in src])
            codes[:, k] = stack.max(0) if how == "max" else stack.mean(0)
    yaw = 0.5 * (
        (w("EyeLookOutLeft") - w("EyeLookInLeft")) + (w("EyeLookInRight") - w("EyeLookOutRight"))
    )
    pitch = 0.5 * (
        (w("EyeLookUpLeft") + w("EyeLookUpRight")) - (w("EyeLookDownLeft") + w("EyeLookDownRight"))
    )
    return codes, (GAZE_MAX * np.stack([yaw, pitch], -1)).astype(np.float32)
