"""The geometry the UPM decoder works in (`upm.py`, FiCA Sec. 2.4), computed from an identity's
neutral UV geometry once per avatar: the surfel frame of every texel (RGCA keeps its Gaussians in
the mesh's local frame; here the flat tangent-plane Gaussians of `render/surfels.py`), and the
eyeballs, whose texels the gaze turns rigidly about a sphere centre fitted to them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fica_jax.geometry.template import gaze_rotation
from fica_jax.render.project import quat_multiply, rotmat_to_quat
from fica_jax.render.surfels import tangent

Array = jax.Array
_MAX_EYE_RADIUS = 0.05  # m; human eyeballs are ~12 mm


def surface_frames(geometry: Array, mask: Array, footprint: float, thickness: float):
    """The surfel frame of every texel of geometry maps [B, R, R, 3] (`render/surfels.py`) ->
    (quaternion [B, R, R, 4] of the local frame (t_u / |t_u|, n x t_u, n = t_u x t_v / |.|),
    std-devs [B, R, R, 3] along it: footprint |t_u|, footprint |t_v|, thickness (|t_u| + |t_v|) / 2,
    in metres). Texels without a valid neighbour on both axes get the identity frame and the
    map's median texel spacing. Gradient-free: the frame is a function of the input maps."""
    geometry, valid = jax.lax.stop_gradient(geometry), mask > 0.5
    tu = jax.vmap(lambda p, v: tangent(p, v, 1))(geometry, valid)
    tv = jax.vmap(lambda p, v: tangent(p, v, 0))(geometry, valid)
    lu, lv = jnp.linalg.norm(tu, axis=-1), jnp.linalg.norm(tv, axis=-1)
    n = jnp.cross(tu, tv)
    ln = jnp.linalg.norm(n, axis=-1)
    ok = valid & (lu > 1e-9) & (lv > 1e-9) & (ln > 1e-6 * lu * lv)
    e3 = n / jnp.maximum(ln, 1e-30)[..., None]
    e1 = tu / jnp.maximum(lu, 1e-30)[..., None]
    rot = jnp.stack([e1, jnp.cross(e3, e1), e3], -1)  # columns: the frame's axes
    quat = jnp.where(ok[..., None], rotmat_to_quat(rot), jnp.asarray([1.0, 0.0, 0.0, 0.0]))
    b = geometry.shape[0]
    spacing = jnp.where(ok, 0.5 * (lu + lv), jnp.nan).reshape(b, -1)
    med = jnp.nan_to_num(jnp.nanmedian(spacing, axis=1), nan=1e-3)[:, None, None]
    lu, lv = jnp.where(ok, lu, med), jnp.where(ok, lv, med)
    std = jnp.stack([footprint * lu, footprint * lv, thickness * 0.5 * (lu + lv)], -1)
    return quat, std


def eye_centres(geometry: Array, mask: Array, eyes: Array) -> Array:
    """Least-squares sphere centre of each eyeball's texels: [B, R, R, 3], [B, R, R], [2, R, R]
    -> [B, 2, 3] (|p - c|^2 = r^2 is linear in (c, r^2 - |c|^2); points centred first). Where
    the texels are no sphere (fit radius beyond `_MAX_EYE_RADIUS`), their mean."""
    geometry = jax.lax.stop_gradient(geometry)

    def one(p, valid, eye):
        w = (eye * (valid > 0.5)).reshape(-1)
        p = p.reshape(-1, 3)
        mean = jnp.sum(w[:, None] * p, 0) / jnp.maximum(jnp.sum(w), 1.0)
        q = p - mean
        a = jnp.concatenate([2 * q, jnp.ones_like(q[:, :1])], -1)  # [N, 4]
        lhs = jnp.einsum("n,ni,nj->ij", w, a, a) + 1e-12 * jnp.eye(4)
        rhs = jnp.einsum("n,ni,n->i", w, a, jnp.sum(q * q, -1))
        x = jnp.linalg.solve(lhs, rhs)
        radius2 = x[3] + jnp.sum(x[:3] ** 2)
        ok = jnp.all(jnp.isfinite(x)) & (radius2 < _MAX_EYE_RADIUS**2)
        return mean + jnp.where(ok, x[:3], 0.0)

    per_eye = jax.vmap(one, in_axes=(None, None, 0))
    return jax.vmap(per_eye, in_axes=(0, 0, None))(geometry, mask, eyes)


def turn_eyes(means, quats, eyes, centres, gaze):
    """Rotates the eye texels of means [B, R, R, 3] / quats [B, R, R, 4] by the gaze rotation
    (`geometry.template.gaze_rotation`, (yaw, pitch) [B, 2]) about their eyeball's centre
    [B|1, 2, 3]; eyes [2, R, R] are the eyeballs' UV masks."""
    b = means.shape[0]
    rot = jax.vmap(gaze_rotation)(gaze.astype(jnp.float32))  # [B, 3, 3]
    centres = jnp.broadcast_to(centres, (b, 2, 3))
    q_rot = rotmat_to_quat(rot)[:, None, None, :]
    turned_q = quat_multiply(jnp.broadcast_to(q_rot, quats.shape), quats)
    for k in range(2):
        c = centres[:, k, None, None, :]
        turned = c + jnp.einsum("bij,bhwj->bhwi", rot, means - c)
        inside = eyes[k][None, :, :, None] > 0.5
        means = jnp.where(inside, turned, means)
        quats = jnp.where(inside, turned_q, quats)
    return means, quats
