"""Capture renderer (fica_jax.geometry.capture); the unwrap is tests/geometry/test_unwrap.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.synthetic.texture import paint_texture
from fica_jax.geometry import capture, uvmaps
from fica_jax.geometry.procedural import PART_EYE_L, PART_EYE_R
from fica_jax.geometry.template import make_head_template, pose_vertices

RES, UV, SIZE = 32, 128, 128


@pytest.fixture(scope="module")
def scene():
    t = make_head_template(RES)
    r = uvmaps.uv_raster(t.uvs, t.faces, UV)
    rest = np.asarray(r.interpolate(jnp.asarray(t.verts)))
    part = np.where(r.mask, t.part_ids[t.faces[np.maximum(r.face_id, 0), 0]], -1)
    tex, _ = paint_texture(t, rest, part, np.random.default_rng(3))
    tex = uvmaps.dilate(tex, r.mask, 4)
    return t, r, jnp.asarray(tex)


def _camera(yaw_deg, pitch_deg=0.0, dist=0.7, size=SIZE):
    y, p = np.radians(yaw_deg), np.radians(pitch_deg)
    eye = dist * np.array([np.cos(p) * np.sin(y), np.sin(p), np.cos(p) * np.cos(y)])
    k = capture.intrinsics(size * dist / 0.36, size, size)
    return capture.Camera(k, capture.look_at(eye, [0, -0.02, 0.0]), size, size)


def _render(t, tex, cam, verts=None, light=None):
    v = jnp.asarray(t.verts) if verts is None else verts
    n = uvmaps.vertex_normals(v, t.faces, t.weld)
    light = light or capture.Light(np.array([0.0, 0.0, 1.0], np.float32))
    out = capture.render_capture(v, t.faces, jnp.asarray(t.uvs), tex, cam, light,
                                 jnp.array([0.1, 0.2, 0.3]), normals=n)  # fmt: skip
    return jax.device_get(out)


@pytest.mark.heavy
def test_dense_maps_agree_with_camera(scene):
    t, _, tex = scene
    cam = _camera(30, 10)
    out = _render(t, tex, cam)
    m = out["mask"]
    assert 0.1 < m.mean() < 0.6
    # every foreground pixel's surface point projects back onto that pixel's centre
    vtx = out["vtx"][m]
    xy = np.asarray(capture.project_points(jnp.asarray(vtx), cam))
    ii, jj = np.nonzero(m)
    np.testing.assert_allclose(xy, np.stack([jj + 0.5, ii + 0.5], -1), atol=0.02)
    zc = np.asarray(capture.to_camera(jnp.asarray(vtx), cam))[:, 2]
    np.testing.assert_allclose(out["depth"][m], zc, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(out["nrm"][m], axis=-1), 1, atol=1e-4)
    assert np.all(out["depth"][~m] == 0) and np.all(out["uv"][~m] == 0)
    # visible normals face the camera (z-buffer keeps the front surface)
    view = -np.asarray(cam.viewmat[2, :3])
    assert np.mean(out["nrm"][m] @ view > 0) > 0.97


def test_uv_and_geometry_maps_consistent(scene):
    """Screen raster vs UV raster: two independent paths to the same surface point."""
    t, r, tex = scene
    cam = _camera(-40, -15)
    out = _render(t, tex, cam)
    m = out["mask"] & (out["face_id"] >= 0)
    pos_map = uvmaps.position_map(r, jnp.asarray(t.verts))
    from_uv = np.asarray(uvmaps.sample_uv_map(pos_map, jnp.asarray(out["uv"][m])))
    # bilinear lookup inside a chart is accurate to a fraction of a texel (~1 mm at UV=128);
    # pixels whose lookup straddles a chart border mix in dilated/empty texels
    err = np.linalg.norm(from_uv - out["vtx"][m], axis=-1)
    assert np.median(err) < 3e-4 and np.mean(err < 2e-3) > 0.95


def test_landmark_visibility(scene):
    t, _, tex = scene
    cam = _camera(75)  # from the subject's left (+x)
    out = _render(t, tex, cam)
    lm = jnp.asarray(t.verts[t.landmark_ids])
    vis = np.asarray(capture.points_visible(lm, cam, jnp.asarray(out["depth"])))
    assert vis[16] and vis[54] and not vis[0] and not vis[36]
    kp = np.asarray(capture.project_points(lm, cam))
    assert np.all((kp > 0) & (kp < SIZE))


@pytest.mark.heavy
def test_blink_hides_the_eye_and_jit_matches(scene):
    t, _, tex = scene
    cam = _camera(0)
    names = list(t.expr_names)

    def eye_pixels(expr):
        v = pose_vertices(t, jnp.zeros(t.n_shape), jnp.asarray(expr), jnp.zeros(2))
        out = _render(t, tex, cam, verts=v)
        part = np.where(out["mask"], t.part_ids[t.faces[np.maximum(out["face_id"], 0), 0]], -1)
        return (part == PART_EYE_L).sum(), (part == PART_EYE_R).sum()

    e = np.zeros(t.n_expr, np.float32)
    left, right = eye_pixels(e)
    assert left > 10 and right > 10
    e[names.index("blink_left")] = 1.0
    left_b, right_b = eye_pixels(e)
    assert left_b < 0.1 * left and right_b == right

    # render_capture works under jit with a static raster block; gradients reach the vertices
    bbox = capture.auto_bbox(t.verts, t.faces, cam)
    light = capture.Light(np.array([0.0, 0.0, 1.0], np.float32))

    def img(v):
        return capture.render_capture(
            v, t.faces, jnp.asarray(t.uvs), tex, cam, light, jnp.zeros(3), bbox=bbox
        )["rgb"]

    v0 = jnp.asarray(t.verts)
    np.testing.assert_allclose(np.asarray(jax.jit(img)(v0)), np.asarray(img(v0)), atol=1e-6)
    g = jax.grad(lambda v: jnp.sum(img(v)))(v0)
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).sum() > 0
