"""Head template, UV maps and OBJ I/O (fica_jax.geometry)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax.errors import UserError
from fica_jax.geometry import uvmaps
from fica_jax.geometry.obj import load_obj_template, write_obj_template
from fica_jax.geometry.procedural import PART_EYE_L, PART_SKIN
from fica_jax.geometry.template import make_head_template, pose_vertices

RES = 32  # small template keeps the tests fast


@pytest.fixture(scope="module")
def tpl():
    return make_head_template(RES)


def _pose(t, expr=None, gaze=(0.0, 0.0), ids=None):
    e = np.zeros(t.n_expr, np.float32) if expr is None else expr
    s = np.zeros(t.n_shape, np.float32) if ids is None else ids
    return np.asarray(pose_vertices(t, jnp.asarray(s), jnp.asarray(e), jnp.asarray(gaze)))


def test_template_shapes_and_landmarks(tpl):
    v = len(tpl.verts)
    assert tpl.faces.dtype == np.int32 and tpl.faces.max() < v
    assert tpl.uvs.shape == (v, 2) and tpl.uvs.min() >= 0 and tpl.uvs.max() <= 1
    assert tpl.shape_basis.shape[0] >= 16 and tpl.expr_basis.shape[0] >= 16
    assert tpl.shape_basis.shape[1:] == (v, 3) and len(tpl.expr_names) == tpl.n_expr
    lm = tpl.verts[tpl.landmark_ids]
    assert len(lm) >= 68
    assert np.all(tpl.part_ids[tpl.landmark_ids] == PART_SKIN)
    # on the face: the front half of the head, jaw from -x (image left) to +x, nose in front
    assert np.all(lm[:, 2] > 0.0)
    assert lm[0, 0] < -0.04 and lm[16, 0] > 0.04 and abs(lm[8, 0]) < 1e-6
    assert lm[30, 2] == lm[:, 2].max()  # nose tip is the most forward landmark
    assert lm[19, 1] > lm[37, 1] > lm[30, 1] > lm[51, 1] > lm[57, 1] > lm[8, 1]
    assert lm[36:42, 0].mean() < 0 < lm[42:48, 0].mean()
    with pytest.raises(ValueError):  # the cached template cannot be modified by accident
        tpl.verts[0] = 0.0


def test_normals_point_outward(tpl):
    n = np.asarray(uvmaps.vertex_normals(jnp.asarray(tpl.verts), tpl.faces, tpl.weld))
    skin = tpl.part_ids == PART_SKIN
    radial = tpl.verts * [1, 0, 1] - [0, 0, -0.01]
    assert np.mean(np.sum(n[skin] * radial[skin], -1) > 0) > 0.97
    for k in range(2):
        m = tpl.eye_masks[k]
        assert np.all(np.sum(n[m] * (tpl.verts[m] - tpl.eye_centres[k]), -1) > 0)
    # seam copies share one normal thanks to `weld`
    first = {}
    for i, w in enumerate(tpl.weld):
        first.setdefault(w, i)
        np.testing.assert_allclose(n[i], n[first[w]], atol=1e-5)


def test_vertex_normals_of_sphere_are_radial():
    t = make_head_template(RES)
    m = t.eye_masks[0]
    n = np.asarray(uvmaps.vertex_normals(jnp.asarray(t.verts), t.faces, t.weld))[m]
    radial = t.verts[m] - t.eye_centres[0]
    radial /= np.linalg.norm(radial, axis=-1, keepdims=True)
    assert np.min(np.sum(n * radial, -1)) > 0.98


def test_expressions_move_the_right_regions(tpl):
    rest = _pose(tpl)
    lm = tpl.landmark_ids
    names = list(tpl.expr_names)

    def delta(name, w=1.0):
        e = np.zeros(tpl.n_expr, np.float32)
        e[names.index(name)] = w
        return _pose(tpl, e) - rest

    d = delta("jaw_open")
    assert d[lm[8], 1] < -0.01  # chin drops by more than 1 cm
    assert np.abs(d[lm[19]]).max() < 1e-6 and np.abs(d[lm[30]]).max() < 1e-4  # brow, nose stay
    assert d[lm[66], 1] < -0.005 and abs(d[lm[62], 1]) < 1e-4  # lower inner lip moves, upper not
    d = delta("blink_left")
    lid = np.linalg.norm(d, axis=-1)
    eye_l = tpl.verts[lm[42:48]].mean(0)
    near = np.linalg.norm(tpl.verts - eye_l, axis=-1) < 0.015
    far = np.linalg.norm(tpl.verts - tpl.verts[lm[36:42]].mean(0), axis=-1) < 0.015
    assert lid[near & (tpl.part_ids == PART_SKIN)].max() > 0.01 and lid[far].max() < 1e-3
    d = delta("smile_left")
    assert d[lm[54], 1] > 0.003 and abs(d[lm[48], 1]) < 1e-3


def test_gaze_rotates_eyeballs_about_their_centres(tpl):
    rest = _pose(tpl)
    turned = _pose(tpl, gaze=(0.3, 0.1))
    for k in range(2):
        m = tpl.eye_masks[k]
        c = tpl.eye_centres[k]
        np.testing.assert_allclose(
            np.linalg.norm(turned[m] - c, axis=-1), np.linalg.norm(rest[m] - c, axis=-1), atol=1e-6
        )
        front = np.argmax(np.where(m, rest[:, 2], -np.inf))  # pupil centre at rest
        d = turned[front] - c
        assert d[0] > 0 and d[1] > 0  # yaw turns towards +x, pitch looks up
        np.testing.assert_allclose(np.arctan2(d[0], d[2]), 0.3, atol=0.05)
    other = ~(tpl.eye_masks[0] | tpl.eye_masks[1])
    np.testing.assert_array_equal(turned[other], rest[other])


def test_shape_space_and_gradients(tpl):
    ids = np.zeros(tpl.n_shape, np.float32)
    ids[list(tpl.shape_names).index("head_width")] = 1.0
    wide = _pose(tpl, ids=ids)
    rest = _pose(tpl)
    assert np.ptp(wide[:, 0]) > np.ptp(rest[:, 0]) * 1.03
    # eyeballs move rigidly with the shape field
    m = tpl.eye_masks[0]
    shift = wide[m] - rest[m]
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-6)

    chin = int(tpl.landmark_ids[8])
    g = jax.grad(lambda e: pose_vertices(tpl, jnp.zeros(tpl.n_shape), e, jnp.zeros(2))[chin, 1])(
        jnp.zeros(tpl.n_expr)
    )
    assert g[list(tpl.expr_names).index("jaw_open")] < -0.01


def _coverage(uvs, faces, res):
    """Independent numpy count of how many faces cover each texel centre (strict inside)."""
    count = np.zeros((res, res), np.int32)
    tri = uvs[faces] * res
    for f in range(len(faces)):
        a, b, c = tri[f]
        lo = np.floor(tri[f].min(0)).astype(int)
        hi = np.ceil(tri[f].max(0)).astype(int)
        xs, ys = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
        p = np.stack([xs + 0.5, ys + 0.5], -1)
        area = np.cross(b - a, c - a)
        w = [np.cross(q - pp, p - pp) / area for pp, q in ((b, c), (c, a), (a, b))]
        inside = (w[0] > 1e-6) & (w[1] > 1e-6) & (w[2] > 1e-6)
        ok = inside & (xs >= 0) & (ys >= 0) & (xs < res) & (ys < res)
        np.add.at(count, (ys[ok], xs[ok]), 1)
    return count


def test_uv_atlas_does_not_overlap(tpl):
    res = 96
    count = _coverage(tpl.uvs, tpl.faces, res)
    assert count.max() == 1  # no texel is claimed by two triangles (face chart and all others)
    skin = tpl.faces[tpl.part_ids[tpl.faces[:, 0]] == PART_SKIN]
    t = tpl.uvs[skin]
    area = np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0])
    assert np.all(area > 0) or np.all(area < 0)  # consistent orientation: no folds
    r = uvmaps.uv_raster(tpl.uvs, tpl.faces, res)
    assert np.all(r.mask[count > 0])  # the JAX rasterizer covers every strictly-inside texel


def test_position_map_texels_lie_on_their_triangles(tpl):
    res = 64
    r = uvmaps.uv_raster(tpl.uvs, tpl.faces, res)
    pos = np.asarray(uvmaps.position_map(r, jnp.asarray(tpl.verts)))
    ii, jj = np.nonzero(r.mask)
    f = r.face_id[ii, jj]
    # barycentrics recomputed independently from the UV triangle and the texel centre
    t = tpl.uvs[tpl.faces[f]] * res
    p = np.stack([jj + 0.5, ii + 0.5], -1)
    a, b, c = t[:, 0], t[:, 1], t[:, 2]
    area = np.cross(b - a, c - a)
    w = np.stack([np.cross(c - b, p - b), np.cross(a - c, p - c), np.cross(b - a, p - a)], -1)
    w /= area[:, None]
    assert w.min() > -1e-4
    expect = np.einsum("nk,nkc->nc", w, tpl.verts[tpl.faces[f]])
    np.testing.assert_allclose(pos[ii, jj], expect, atol=1e-5)
    # and a constant attribute rasterizes to that constant on the mask only
    m, mask = uvmaps.uv_rasterize(tpl.uvs, tpl.faces, jnp.ones((len(tpl.verts), 2)), res)
    np.testing.assert_allclose(np.asarray(m)[mask], 1.0, atol=1e-5)
    assert np.all(np.asarray(m)[~mask] == 0)
    nm = np.asarray(uvmaps.normal_map(r, jnp.asarray(tpl.verts), tpl.weld))
    np.testing.assert_allclose(np.linalg.norm(nm[r.mask], axis=-1), 1.0, atol=1e-4)


def test_uv_laplacian_and_sampling():
    res = 16
    yy, xx = np.mgrid[:res, :res].astype(np.float32)
    ramp = np.stack([2 * xx + 3 * yy], -1)
    mask = np.zeros((res, res), bool)
    mask[2:12, 3:14] = True
    lap = np.asarray(uvmaps.uv_laplacian(jnp.asarray(ramp), jnp.asarray(mask)))
    inner = np.zeros_like(mask)
    inner[3:11, 4:13] = True
    np.testing.assert_allclose(lap[inner], 0, atol=1e-4)  # linear function: zero Laplacian
    assert np.all(lap[~mask] == 0)
    bump = np.zeros((res, res, 1), np.float32)
    bump[5, 5] = 1
    lap = np.asarray(uvmaps.uv_laplacian(jnp.asarray(bump), jnp.ones((res, res), bool)))
    assert lap[5, 5, 0] == -4 and lap[5, 6, 0] == 1
    # bilinear lookup: exact at texel centres, halfway between two texels gives the mean
    uv = np.array([[(7 + 0.5) / res, (4 + 0.5) / res], [(7 + 1.0) / res, (4 + 0.5) / res]])
    s = np.asarray(uvmaps.sample_uv_map(jnp.asarray(ramp), jnp.asarray(uv)))
    np.testing.assert_allclose(s[:, 0], [2 * 7 + 3 * 4, 2 * 7.5 + 3 * 4], atol=1e-4)


def test_obj_round_trip(tmp_path, tpl):
    obj, lms, bases = tmp_path / "head.obj", tmp_path / "lm.json", tmp_path / "bases.npz"
    write_obj_template(tpl, obj, lms, bases)
    back = load_obj_template(obj, lms, bases)
    assert back.faces.shape == tpl.faces.shape and len(back.verts) == len(tpl.verts)
    np.testing.assert_allclose(back.verts[back.faces], tpl.verts[tpl.faces], atol=1e-6)
    np.testing.assert_allclose(back.uvs[back.faces], tpl.uvs[tpl.faces], atol=1e-6)
    np.testing.assert_allclose(back.verts[back.landmark_ids], tpl.verts[tpl.landmark_ids])
    np.testing.assert_array_equal(back.part_ids[back.faces], tpl.part_ids[tpl.faces])
    np.testing.assert_allclose(
        back.expr_basis[:, back.faces], tpl.expr_basis[:, tpl.faces], atol=1e-7
    )
    assert back.expr_names == tpl.expr_names
    np.testing.assert_allclose(
        back.eye_centres[0], tpl.verts[tpl.part_ids == PART_EYE_L].mean(0), atol=1e-6
    )
    # without bases the spaces are empty and posing still works
    plain = load_obj_template(obj, lms)
    assert plain.shape_basis.shape == (0, len(plain.verts), 3)
    v = pose_vertices(plain, jnp.zeros(0), jnp.zeros(0), jnp.zeros(2))
    np.testing.assert_allclose(np.asarray(v), plain.verts, atol=1e-6)


def test_bad_obj_names_file_and_line(tmp_path):
    lm = tmp_path / "lm.txt"
    lm.write_text(" ".join(str(i % 3) for i in range(68)))
    bad = tmp_path / "bad.obj"
    bad.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 7/1\n")
    with pytest.raises(UserError, match=r"bad\.obj:5.*out of range"):
        load_obj_template(bad, lm)
    bad.write_text("v 0 0 zero\n")
    with pytest.raises(UserError, match=r"bad\.obj:1"):
        load_obj_template(bad, lm)
    bad.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(UserError, match=r"bad\.obj:4.*no UV"):
        load_obj_template(bad, lm)
    good = tmp_path / "tri.obj"
    good.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nf 1/1 2/2 3/3\n")
    short = tmp_path / "short.json"
    short.write_text("[0, 1, 2]")
    with pytest.raises(UserError, match=r"short\.json.*at least 68"):
        load_obj_template(good, short)
    t = load_obj_template(good, lm)
    np.testing.assert_allclose(t.uvs[t.faces[0]], [[0, 1], [1, 1], [0, 0]])  # v flipped down
