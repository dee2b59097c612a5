"""Procedural synthetic captures: one schema record per identity (portrait + dome frames).

FiCA trains on paired portraits and UV texture/geometry maps from phone and dome captures (paper
Sec. 3); none of that data is public. This generator produces the same *kind* of record from the
procedural head template so every stage can be trained and tested end to end:

* identity: random shape coefficients and a procedural UV texture (`texture.py`);
* ground truth in UV: texture, neutral position (geometry) map, normal map, atlas mask;
* view 0, the portrait: random camera (yaw +-60, pitch +-25 deg by default), light, background
  and a mild expression; views 1..K, "dome" frames with random expression, gaze and camera;
* per view: image, mask, depth, the dense UV / vertex / normal images FiCA's fine-tuned Sapiens
  predicts (Sec. 2.1), 2D landmarks with visibility, cameras, expression, gaze and the posed UV
  position map;
* `partial_uv`: the portrait's visible pixels unwrapped into UV from its ground-truth dense maps
  (`fica_jax.geometry.unwrap`, the rule inference applies to the dense predictor's maps).

Records follow `data_pipelines.schema` and are deterministic for (index, seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import schema
from data_pipelines.synthetic.texture import paint_texture
from fica_jax.geometry import capture
from fica_jax.geometry.template import HeadTemplate, make_head_template, pose_vertices
from fica_jax.geometry.unwrap import unwrap_partial
from fica_jax.geometry.uvmaps import UVRaster, dilate, uv_raster, vertex_normals

DEG = np.pi / 180


@dataclass(frozen=True)
class SynthConfig:
    uv_resolution: int = 256
    image_size: int = 256
    n_frames: int = 4  # K dome frames besides the portrait
    template_resolution: int = 48  # skin grid rows of the procedural template
    test_every: int = 8  # identity `index % test_every == test_every - 1` goes to 'test'
    shape_std: float = 1.0
    portrait_yaw_deg: float = 60.0
    portrait_pitch_deg: float = 25.0
    dome_yaw_deg: float = 90.0
    dome_pitch_deg: float = 30.0
    roll_deg: float = 5.0
    distance_range: tuple[float, float] = (0.55, 0.9)  # metres, camera to head
    extent_range: tuple[float, float] = (0.32, 0.45)  # metres covered by the image width
    expression_prob: float = 0.35  # chance that each blendshape is active in a dome frame
    portrait_expression_scale: float = 0.4  # portraits get milder expressions
    gaze_deg: tuple[float, float] = (20.0, 15.0)  # max |yaw|, |pitch|
    ambient_range: tuple[float, float] = (0.3, 0.6)
    diffuse_range: tuple[float, float] = (0.4, 0.8)

    def split(self, index: int) -> str:
        return "test" if index % self.test_every == self.test_every - 1 else "train"


@dataclass(frozen=True, eq=False)
class _Assets:
    template: HeadTemplate
    raster: UVRaster
    rest_map: np.ndarray  # [R, R, 3]
    part_map: np.ndarray  # [R, R] int
    pose: object  # jitted (id, expr, gaze) -> (verts, normals)


@lru_cache(maxsize=4)
def _assets(template_resolution: int, uv_resolution: int) -> _Assets:
    t = make_head_template(template_resolution)
    r = uv_raster(t.uvs, t.faces, uv_resolution)
    rest = np.asarray(r.interpolate(jnp.asarray(t.verts)))
    # a texel's part is the part of its face's first corner (faces never mix parts)
    part = np.where(r.mask, t.part_ids[t.faces[np.maximum(r.face_id, 0), 0]], -1)

    @jax.jit
    def pose(id_coeffs, expr, gaze):
        v = pose_vertices(t, id_coeffs, expr, gaze)
        return v, vertex_normals(v, t.faces, t.weld)

    return _Assets(t, r, rest, part.astype(np.int32), pose)


def template_metadata(cfg: SynthConfig) -> dict:
    """Template facts for a dataset's metadata.json."""
    t = _assets(cfg.template_resolution, cfg.uv_resolution).template
    return {
        "template": t.name,
        "n_vertices": int(t.n_verts),
        "n_faces": int(len(t.faces)),
        "n_landmarks": int(len(t.landmark_ids)),
        "landmark_layout": "ibug68",
        "shape_dims": int(t.n_shape),
        "shape_names": list(t.shape_names),
        "expression_dims": int(t.n_expr),
        "expression_names": list(t.expr_names),
        "uv_resolution": cfg.uv_resolution,
        "image_size": cfg.image_size,
        "n_views": cfg.n_frames + 1,
    }


