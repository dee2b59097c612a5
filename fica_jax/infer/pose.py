"""Head pose and expression of a portrait: the dense ViT's regressor or an external tracker's JSON.

FiCA gets the portrait's camera and expression from EMOCA/SMIRK (Sec. 2.3). Here they come either
from the dense predictor (`predict_pose`: by default the camera by PnP from its per-pixel vertex
map and mask, `pose_from_vertices`; the expression, or everything, from the regressor trained
with the dense stage, `models/pose_head.py`) or from any tracker's values written as JSON
(`load_pose_json`). Both give the same dict:

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
    """obj[key] as float64 of `shape`, finite; None if optional and absent. A str in `shape`
    admits any length and names it in the error ("E" expression coefficients, "L" landmarks)."""
    want = "[" + ", ".join(str(s) for s in shape) + "]"
    if obj.get(key) is None:
        if optional:
            return None
        raise UserError(f"{path}: key {key!r} is missing; expected an array of shape {want}")
    try:
        arr = np.asarray(obj[key], np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{path}: key {key!r} is not a numeric array of shape {want}") from None
    ok = arr.ndim == len(shape)
    ok = ok and all(isinstance(s, str) or a == s for a, s in zip(arr.shape, shape, strict=True))
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
    or None, gaze [2] or None, image_size (H, W), landmarks [L, 2] or None, landmarks_visible
    [L] bool or None), float32.

    JSON layout (one object)::

        {"image_size": [H, W],              # pixels that K refers to
         "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]],
         "viewmat": [[r00, r01, r02, tx], ..., [0, 0, 0, 1]],  # world -> camera, OpenCV axes,
                                            # the head at the world origin (metres)
         "expression": [e0, ..., e{E-1}],   # optional: the template's blendshape weights
         "gaze": [yaw, pitch],              # optional: radians
         "landmarks": [[x, y], ...],        # optional: the template's L landmarks (iBUG-68
                                            # order), pixels of image_size
         "landmarks_visible": [0/1, ...]}   # optional, with landmarks: default all visible

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
    expression = _array(obj, "expression", ("E",), path, optional=True)
    if expression is not None and expression_dim is not None and len(expression) != expression_dim:
        raise UserError(
            f"{path}: key 'expression' has {len(expression)} values, expected {expression_dim}"
        )
    gaze = _array(obj, "gaze", (2,), path, optional=True)
    landmarks = _array(obj, "landmarks", ("L", 2), path, optional=True)
    visible = _array(obj, "landmarks_visible", ("L",), path, optional=True)
    if visible is not None and (landmarks is None or len(visible) != len(landmarks)):
        raise UserError(f"{path}: key 'landmarks_visible' needs one 0/1 per entry of 'landmarks'")
    if landmarks is not None and visible is None:
        visible = np.ones(len(landmarks))
    h, w = (int(s) for s in size)
    if image_size is not None:
        scale = np.array([image_size[1] / w, image_size[0] / h])
        K = np.diag([*scale, 1.0]) @ K
        landmarks = None if landmarks is None else landmarks * scale
        h, w = image_size
    f32 = lambda a: None if a is None else a.astype(np.float32)
    return {"K": f32(K), "viewmat": f32(viewmat), "expression": f32(expression),
            "gaze": f32(gaze), "image_size": (h, w), "landmarks": f32(landmarks),
            "landmarks_visible": None if visible is None else visible > 0.5}  # fmt: skip


# ----------------------------------------------------------------------------- PnP
def _projection(x: jax.Array, rot: jax.Array, t: jax.Array) -> jax.Array:
    """x [N, 3] head points, R [3, 3], t [3] -> normalised image coords [N, 2] (z clamped > 0)."""
    c = x @ rot.T + t
    return c[:, :2] / jnp.maximum(c[:, 2:], 1e-6)


def _wquantile(r: jax.Array, w: jax.Array, q: float) -> jax.Array:
    """The weighted q-quantile of r [N] under weights w [N]."""
    order = jnp.argsort(r)
    cum = jnp.cumsum(w[order]) / jnp.maximum(jnp.sum(w), 1e-12)
    return r[order][jnp.minimum(jnp.searchsorted(cum, q), r.shape[0] - 1)]


def _robust_weights(r: jax.Array, w: jax.Array, trim: float) -> jax.Array:
    """IRLS weights [N] from residual norms r [N] and prior weights w [N]: the worst `trim` of the
    weight mass gets 0, the rest Huber (threshold: the weighted median residual)."""
    k = jnp.maximum(_wquantile(r, w, 0.5), 1e-9)
    keep = r <= _wquantile(r, w, 1.0 - trim)
    return w * keep * jnp.minimum(1.0, k / jnp.maximum(r, 1e-12))


def _dlt(x: jax.Array, uv: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted linear PnP: x [N, 3], uv [N, 2] normalised coords, w [N] -> (R [3, 3], t [3]).

    Rows u (r3.X + t3) = r1.X + t1 and v (...) = r2.X + t2 in P = [R | t] (12 unknowns, points
    centred and scaled to unit RMS for conditioning); P is the smallest eigenvector of A^T W A,
    its 3x3 block projected onto SO(3) by SVD, its sign fixed by det > 0 (which also puts the
    points in front of the camera) and its scale by the block's mean singular value."""
    ws = jnp.maximum(jnp.sum(w), 1e-12)
    c = jnp.sum(w[:, None] * x, 0) / ws
    s = jnp.sqrt(jnp.sum(w * jnp.sum((x - c) ** 2, -1)) / ws) + 1e-12
    xh = jnp.concatenate([(x - c) / s, jnp.ones_like(x[:, :1])], -1)  # [N, 4]
    z = jnp.zeros_like(xh)
    a = jnp.concatenate([xh, z, -uv[:, :1] * xh], -1)  # [N, 12]
    b = jnp.concatenate([z, xh, -uv[:, 1:] * xh], -1)
    m = jnp.einsum("n,ni,nj->ij", w, a, a) + jnp.einsum("n,ni,nj->ij", w, b, b)
    p = jnp.linalg.eigh(m)[1][:, 0].reshape(3, 4)
    a3 = p[:, :3] / s  # back to the unnormalised points: P ~ [A / s | b - A c / s]
    b3 = p[:, 3] - a3 @ c
    sign = jnp.sign(jnp.linalg.det(a3))
    u, sv, vt = jnp.linalg.svd(a3 * sign)
    return u @ vt, b3 * sign / jnp.mean(sv)  # det(u vt) = +1 once det(a3) > 0


