"""Head pose and expression of a portrait: the dense ViT's regressor or an external tracker's JSON.

FiCA gets the portrait's camera and expression from EMOCA/SMIRK (Sec. 2.3). Here they come either
from the regressor trained with the dense stage (`predict_pose`, `models/pose_head.py`) or from
any tracker's values written as JSON (`load_pose_json`). Both give the same dict:

  K [3, 3] pixel intrinsics, viewmat [4, 4] world -> camera (OpenCV: x right, y down, z forward;
  the head at the world origin, as in the synthetic captures), expression [E] or None (the
  template's blendshape weights), gaze [2] or None (yaw, pitch in radians).

The regressor predicts the rotation and `cam` = (u, v, log s), the head origin's projection in
image fractions and s = fx / (t_z W); `translation_from_params` solves t for a given K (see
`models/pose_head.py` for why the focal is taken as known).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax.errors import UserError
from fica_jax.models.pose_head import rotation_from_6d

# Focal of the nominal K (image widths) when the caller knows none: a typical portrait lens. The
# translation is solved for whichever K is used, so the head's projection does not depend on it
# (up to perspective strength).
NOMINAL_FOCAL = 1.5


def camera_params(K: jax.Array, viewmat: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """K [..., 3, 3], viewmat [..., 4, 4], image (H, W) -> cam [..., 3] = (u, v, log s)."""
    h, w = hw
    t = viewmat[..., :3, 3]
    p = jnp.einsum("...ij,...j->...i", K, t)
    u, v = p[..., 0] / p[..., 2] / w, p[..., 1] / p[..., 2] / h
    return jnp.stack([u, v, jnp.log(K[..., 0, 0] / (t[..., 2] * w))], -1)


def translation_from_params(cam: jax.Array, K: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """The inverse of `camera_params`: cam [..., 3], K [..., 3, 3] -> t [..., 3] (camera coords
    of the head origin; K without skew)."""
    h, w = hw
    fx, fy, cx, cy = K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2]
    z = fx / (w * jnp.exp(cam[..., 2]))
    return jnp.stack([(cam[..., 0] * w - cx) * z / fx, (cam[..., 1] * h - cy) * z / fy, z], -1)


def nominal_K(hw: tuple[int, int]) -> np.ndarray:
    """[3, 3]: focal NOMINAL_FOCAL image widths, principal point at the centre."""
    h, w = hw
    f = NOMINAL_FOCAL * w
    return np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], np.float32)


def mean_rotation(rotations: np.ndarray) -> np.ndarray:
    """Chordal L2 mean of [N, 3, 3] rotations: the mean matrix projected onto SO(3) by SVD."""
    u, _, vt = np.linalg.svd(np.mean(np.asarray(rotations, np.float64), axis=0))
    d = np.sign(np.linalg.det(u @ vt))
    return (u @ np.diag([1.0, 1.0, d]) @ vt).astype(np.float32)


def pose_stats(data_dir: str | os.PathLike, split: str = "train", limit: int = 4096) -> dict:
    """The split's mean rotation [3, 3] and mean expression [E] over every view of its first
    `limit` records: the mean-pose baselines of the dense stage's eval."""
    from data_pipelines.pipeline import open_source

    src = open_source(data_dir, split)
    n = min(len(src), limit)
    if n == 0:
        raise UserError(f"{data_dir}: split {split!r} has no records for the mean pose")
    recs = [src[i] for i in range(n)]
    rot = np.concatenate([np.asarray(r["view_viewmat"])[:, :3, :3] for r in recs])
    expr = np.concatenate([np.asarray(r["view_expression"], np.float64) for r in recs])
    return {"rotation": mean_rotation(rot), "expression": expr.mean(0).astype(np.float32)}


