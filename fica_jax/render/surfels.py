"""Mesh-proxy rendering for the refiner: UV maps as surface-aligned flat Gaussians (FiCA Sec. 2.3).

The refiner's losses (photo L1, mask L1, keypoint L1; docs/architecture.md §4) need the image, the
silhouette and projected landmarks of the *current* UV texture + UV position map, with gradients
to both. Each valid texel becomes one Gaussian ("surfel"):
- mean = the texel's 3D position;
- covariance `k^2 (t_u t_u^T + t_v t_v^T) + h^2 n n^T`, where `t_u`, `t_v` are the position map's
  per-texel derivatives (the texel's footprint on the surface; the shorter of the two one-sided
  differences inside the UV mask, so that chart seams do not make giant surfels), `n` the unit normal (given, or `t_u x t_v`) and
  `h = thickness * mean(|t_u|, |t_v|)`: a flat disc in the tangent plane. `k` = `footprint`
  (std-dev in texels). Defaults (k = 0.5, eps2d = 0.1, 8-px tiles keeping 1024 Gaussians) were
  chosen against the capture renderer (tests/render/test_render_surfels.py): 0.5 keeps neighbours
  overlapping into an opaque surface while adding little blur, and gsplat's eps2d = 0.3 blurs a
  texel-dense surface more than a (supersampled) mesh rasteriser does. Surfaces are dense (several
  texels per pixel, front and back), so tiles are smaller and hold more Gaussians than the
  rasteriser's defaults; the nearest Gaussians are kept, so overflow drops hidden ones first.
- opacity = `opacity` (clamped to 0.999 by the compositor) on valid texels, 0 elsewhere;
- colour = the texture.
The covariance is built directly (no quaternion), so gradients reach the geometry through both
the mean and the footprint. The alpha is smooth at silhouettes, which is what moves them under
a mask loss.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fica_jax.geometry.uvmaps import sample_uv_map
from fica_jax.render.rasterize import RasterOptions, render


def safe_norm(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    """|v| over the last axis (kept) with a finite gradient at v = 0 (there it is 0): the plain
    norm's gradient v / |v| is 0 / 0 there, and texels at one point (a welded or dilated UV
    seam) have a zero tangent and normal; one NaN cotangent poisons every parameter's gradient."""
    sq = jnp.sum(v * v, axis=-1, keepdims=True)
    ok = sq > eps * eps
    return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def tangent(pos: jax.Array, valid: jax.Array, axis: int) -> jax.Array:
    """Per-texel derivative of pos [R, R, 3] along `axis` (texel units), masked by valid: the
    shorter one-sided difference between valid texels, 0 where the texel has no valid
    neighbour along the axis."""
    nxt = jnp.roll(pos, -1, axis) - pos
    prv = pos - jnp.roll(pos, 1, axis)
    n = pos.shape[axis]
    idx = jnp.arange(n)
    shape = [1, 1]
    shape[axis] = n
    ok_n = valid & jnp.roll(valid, -1, axis) & (idx < n - 1).reshape(shape)
    ok_p = valid & jnp.roll(valid, 1, axis) & (idx > 0).reshape(shape)
    # take the shorter one-sided difference: at a UV chart seam one neighbour is a texel of
    # another part of the surface, and its (long) difference is not the texel footprint
    shorter = jnp.where(
        jnp.sum(nxt * nxt, -1, keepdims=True) <= jnp.sum(prv * prv, -1, keepdims=True), nxt, prv
    )
    return jnp.where(
        (ok_n & ok_p)[..., None],
        shorter,
        jnp.where(ok_n[..., None], nxt, jnp.where(ok_p[..., None], prv, 0.0)),
    )


def normal_maps(geometry: jax.Array, mask: jax.Array) -> jax.Array:
    """Unit normals [B, R, R, 3] of geometry maps from their UV tangents (0 where undefined)."""

    def one(p, m):
        n = jnp.cross(tangent(p, m > 0.5, 1), tangent(p, m > 0.5, 0))
        norm = safe_norm(n)
        return jnp.where(norm > 1e-12, n / jnp.maximum(norm, 1e-12), 0.0)

    return jax.vmap(one)(geometry, mask)