def _camera(rng, cfg: SynthConfig, max_yaw: float, max_pitch: float) -> capture.Camera:
    yaw = rng.uniform(-max_yaw, max_yaw) * DEG
    pitch = rng.uniform(-max_pitch, max_pitch) * DEG
    dist = rng.uniform(*cfg.distance_range)
    target = np.array([0.0, -0.02, 0.01]) + rng.normal(0, 0.008, 3)
    eye = target + dist * np.array(
        [np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)]
    )
    view = capture.look_at(eye, target)
    roll = rng.uniform(-cfg.roll_deg, cfg.roll_deg) * DEG
    rz = np.array([[np.cos(roll), -np.sin(roll), 0], [np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
    view[:3] = rz @ view[:3]
    size = cfg.image_size
    focal = size * dist / rng.uniform(*cfg.extent_range)
    jitter = rng.normal(0, 0.02 * size, 2)
    k = capture.intrinsics(focal, size, size, size / 2 + jitter[0], size / 2 + jitter[1])
    return capture.Camera(k, view.astype(np.float32), size, size)


def _light(rng, cfg: SynthConfig, camera: capture.Camera) -> capture.Light:
    towards_cam = -camera.viewmat[2, :3]  # camera looks along +z_cam; the light sits behind it
    d = towards_cam + rng.normal(0, 0.6, 3) + np.array([0, 0.3, 0])
    d /= np.linalg.norm(d)
    tint = tuple(float(c) for c in rng.uniform(0.9, 1.1, 3))
    return capture.Light(
        d.astype(np.float32),
        float(rng.uniform(*cfg.ambient_range)),
        float(rng.uniform(*cfg.diffuse_range)),
        tint,
    )


def _background(rng, size: int) -> np.ndarray:
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    if rng.random() < 0.5:
        b = a
    t = np.linspace(0, 1, size)[:, None, None]
    img = a * (1 - t) + b * t + rng.normal(0, 0.01, (size, size, 3))
    return np.clip(img, 0, 1).astype(np.float32)


def _expression(rng, n: int, prob: float, scale: float) -> np.ndarray:
    active = rng.random(n) < prob
    return (active * rng.uniform(0, 1, n) * scale).astype(np.float32)


def _render_view(assets: _Assets, texture, id_coeffs, expr, gaze, camera, light, background):
    t = assets.template
    verts, normals = assets.pose(id_coeffs, jnp.asarray(expr), jnp.asarray(gaze))
    # round the raster block up so that the few distinct sizes compile once each
    bb = tuple(max(16, -(-b // 8) * 8) for b in capture.auto_bbox(verts, t.faces, camera))
    out = capture.render_capture(
        verts,
        t.faces,
        jnp.asarray(t.uvs),
        texture,
        camera,
        light,
        jnp.asarray(background),
        normals=normals,
        bbox=bb,
    )
    lm = verts[jnp.asarray(t.landmark_ids)]
    out["kpts"] = capture.project_points(lm, camera)
    out["kpts_visible"] = capture.points_visible(lm, camera, out["depth"])
    out["uv_geometry"] = assets.raster.interpolate(verts)
    return jax.device_get(out)


def make_identity(index: int, cfg: SynthConfig, seed: int) -> dict[str, np.ndarray]:
    """One synthetic identity record (passes `schema.validate`), deterministic in (index, seed)."""
    assets = _assets(cfg.template_resolution, cfg.uv_resolution)
    t = assets.template
    rng = np.random.default_rng([seed, index])
    id_coeffs = (rng.normal(size=t.n_shape) * cfg.shape_std).astype(np.float32)

    albedo, _ = paint_texture(t, assets.rest_map, assets.part_map, rng)
    albedo = dilate(albedo, assets.raster.mask, steps=4)
    tex_u8 = np.round(albedo * 255).astype(np.uint8)
    texture = jnp.asarray(tex_u8.astype(np.float32) / 255)

    neutral, nrm = assets.pose(jnp.asarray(id_coeffs), jnp.zeros(t.n_expr), jnp.zeros(2))
    uv_geometry = np.asarray(assets.raster.interpolate(neutral), np.float32)
    uv_normal = np.array(assets.raster.interpolate(nrm))
    uv_normal /= np.maximum(np.linalg.norm(uv_normal, axis=-1, keepdims=True), 1e-8)
    uv_normal[~assets.raster.mask] = 0

    views = []
    for v in range(cfg.n_frames + 1):
        portrait = v == 0
        cam = _camera(
            rng,
            cfg,
            cfg.portrait_yaw_deg if portrait else cfg.dome_yaw_deg,
            cfg.portrait_pitch_deg if portrait else cfg.dome_pitch_deg,
        )
        scale = cfg.portrait_expression_scale if portrait else 1.0
        expr = _expression(rng, t.n_expr, cfg.expression_prob, scale)
        gaze = (rng.uniform(-1, 1, 2) * np.array(cfg.gaze_deg) * DEG * scale).astype(np.float32)
        light = _light(rng, cfg, cam)
        bg = _background(rng, cfg.image_size)
        out = _render_view(assets, texture, jnp.asarray(id_coeffs), expr, gaze, cam, light, bg)
        views.append((cam, expr, gaze, out))

    # the portrait's exact dense maps through the one unwrap inference uses on predicted ones
    p = views[0][-1]
    partial_uv = unwrap_partial(
        p["rgb"], p["mask"], p["uv"], p["nrm"], p["vtx"], resolution=cfg.uv_resolution
    )
    stack = lambda key, dtype: np.stack([o[key] for *_, o in views]).astype(dtype)
    record = {
        "schema_version": np.asarray(schema.SCHEMA_VERSION, np.int32),
        "identity": np.asarray(f"synth-s{seed}-{index:06d}"),
        "split": np.asarray(cfg.split(index)),
        "id_coeffs": id_coeffs,
        "uv_texture": tex_u8,
        "uv_geometry": uv_geometry,
        "uv_normal": uv_normal.astype(np.float16),
        "uv_mask": assets.raster.mask.astype(np.uint8),
        "partial_uv": np.asarray(partial_uv).astype(np.float16),
        "view_image": np.round(stack("rgb", np.float32) * 255).astype(np.uint8),
        "view_mask": stack("mask", np.uint8),
        "view_uv": stack("uv", np.float16),
        "view_vtx": stack("vtx", np.float16),
        "view_nrm": stack("nrm", np.float16),
        "view_depth": stack("depth", np.float16),
        "view_kpts": stack("kpts", np.float32),
        "view_kpts_visible": stack("kpts_visible", np.uint8),
        "view_K": np.stack([c.K for c, *_ in views]).astype(np.float32),
        "view_viewmat": np.stack([c.viewmat for c, *_ in views]).astype(np.float32),
        "view_expression": np.stack([e for _, e, *_ in views]).astype(np.float32),
        "view_gaze": np.stack([g for _, _, g, _ in views]).astype(np.float32),
        "view_uv_geometry": stack("uv_geometry", np.float16),
    }
    return record
