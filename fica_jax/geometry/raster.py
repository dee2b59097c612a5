"""Z-buffered triangle rasterizer in JAX, shared by the capture renderer and UV-space maps.

FiCA (Sec. 2.1, 2.3) needs per-pixel UV / vertex / normal images of a mesh (the quantities its
fine-tuned Sapiens predicts) and UV-space position/normal maps. Both reduce to one operation:
find, for every pixel (or texel) centre, the front-most covering triangle and its barycentric
coordinates. This module does that with a per-triangle bounding-box scatter:

1. every triangle emits a static `by x bx` block of candidate pixels starting at its bbox corner;
2. `.at[].min` scatters candidate depths into a z-buffer;
3. candidates whose depth equals the buffer scatter their face id (`.at[].max` breaks ties);
4. barycentrics are recomputed per pixel from the winning face, so the result is differentiable
   with respect to vertex positions (visibility itself is not).

Pixel centres sit at +0.5. Barycentrics are perspective-correct when `inv_z` (1/depth per
corner) is given; UV rasterization passes ones. The block size is static for `jit`:
`bbox_size` measures it from concrete coordinates.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# Inclusive edge test so that shared edges leave no cracks; the z-test picks one owner.
_EDGE_EPS = 1e-6


def bbox_size(xy: np.ndarray, valid: np.ndarray, height: int, width: int) -> tuple[int, int]:
    """Static (by, bx) block covering the largest on-screen triangle bbox, rounded up to 4.

    xy: [F, 3, 2] pixel coordinates; valid: [F] bool. Boxes are clipped to the image first so a
    huge off-screen triangle does not blow the block up.
    """
    xy = np.asarray(xy, np.float64)
    valid = np.asarray(valid, bool)
    lo = np.ceil(xy.min(1) - 0.5)
    hi = np.floor(xy.max(1) - 0.5)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.array([width - 1, height - 1]))
    ext = np.where(valid[:, None], hi - lo + 1, 0)
    ext = np.nan_to_num(ext, nan=0.0, posinf=0.0, neginf=0.0)
    ext = np.clip(ext, 1, None).max(0) if len(ext) else np.ones(2)
    bx, by = (int(-(-int(e) // 4) * 4) for e in ext)
    return max(by, 4), max(bx, 4)


def _edge_weights(tri: jax.Array, px: jax.Array, py: jax.Array) -> jax.Array:
    """Screen-space barycentrics of points (px, py) in triangles tri [..., 3, 2] -> [..., 3]."""
    a, b, c = tri[..., 0, :], tri[..., 1, :], tri[..., 2, :]
    area = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (
        c[..., 0] - a[..., 0]
    )
    safe = jnp.where(jnp.abs(area) > 1e-12, area, 1.0)

    def cross(p, q):  # edge p->q evaluated at the query point
        return (q[..., 0] - p[..., 0]) * (py - p[..., 1]) - (q[..., 1] - p[..., 1]) * (
            px - p[..., 0]
        )

    w0 = cross(b, c) / safe
    w1 = cross(c, a) / safe
    w2 = cross(a, b) / safe
    return jnp.stack([w0, w1, w2], -1), area


@partial(jax.jit, static_argnames=("height", "width", "by", "bx"))
def rasterize(
    xy: jax.Array,  # [F, 3, 2] pixel coordinates of each corner
    inv_z: jax.Array,  # [F, 3] 1 / depth of each corner (ones for orthographic / UV use)
    valid: jax.Array,  # [F] bool, faces to draw
    *,
    height: int,
    width: int,
    by: int,
    bx: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns face_id [H, W] int32 (-1 = empty), bary [H, W, 3], depth [H, W] (inf = empty)."""
    n_faces = xy.shape[0]
    # Faces behind the camera can project to inf/nan; park them at the origin (never drawn).
    xy = jnp.where(valid[:, None, None], xy, 0.0)
    inv_z = jnp.where(valid[:, None], inv_z, 1.0)
    lo = jnp.ceil(jnp.min(xy, axis=1) - 0.5)
    lo = jnp.maximum(lo, 0.0).astype(jnp.int32)  # [F, 2]
    px = lo[:, None, None, 0] + jnp.arange(bx, dtype=jnp.int32)[None, None, :]  # [F, 1, bx]
    py = lo[:, None, None, 1] + jnp.arange(by, dtype=jnp.int32)[None, :, None]  # [F, by, 1]
    px, py = jnp.broadcast_arrays(px, py)  # [F, by, bx]
    tri = xy[:, None, None]  # [F, 1, 1, 3, 2]
    w, area = _edge_weights(tri, px + 0.5, py + 0.5)  # [F, by, bx, 3]
    inside = (
        jnp.all(w >= -_EDGE_EPS, axis=-1)
        & (jnp.abs(area) > 1e-12)
        & valid[:, None, None]
        & (px < width)
        & (py < height)
    )
    iz = jnp.sum(w * inv_z[:, None, None, :], axis=-1)
    depth = jnp.where(inside & (iz > 0), 1.0 / jnp.where(iz > 0, iz, 1.0), jnp.inf)
    pix = jnp.where(inside, py * width + px, 0).reshape(-1)
    zbuf = jnp.full((height * width,), jnp.inf, depth.dtype).at[pix].min(depth.reshape(-1))
    win = inside & (depth == zbuf[pix].reshape(depth.shape)) & jnp.isfinite(depth)
    fids = jnp.broadcast_to(jnp.arange(n_faces, dtype=jnp.int32)[:, None, None], depth.shape)
    face_id = (
        jnp.full((height * width,), -1, jnp.int32)
        .at[pix]
        .max(jnp.where(win, fids, -1).reshape(-1))
        .reshape(height, width)
    )
    return face_id, *barycentrics(face_id, xy, inv_z)


def barycentrics(
    face_id: jax.Array,  # [H, W] int32
    xy: jax.Array,  # [F, 3, 2]
    inv_z: jax.Array,  # [F, 3]
) -> tuple[jax.Array, jax.Array]:
    """Perspective-correct barycentrics [H, W, 3] and depth [H, W] of each pixel's face."""
    height, width = face_id.shape
    f = jnp.maximum(face_id, 0)
    gx = jnp.arange(width, dtype=xy.dtype)[None, :] + 0.5
    gy = jnp.arange(height, dtype=xy.dtype)[:, None] + 0.5
    w, _ = _edge_weights(xy[f], gx, gy)  # [H, W, 3]
    wz = w * inv_z[f]
    s = jnp.sum(wz, -1, keepdims=True)
    hit = (face_id >= 0)[..., None]
    bary = jnp.where(hit, wz / jnp.where(jnp.abs(s) > 0, s, 1.0), 0.0)
    depth = jnp.where(hit[..., 0], 1.0 / jnp.where(jnp.abs(s[..., 0]) > 0, s[..., 0], 1.0), jnp.inf)
    return bary, depth


def interpolate(
    face_id: jax.Array,  # [H, W]
    bary: jax.Array,  # [H, W, 3]
    faces: jax.Array,  # [F, 3]
    values: jax.Array,  # [V, C]
) -> jax.Array:
    """Barycentric interpolation of per-vertex values -> [H, W, C], zero on empty pixels."""
    corner = values[faces[jnp.maximum(face_id, 0)]]  # [H, W, 3, C]
    out = jnp.sum(bary[..., None] * corner, axis=-2)
    return jnp.where((face_id >= 0)[..., None], out, 0.0)