def surfel_gaussians(
    texture: jax.Array,  # [R, R, 3] in [0, 1]
    position: jax.Array,  # [R, R, 3] UV position map
    mask: jax.Array | None = None,  # [R, R] bool / {0, 1}: texels on the surface
    normal: jax.Array | None = None,  # [R, R, 3]
    *,
    footprint: float = 0.5,
    thickness: float = 0.1,
    opacity: float = 1.0,
) -> dict[str, jax.Array]:
    """Flattened surfels: means [N, 3], covars [N, 3, 3], opacities [N], colors [N, 3], N = R*R."""
    r1, r2 = position.shape[:2]
    valid = jnp.ones((r1, r2), bool) if mask is None else jnp.asarray(mask) > 0
    tu = tangent(position, valid, 1)  # along u (columns)
    tv = tangent(position, valid, 0)  # along v (rows)
    if normal is None:
        normal = jnp.cross(tu, tv)
    normal = normal / jnp.maximum(safe_norm(normal), 1e-12)
    step = 0.5 * (safe_norm(tu) + safe_norm(tv))[..., 0]
    h = thickness * step
    outer = lambda a: a[..., :, None] * a[..., None, :]
    cov = footprint**2 * (outer(tu) + outer(tv)) + (h**2)[..., None, None] * outer(normal)
    # a tiny isotropic floor keeps degenerate texels (no valid neighbour) invertible
    cov = cov + 1e-12 * jnp.eye(3, dtype=cov.dtype)
    n = r1 * r2
    return {
        "means": position.reshape(n, 3),
        "covars": cov.reshape(n, 3, 3),
        "opacities": jnp.where(valid, opacity, 0.0).reshape(n).astype(position.dtype),
        "colors": texture.reshape(n, -1),
    }


def project_keypoints(points: jax.Array, viewmats: jax.Array, Ks: jax.Array) -> jax.Array:
    """Pixel coordinates [C, L, 2] of points [L, 3] in C cameras."""
    pc = jnp.einsum("cij,lj->cli", viewmats[:, :3, :3], points) + viewmats[:, None, :3, 3]
    uvw = jnp.einsum("cij,clj->cli", Ks, pc)
    z = uvw[..., 2:]
    return uvw[..., :2] / jnp.where(jnp.abs(z) > 1e-9, z, 1e-9)


def render_surfels(
    texture: jax.Array,  # [R, R, 3]
    position: jax.Array,  # [R, R, 3]
    viewmats: jax.Array,  # [C, 4, 4]
    Ks: jax.Array,  # [C, 3, 3]
    width: int,
    height: int,
    *,
    mask: jax.Array | None = None,  # [R, R]
    normal: jax.Array | None = None,  # [R, R, 3]
    landmark_uvs: jax.Array | None = None,  # [L, 2] in [0, 1]: sampled from `position`
    landmarks: jax.Array | None = None,  # [L, 3] 3D points
    backgrounds: jax.Array | None = None,  # [C, 3]
    footprint: float = 0.5,
    thickness: float = 0.1,
    opacity: float = 1.0,
    eps2d: float = 0.1,
    tile_size: int = 8,
    **raster_kwargs: Any,  # RasterOptions fields (isect_capacity, dense, ...)
) -> dict[str, Any]:
    """Renders the UV maps: image [C, H, W, 3], alpha [C, H, W], depth [C, H, W] (expected),
    keypoints [C, L, 2] when landmarks are given, and the rasteriser's meta."""
    texture, position, viewmats, Ks = map(jnp.asarray, (texture, position, viewmats, Ks))
    g = surfel_gaussians(
        texture,
        position,
        mask,
        normal,
        footprint=footprint,
        thickness=thickness,
        opacity=opacity,
    )
    opts = RasterOptions(
        width=width,
        height=height,
        render_mode="RGB+ED",
        eps2d=eps2d,
        tile_size=tile_size,
        **raster_kwargs,
    )
    img, alpha, meta = render(
        g["means"], g["covars"], g["opacities"], g["colors"], viewmats, Ks, opts, backgrounds
    )
    out = {"image": img[..., :3], "alpha": alpha[..., 0], "depth": img[..., 3], "meta": meta}
    if landmark_uvs is not None:
        landmarks = sample_uv_map(position, jnp.asarray(landmark_uvs))
    if landmarks is not None:
        out["keypoints"] = project_keypoints(jnp.asarray(landmarks), viewmats, Ks)
    return out