def _rotvec_matrix(d: jax.Array) -> jax.Array:
    """Rotation vector [3] -> [3, 3] (Rodrigues)."""
    a = jnp.sqrt(jnp.sum(d**2) + 1e-24)
    k = jnp.cross(jnp.eye(3), d / a)  # the skew matrix [d / |d|]_x
    return jnp.eye(3) + jnp.sin(a) * k + (1.0 - jnp.cos(a)) * (k @ k)


def _lm_step(x, uv, w, rot, t, damping):
    """One Levenberg-Marquardt step on sum w |proj(X) - uv|^2 over (rotation vector, t); the
    rotation is perturbed on the left, R <- exp([d]_x) R (first order for the Jacobian)."""
    resid = lambda d: (
        _projection(x, (jnp.eye(3) + jnp.cross(jnp.eye(3), d[:3])) @ rot, t + d[3:]) - uv
    )
    jac = jax.jacfwd(resid)(jnp.zeros(6))  # [N, 2, 6]
    h = jnp.einsum("n,nki,nkj->ij", w, jac, jac)
    g = jnp.einsum("n,nki,nk->i", w, jac, resid(jnp.zeros(6)))
    d = -jnp.linalg.solve(h + damping * jnp.diag(jnp.diag(h)) + 1e-12 * jnp.eye(6), g)
    return _rotvec_matrix(d[:3]) @ rot, t + d[3:]


def _pnp_one(x, uv, w, iters: int, trim: float, hypotheses: int = 128, subset: int = 10):
    res = lambda rot, t: jnp.linalg.norm(_projection(x, rot, t) - uv, axis=-1)
    # Start: the best by weighted median residual (LMedS) of the DLT on all points and on
    # `hypotheses` random subsets (drawn by weight, a fixed key): gross outliers wreck the
    # all-point linear fit, some subsets miss them.
    idx = jax.random.choice(
        jax.random.key(0), x.shape[0], (hypotheses, subset), p=(w + 1e-12) / jnp.sum(w + 1e-12)
    )
    rots, ts = jax.vmap(lambda i: _dlt(x[i], uv[i], jnp.ones(subset)))(idx)
    rot0, t0 = _dlt(x, uv, w)
    rots, ts = jnp.concatenate([rot0[None], rots]), jnp.concatenate([t0[None], ts])
    score = jax.vmap(lambda r, t: _wquantile(res(r, t), w, 0.5))(rots, ts)
    rot, t = rots[jnp.argmin(score)], ts[jnp.argmin(score)]
    for _ in range(2):  # re-solve on all points without the worst
        rot, t = _dlt(x, uv, _robust_weights(res(rot, t), w, trim))

    def body(_, rt):
        rw = _robust_weights(res(*rt), w, trim)
        return _lm_step(x, uv, rw, *rt, damping=1e-3)

    return jax.lax.fori_loop(0, iters, body, (rot, t))


