"""Templates as data (`template_store`) and the PCA expression space (`expression_pca`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax.errors import UserError
from fica_jax.geometry import expression_pca, template_store
from fica_jax.geometry.template import make_head_template, pose_vertices
from fica_jax.geometry.uvmaps import position_map, uv_raster


def _other_template():
    """The procedural head with a perturbed rest shape: a 'dataset' template of its own."""
    t = make_head_template(24)
    return dataclasses.replace(t, name="capture-topology", verts=t.verts * 1.01)


def test_roundtrip_digest_and_key(tmp_path):
    t = _other_template()
    path = template_store.save(t, tmp_path)
    back = template_store.load(path, template_store.digest(t))
    assert template_store.digest(back) == template_store.digest(t)
    key = template_store.key(t)
    assert key.startswith("capture-topology@") and template_store.resolve(key) is not None
    # the procedural template keeps its bare name as key
    p = make_head_template(24)
    assert template_store.key(p) == p.name == "fica-procedural-head-r24"
    # same name, other arrays: another key
    t2 = dataclasses.replace(t, verts=t.verts * 1.02)
    assert template_store.key(t2) != key
    with pytest.raises(UserError, match="not loaded"):
        template_store.resolve(template_store.key(t2))
    with pytest.raises(UserError, match="digest"):
        template_store.load(path, template_store.digest(t2))


def test_export_stats_rebuild_the_template_from_float32():
    t = _other_template()
    stats, arrays = template_store.export_stats(t)
    as_stored = {k: v.astype(np.float32) for k, v in arrays.items()}  # an export stores F32
    template_store._REGISTRY.pop(template_store.key(t), None)  # as in a fresh process
    assert template_store.register_export(stats, as_stored, "x") == template_store.key(t)
    assert template_store.digest(template_store.resolve(template_store.key(t))) == (
        template_store.digest(t)
    )


def test_check_same_names_both_sides():
    a, b = {"key": "ava256-topo@123"}, {"key": "fica-procedural-head-r48"}
    template_store.check_same(a, a, "x", "y")
    template_store.check_same(a, {}, "x", "y")  # unknown on one side: nothing to compare
    with pytest.raises(UserError, match=r"--data D .*'ava256-topo@123'.*--models M"):
        template_store.check_same(a, b, "--data D", "--models M")


# ----------------------------------------------------------------------------- PCA
def _tracked(seed: int, n: int):
    """The procedural template (24 rows) posed by `n` random expressions, as tracked 'frames':
    -> (template, UV raster at 32, uv_map(verts), neutral [V, 3], frames [n, V, 3], their UV
    deltas from neutral)."""
    t, rng = make_head_template(24), np.random.default_rng(seed)
    uvr = uv_raster(t.uvs, t.faces, 32)
    uv_map = lambda v: np.asarray(position_map(uvr, jnp.asarray(v)), np.float64)
    zero, neutral = jnp.zeros(t.n_shape), t.verts.astype(np.float64)
    codes = rng.normal(0, 0.5, (n, t.n_expr)).astype(np.float32)
    frames = np.stack([np.asarray(pose_vertices(t, zero, jnp.asarray(c), jnp.zeros(2)))
                       for c in codes])  # fmt: skip
    d_uv = np.stack([uv_map(v) - uv_map(neutral) for v in frames])
    return t, uvr, uv_map, neutral, frames, d_uv


def test_pca_basis_rebuilds_held_out_frames_and_matches_its_vertex_basis():
    t, uvr, uv_map, neutral, frames, d_all = _tracked(0, 50)
    train, d_uv, held = frames[:40], d_all[:40], d_all[40:]
    basis = expression_pca.fit_basis(d_uv, train - neutral, uvr.mask, dims=t.n_expr)
    # at most one direction per blendshape (fewer where two coincide on this coarse atlas)
    assert 12 <= basis.dims <= t.n_expr and basis.explained[-1] > 0.999
    # the vertex basis rasterises to the UV basis (the same directions)
    for k in range(basis.dims):
        np.testing.assert_allclose(uv_map(basis.vertices[k]) * uvr.mask[..., None], basis.uv[k],
                                   atol=1e-5)  # fmt: skip
    fit = expression_pca.reconstruction_rmse(held, basis.uv, uvr.mask)
    assert fit["pca_mm"] < 0.01 * fit["neutral_mm"] and fit["neutral_mm"] > 0.5
    # a truncated basis still beats the neutral face, by less
    small = expression_pca.fit_basis(d_uv, train - neutral, uvr.mask, dims=4)
    part = expression_pca.reconstruction_rmse(held, small.uv, uvr.mask)
    assert fit["pca_mm"] < part["pca_mm"] < part["neutral_mm"]


def test_mesh_codes_equal_the_projection_of_their_uv_deltas():
    t, uvr, _, neutral, train, d_uv = _tracked(1, 30)
    r = uvr.resolution
    basis = expression_pca.fit_basis(d_uv, train - neutral, uvr.mask, dims=6)
    fitted = dataclasses.replace(t, expr_basis=basis.vertices)
    n_pos = int(t.weld.max()) + 1
    first = np.full(n_pos, -1)
    first[t.weld[::-1]] = np.arange(len(t.weld))[::-1]
    meshes = train[:5][:, first]  # OBJ order: one row per position
    codes = expression_pca.mesh_codes(fitted, meshes, neutral[first], resolution=r)
    want = expression_pca.project(d_uv[:5], basis.uv, uvr.mask)
    np.testing.assert_allclose(codes, want, atol=2e-3 * np.abs(want).max())
    with pytest.raises(UserError, match="vertices"):
        expression_pca.mesh_codes(fitted, meshes[:, :-1], neutral[first][:-1], resolution=r)