# ----------------------------------------------------------------------------- external JSON
def _array(obj: dict, key: str, shape: tuple, path, optional: bool = False) -> np.ndarray | None:
    """obj[key] as float64 of `shape` (None: any length), finite; None if optional and absent."""
    want = "[" + ", ".join("E" if s is None else str(s) for s in shape) + "]"
    if obj.get(key) is None:
        if optional:
            return None
        raise UserError(f"{path}: key {key!r} is missing; expected an array of shape {want}")
    try:
        arr = np.asarray(obj[key], np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: key {key!r} is not a numeric array of shape {want}") from None
    ok = arr.ndim == len(shape)
    ok = ok and all(s is None or a == s for a, s in zip(arr.shape, shape, strict=True))
    if not ok:
        raise UserError(f"{path}: key {key!r} has shape {list(arr.shape)}, expected {want}")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{path}: key {key!r} has non-finite values")
    return arr


def load_pose_json(
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    expression_dim: int | None = None,
) -> dict:
    """An external tracker's pose of one portrait -> dict(K [3,3], viewmat [4,4], expression [E]
    or None, gaze [2] or None, image_size (H, W)), float32.

    JSON layout (one object)::

        {"image_size": [H, W],              # pixels that K refers to
         "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
         "viewmat": [[r00, r01, r02, tx], ..., [0, 0, 0, 1]],  # world -> camera, OpenCV axes,
                                            # the head at the world origin (metres)
         "expression": [e0, ..., e{E-1}],   # optional: the template's blendshape weights
         "gaze": [yaw, pitch]}              # optional: radians

    `image_size` (H, W) rescales K to the image the pose is used with; `expression_dim` checks the
    expression length. Each problem is one `UserError` naming the file and key.
    """
    try:
        obj = json.loads(open(path).read())
    except FileNotFoundError:
        raise UserError(f"{path}: pose file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object with keys image_size, K, viewmat")
    size = _array(obj, "image_size", (2,), path)
    if np.any(size <= 0) or np.any(size != np.round(size)):
        raise UserError(f"{path}: key 'image_size' must be two positive integers [H, W]")
    K = _array(obj, "K", (3, 3), path)
    if K[0, 0] <= 0 or K[1, 1] <= 0 or not np.allclose(K[2], [0, 0, 1]):
        raise UserError(f"{path}: key 'K' must have fx, fy > 0 and last row [0, 0, 1]")
    viewmat = _array(obj, "viewmat", (4, 4), path)
    r = viewmat[:3, :3]
    if not np.allclose(viewmat[3], [0, 0, 0, 1], atol=1e-6):
        raise UserError(f"{path}: key 'viewmat' must have last row [0, 0, 0, 1]")
    if not np.allclose(r @ r.T, np.eye(3), atol=1e-3) or np.linalg.det(r) < 0:
        raise UserError(f"{path}: key 'viewmat' has a rotation block that is not a rotation")
    expression = _array(obj, "expression", (None,), path, optional=True)
    if expression is not None and expression_dim is not None and len(expression) != expression_dim:
        raise UserError(
            f"{path}: key 'expression' has {len(expression)} values, expected {expression_dim}"
        )
    gaze = _array(obj, "gaze", (2,), path, optional=True)
    h, w = (int(s) for s in size)
    if image_size is not None:
        K = np.diag([image_size[1] / w, image_size[0] / h, 1.0]) @ K
        h, w = image_size
    f32 = lambda a: None if a is None else a.astype(np.float32)
    return {"K": f32(K), "viewmat": f32(viewmat), "expression": f32(expression),
            "gaze": f32(gaze), "image_size": (h, w)}  # fmt: skip


# ----------------------------------------------------------------------------- regressor
def pose_from_outputs(out: dict, K: jax.Array, hw: tuple[int, int]) -> dict:
    """The regressor's rot6d [B, 6], cam [B, 3], expression [B, E] and K [B, 3, 3] ->
    dict(K [B,3,3], viewmat [B,4,4], expression [B,E], gaze None)."""
    r = rotation_from_6d(out["rot6d"])
    t = translation_from_params(out["cam"], K, hw)
    b = r.shape[0]
    top = jnp.concatenate([r, t[..., None]], -1)
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0]), (b, 1, 4))
    return {"K": K, "viewmat": jnp.concatenate([top, bottom], 1),
            "expression": out["expression"], "gaze": None}  # fmt: skip


def predict_pose(dense_model, images: jax.Array, K: jax.Array | np.ndarray | None = None) -> dict:
    """images [B, H, W, 3] in [0, 1] through a `DensePredictor` with a pose head -> the
    `load_pose_json` dict with a batch axis (gaze None: not regressed). K [B, 3, 3] or [3, 3] are
    the images' intrinsics (default `nominal_K`); the translation is solved for them."""
    if getattr(dense_model, "pose", None) is None:
        raise UserError(
            "this dense model has no pose head; train it with the dense stage's pose loss "
            "weights (configs/dense.py model.loss_weights.rot/cam/expr) above 0"
        )
    b, h, w, _ = images.shape
    K = nominal_K((h, w)) if K is None else K
    K = jnp.broadcast_to(jnp.asarray(K, jnp.float32), (b, 3, 3))
    return pose_from_outputs(_pose_outputs(dense_model, images), K, (h, w))


@nnx.jit
def _pose_outputs(model, images: jax.Array) -> dict[str, jax.Array]:
    out = model(images)  # XLA drops the dense heads: only the pose outputs are returned
    return {k: out[k] for k in ("rot6d", "cam", "expression")}