def pose_from_vertices(
    vtx: jax.Array,  # [B, H, W, 3] head-coordinate position seen at each pixel (metres)
    mask: jax.Array,  # [B, H, W] foreground probability (weights; < 0.5 counts as background)
    K: jax.Array,  # [B, 3, 3] pixel intrinsics
    *,
    iters: int = 10,
    trim: float = 0.2,
) -> jax.Array:
    """Camera of each image from its per-pixel vertex map by weighted, robust PnP -> viewmat
    [B, 4, 4] (world = head coords -> camera, OpenCV axes).

    Pixel centres (x + 0.5, y + 0.5) go through K^-1 to normalised coords; linear DLTs give the
    start (`_dlt`: the best of all points and random subsets by median residual, twice re-solved
    without the worst `trim` of the points), then `iters` Levenberg-Marquardt steps on the
    reprojection error with IRLS weights: the mask probability times Huber, the worst `trim` of
    the weight mass dropped each step. Jit-able."""
    b, h, w, _ = vtx.shape
    ys, xs = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing="ij")
    pix = jnp.stack([xs.ravel(), ys.ravel(), jnp.ones(h * w)], -1)  # [N, 3]
    uvw = jnp.einsum("bij,nj->bni", jnp.linalg.inv(K.astype(jnp.float32)), pix)
    uv = uvw[..., :2] / uvw[..., 2:]
    m = mask.reshape(b, h * w).astype(jnp.float32)
    wts = jnp.where(m > 0.5, m, 0.0)
    x = vtx.reshape(b, h * w, 3).astype(jnp.float32)
    rot, t = jax.vmap(lambda *a: _pnp_one(*a, iters, trim))(x, uv, wts)
    return _viewmat(rot, t)


def _viewmat(rot: jax.Array, t: jax.Array) -> jax.Array:
    """R [B, 3, 3], t [B, 3] -> [B, 4, 4]."""
    top = jnp.concatenate([rot, t[..., None]], -1)
    bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0]), (rot.shape[0], 1, 4))
    return jnp.concatenate([top, bottom], 1)


# ----------------------------------------------------------------------------- regressor
def pose_from_outputs(out: dict, K: jax.Array, hw: tuple[int, int]) -> dict:
    """The regressor's rot6d [B, 6], cam [B, 3], expression [B, E] and K [B, 3, 3] ->
    dict(K [B,3,3], viewmat [B,4,4], expression [B,E], gaze None)."""
    viewmat = _viewmat(rotation_from_6d(out["rot6d"]), translation_from_params(out["cam"], K, hw))
    return {"K": K, "viewmat": viewmat, "expression": out["expression"], "gaze": None}


def predict_pose(
    dense_model,
    images: jax.Array,
    K: jax.Array | np.ndarray | None = None,
    method: str = "pnp",
) -> dict:
    """images [B, H, W, 3] in [0, 1] through a `DensePredictor` -> the `load_pose_json` dict with
    a batch axis (gaze None: not regressed; landmarks [B, L, 2] from the landmark branch, else
    None). K [B, 3, 3] or [3, 3] are the images' intrinsics
    (default `nominal_K`). method "pnp": the camera from the predicted vertex map and mask
    (`pose_from_vertices`), the expression from the landmark branch or the pose head if the
    model has one (else None);
    "regressor": everything from the pose head, the translation solved for K."""
    if method not in ("pnp", "regressor"):
        raise UserError(f"pose method {method!r} is unknown; expected 'pnp' or 'regressor'")
    has_head = getattr(dense_model, "pose", None) is not None
    if method == "regressor" and not has_head:
        raise UserError(
            "this dense model has no pose head; train it with the dense stage's pose loss "
            "weights (configs/dense.py model.loss_weights.rot/cam/expr) above 0, or use "
            "method='pnp'"
        )
    b, h, w, _ = images.shape
    K = nominal_K((h, w)) if K is None else K
    K = jnp.broadcast_to(jnp.asarray(K, jnp.float32), (b, 3, 3))
    out = _dense_outputs(dense_model, images)
    kpts = {"landmarks": out.get("kpts")}  # the landmark branch's, where the model has one
    if method == "regressor":
        return pose_from_outputs(out, K, (h, w)) | kpts
    viewmat = _pnp_jit(out["vtx"], out["mask"], K)
    has_expr = has_head or getattr(dense_model, "landmarks", None) is not None
    expr = out["expression"] if has_expr else None
    return {"K": K, "viewmat": viewmat, "expression": expr, "gaze": None} | kpts


_pnp_jit = jax.jit(pose_from_vertices)


@nnx.jit
def _dense_outputs(model, images: jax.Array) -> dict[str, jax.Array]:
    out = model(images)  # XLA drops the unused heads
    keep = {k: out[k] for k in ("rot6d", "cam", "expression", "kpts") if k in out}
    return keep | {"vtx": out["vtx"], "mask": jax.nn.sigmoid(out["mask_logits"][..., 0])}
