"""Stage 1 of the Gaussian rasteriser: EWA projection of 3D Gaussians to 2D (docs/architecture.md §7).

Matches gsplat 1.5.3's `fully_fused_projection` (pinhole, 3DGS, not packed):
- covariance `R S S^T R^T` from a (w, x, y, z) quaternion (normalised here) and scales;
- world -> camera with the OpenCV viewmat; the perspective Jacobian evaluates `x/z`, `y/z`
  clamped to `[-(cx/fx + 0.3 tan_fovx), (W - cx)/fx + 0.3 tan_fovx]` (same for y) with
  `tan_fovx = 0.5 W / fx`, while the projected mean uses the unclamped point;
- `eps2d` is added to the 2D covariance; the antialiased mode's opacity compensation is
  `sqrt(max(det_orig / det, 0))`;
- per-axis radius `ceil(3.33 sqrt(cov2d_ii))`; culled (radius 0) when depth <= near or
  >= far, det <= 0, or the radius box misses the image.

Everything is per camera, pure jnp, and differentiable w.r.t. means, quats, scales (radii are
integers and carry no gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

EXTENT_SIGMA = 3.33  # gsplat's per-axis 2D extent in standard deviations
JACOBIAN_FOV_MARGIN = 0.3  # clamp of x/z, y/z in the Jacobian beyond the image, x tan_fov


class Projected(NamedTuple):
    """Per-camera projection of N Gaussians."""

    means2d: jax.Array  # [N, 2] pixels, (x, y)
    conics: jax.Array  # [N, 3] inverse 2D covariance (a, b, c) = [[a, b], [b, c]]
    depths: jax.Array  # [N] camera-space z
    radii: jax.Array  # [N, 2] int32 per-axis pixel extents, 0 = culled
    compensations: jax.Array  # [N] sqrt(det(cov2d) / det(cov2d + eps2d I)), antialiasing


def quat_to_rotmat(quats: jax.Array) -> jax.Array:
    """[..., 4] (w, x, y, z), any norm -> [..., 3, 3] rotation."""
    q = quats / jnp.linalg.norm(quats, axis=-1, keepdims=True)
    w, x, y, z = jnp.moveaxis(q, -1, 0)
    r = jnp.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    )  # fmt: skip
    return r.reshape(q.shape[:-1] + (3, 3))


def rotmat_to_quat(m: jax.Array) -> jax.Array:
    """[..., 3, 3] proper rotation -> [..., 4] unit (w, x, y, z); the inverse of
    `quat_to_rotmat` up to sign. Each of the four classic formulas is 4 q_k * q for the
    component k it is built on; the one with the largest q_k is taken (stable everywhere)."""
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    a, b = m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0]
    c = m[..., 1, 0] - m[..., 0, 1]
    xy, xz, yz = (
        m[..., 0, 1] + m[..., 1, 0],
        m[..., 0, 2] + m[..., 2, 0],
        m[..., 1, 2] + m[..., 2, 1],
    )
    cands = jnp.stack(
        [
            jnp.stack([1 + m00 + m11 + m22, a, b, c], -1),
            jnp.stack([a, 1 + m00 - m11 - m22, xy, xz], -1),
            jnp.stack([b, xy, 1 - m00 + m11 - m22, yz], -1),
            jnp.stack([c, xz, yz, 1 - m00 - m11 + m22], -1),
        ],
        -2,
    )  # [..., 4 formulas, 4]
    k = jnp.argmax(jnp.stack([m00 + m11 + m22, m00, m11, m22], -1), -1)
    q = jnp.take_along_axis(cands, k[..., None, None], -2)[..., 0, :]
    return q / jnp.linalg.norm(q, axis=-1, keepdims=True)


def quat_multiply(p: jax.Array, q: jax.Array) -> jax.Array:
    """Hamilton product of [..., 4] (w, x, y, z): the rotation `R(p) @ R(q)`."""
    pw, px, py, pz = jnp.moveaxis(p, -1, 0)
    qw, qx, qy, qz = jnp.moveaxis(q, -1, 0)
    return jnp.stack(
        [
            pw * qw - px * qx - py * qy - pz * qz,
            pw * qx + px * qw + py * qz - pz * qy,
            pw * qy - px * qz + py * qw + pz * qx,
            pw * qz + px * qy - py * qx + pz * qw,
        ],
        -1,
    )


def covariance(quats: jax.Array, scales: jax.Array) -> jax.Array:
    """[..., 4], [..., 3] -> [..., 3, 3] world covariance `(R S)(R S)^T`."""
    m = quat_to_rotmat(quats) * scales[..., None, :]
    return jnp.einsum("...ij,...kj->...ik", m, m)


def project(
    means: jax.Array,  # [N, 3] world
    covars: jax.Array,  # [N, 3, 3] world
    viewmat: jax.Array,  # [4, 4] world -> camera (OpenCV)
    K: jax.Array,  # [3, 3]
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
) -> Projected:
    """Projects N Gaussians into one pinhole camera (see the module docstring for the rules)."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    mc = means @ rot.T + trans  # [N, 3]
    cc = jnp.einsum("ij,njk,lk->nil", rot, covars, rot)  # [N, 3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tx, ty, tz = mc[:, 0], mc[:, 1], mc[:, 2]
    # the Jacobian is only accurate near the image; gsplat clamps the ray direction so that
    # Gaussians far outside the frustum do not get huge, skewed footprints
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_xp = (width - cx) / fx + JACOBIAN_FOV_MARGIN * tan_fovx
    lim_xn = cx / fx + JACOBIAN_FOV_MARGIN * tan_fovx
    lim_yp = (height - cy) / fy + JACOBIAN_FOV_MARGIN * tan_fovy
    lim_yn = cy / fy + JACOBIAN_FOV_MARGIN * tan_fovy
    # guard z only where the Gaussian is culled anyway (depth <= near), so that no inf/nan
    # reaches the gradients of culled entries
    safe_z = jnp.where(tz > near_plane, tz, 1.0)
    jx = safe_z * jnp.clip(tx / safe_z, -lim_xn, lim_xp)
    jy = safe_z * jnp.clip(ty / safe_z, -lim_yn, lim_yp)
    zero = jnp.zeros_like(tz)
    jac = jnp.stack(
        [fx / safe_z, zero, -fx * jx / safe_z**2, zero, fy / safe_z, -fy * jy / safe_z**2], -1
    ).reshape(-1, 2, 3)
    cov2d = jnp.einsum("nij,njk,nlk->nil", jac, cc, jac)  # [N, 2, 2]
    means2d = jnp.stack([fx * tx / safe_z + cx, fy * ty / safe_z + cy], -1)

    a, b, c = cov2d[:, 0, 0], 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0]), cov2d[:, 1, 1]
    det_orig = a * c - b * b
    a, c = a + eps2d, c + eps2d
    det = a * c - b * b
    det_safe = jnp.where(det > 0, det, 1.0)
    conics = jnp.stack([c / det_safe, -b / det_safe, a / det_safe], -1)
    compensations = jnp.sqrt(jnp.clip(det_orig / det_safe, 0.0))

    radius = jnp.ceil(
        EXTENT_SIGMA * jnp.sqrt(jax.lax.stop_gradient(jnp.stack([a, c], -1)).clip(0.0))
    )
    m2 = jax.lax.stop_gradient(means2d)
    inside = (
        (m2[:, 0] + radius[:, 0] > 0)
        & (m2[:, 0] - radius[:, 0] < width)
        & (m2[:, 1] + radius[:, 1] > 0)
        & (m2[:, 1] - radius[:, 1] < height)
    )
    valid = (det > 0) & (tz > near_plane) & (tz < far_plane) & inside
    radii = jnp.where(valid[:, None], radius, 0.0).astype(jnp.int32)
    return Projected(means2d, conics, tz, radii, compensations)
