"""Capture renderer: RGB, mask, depth and the dense UV / vertex / normal images of a mesh.

FiCA Sec. 2.1: fine-tuned Sapiens predicts per-pixel UV coordinates, vertex positions and normals
of the head; unwrapping the visible pixels into UV space (`fica_jax.geometry.unwrap`) gives the
partial maps `[UV_RGB, UV_mask, UV_nrm, UV_vtx]`. This module renders the ground truth of those
per-pixel predictions for synthetic captures (and mesh overlays for the refiner's losses,
Sec. 2.3).

Conventions: `Camera.viewmat` maps head coordinates to OpenCV camera coordinates (x right, y
down, z forward); `K` is in pixels with pixel centres at +0.5. Shading is Lambert + ambient from
one directional light given in head coordinates. Output images are zero (or the background for
`rgb`) outside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.geometry import raster
from fica_jax.geometry.uvmaps import sample_uv_map, vertex_normals

NEAR = 1e-3  # metres: faces with a corner closer than this are not drawn


@dataclass(frozen=True, eq=False)
class Camera:
    K: np.ndarray  # [3, 3] pixel intrinsics
    viewmat: np.ndarray  # [4, 4] head -> camera (OpenCV)
    width: int
    height: int


@dataclass(frozen=True, eq=False)
class Light:
    direction: np.ndarray  # [3] unit vector from the surface towards the light, head coords
    ambient: float = 0.45
    diffuse: float = 0.6
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)  # light tint


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 1.0, 0.0)) -> np.ndarray:
    """[4, 4] OpenCV viewmat for a camera at `eye` looking at `target` (head coords, +y up)."""
    eye, target, up = (np.asarray(a, np.float64) for a in (eye, target, up))
    fwd = target - eye
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, up)  # camera x; image y points down = -up
    right /= np.linalg.norm(right)
    down = np.cross(fwd, right)
    rot = np.stack([right, down, fwd])  # rows: camera axes in head coordinates
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = -rot @ eye
    return m.astype(np.float32)


def intrinsics(focal: float, width: int, height: int, cx=None, cy=None) -> np.ndarray:
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    return np.array([[focal, 0, cx], [0, focal, cy], [0, 0, 1]], np.float32)


def to_camera(points: jax.Array, camera: Camera) -> jax.Array:
    """Head-coordinate points [N, 3] -> camera coordinates [N, 3]."""
    m = jnp.asarray(camera.viewmat)
    return points @ m[:3, :3].T + m[:3, 3]


def project_points(points: jax.Array, camera: Camera) -> jax.Array:
    """Pixel coordinates [N, 2] (x, y) of head-coordinate points [N, 3]."""
    pc = to_camera(points, camera)
    uvw = pc @ jnp.asarray(camera.K).T
    return uvw[:, :2] / jnp.where(jnp.abs(uvw[:, 2:]) > 1e-9, uvw[:, 2:], 1e-9)


def points_visible(
    points: jax.Array,  # [N, 3] head coords
    camera: Camera,
    depth: jax.Array,  # [H, W] camera-space z, 0 on background
    tol: float = 3e-3,
) -> jax.Array:
    """[N] bool: inside the image and not behind the rendered surface (depth test, tol metres)."""
    xy = project_points(points, camera)
    z = to_camera(points, camera)[:, 2]
    ix = jnp.floor(xy[:, 0]).astype(jnp.int32)
    iy = jnp.floor(xy[:, 1]).astype(jnp.int32)
    inside = (ix >= 0) & (iy >= 0) & (ix < camera.width) & (iy < camera.height) & (z > NEAR)
    d = depth[jnp.clip(iy, 0, camera.height - 1), jnp.clip(ix, 0, camera.width - 1)]
    return inside & (d > 0) & (z <= d + tol)


def screen_triangles(verts: jax.Array, faces: jax.Array, camera: Camera):
    """Projected corners xy [F, 3, 2], 1/z [F, 3] and validity [F] of every face."""
    pc = to_camera(verts, camera)
    z = pc[:, 2]
    xy = project_points(verts, camera)
    faces = jnp.asarray(faces)
    valid = jnp.all(z[faces] > NEAR, axis=1)
    return xy[faces], 1.0 / jnp.maximum(z[faces], NEAR), valid


def auto_bbox(verts, faces, camera: Camera) -> tuple[int, int]:
    """Static raster block for this mesh and camera (concrete inputs only)."""
    xy, _, valid = jax.device_get(screen_triangles(jnp.asarray(verts), faces, camera))
    return raster.bbox_size(xy, valid, camera.height, camera.width)


def render_capture(
    verts: jax.Array,  # [V, 3] posed vertices, head coords
    faces: np.ndarray,  # [F, 3]
    uvs: jax.Array,  # [V, 2]
    texture: jax.Array,  # [R, R, 3] albedo in [0, 1]
    camera: Camera,
    light: Light,
    background: jax.Array,  # [3] colour or [H, W, 3] image in [0, 1]
    normals: jax.Array | None = None,  # [V, 3]; default: area-weighted vertex normals
    bbox: tuple[int, int] | None = None,  # static raster block; measured when None
) -> dict[str, jax.Array]:
    """Renders one view. Returns a dict of images:

    rgb [H, W, 3] shaded + background, albedo [H, W, 3] unshaded texture, mask [H, W] bool,
    depth [H, W] (0 off the head), uv [H, W, 2], vtx [H, W, 3] (head coords), nrm [H, W, 3]
    (unit, head coords), face_id [H, W] (-1 off the head).

    Pass `bbox` to call this inside `jit` (the block must then be static); see `auto_bbox`.
    """
    if bbox is None:
        bbox = auto_bbox(verts, faces, camera)
    if normals is None:
        normals = vertex_normals(verts, faces)
    xy, inv_z, valid = screen_triangles(verts, faces, camera)
    return _shade(
        xy,
        inv_z,
        valid,
        jnp.asarray(faces),
        verts,
        uvs,
        normals,
        texture,
        jnp.asarray(light.direction, jnp.float32),
        light.ambient,
        light.diffuse,
        jnp.asarray(light.colour, jnp.float32),
        jnp.asarray(background, jnp.float32),
        height=camera.height,
        width=camera.width,
        by=bbox[0],
        bx=bbox[1],
    )


@jax.jit(static_argnames=("height", "width", "by", "bx"))
def _shade(
    xy,
    inv_z,
    valid,
    faces,
    verts,
    uvs,
    normals,
    texture,
    light_dir,
    ambient,
    diffuse,
    light_colour,
    background,
    *,
    height,
    width,
    by,
    bx,
):
    face_id, bary, depth = raster.rasterize(
        xy, inv_z, valid, height=height, width=width, by=by, bx=bx
    )
    mask = face_id >= 0
    uv = raster.interpolate(face_id, bary, faces, uvs)
    vtx = raster.interpolate(face_id, bary, faces, verts)
    nrm = raster.interpolate(face_id, bary, faces, normals)
    nrm = nrm / jnp.maximum(jnp.linalg.norm(nrm, axis=-1, keepdims=True), 1e-8)
    albedo = jnp.where(mask[..., None], sample_uv_map(texture, uv), 0.0)
    lambert = jnp.maximum(jnp.sum(nrm * light_dir, -1, keepdims=True), 0.0)
    shaded = jnp.clip(albedo * (ambient + diffuse * lambert) * light_colour, 0.0, 1.0)
    bg = jnp.broadcast_to(background, (height, width, 3))
    return {
        "rgb": jnp.where(mask[..., None], shaded, bg),
        "albedo": albedo,
        "mask": mask,
        "depth": jnp.where(mask, depth, 0.0),
        "uv": uv,
        "vtx": vtx,
        "nrm": jnp.where(mask[..., None], nrm, 0.0),
        "face_id": face_id,
    }
