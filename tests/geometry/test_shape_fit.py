"""`geometry/shape_fit.py`: the shape space is the training maps' principal components, the
landmark fit recovers a known shape from exact landmarks and ignores the invisible ones,
replacing coordinates keeps its share of what lies outside the space, and on a held-out synthetic capture
the fitted geometry is closer to its own than the training mean shape is."""

import numpy as np
import pytest

from data_pipelines.pipeline import open_source
from data_pipelines.shards import read_metadata
from fica_jax.geometry import template_store
from fica_jax.geometry.shape_fit import (
    MIN_LANDMARKS,
    coordinates,
    fit_landmarks,
    replace_coordinates,
    shape_space,
)

R = 16
MARGIN_MM = 0.3  # measured: 1.60 mm vs 2.11 for the mean of the 8 training shapes


def _space(rng, k=4, n=12):
    """n maps M + B c + noise-free on a disc mask, from a known k-dimensional basis."""
    yy, xx = np.mgrid[:R, :R]
    mask = ((yy - R / 2 + 0.5) ** 2 + (xx - R / 2 + 0.5) ** 2 < (R / 2) ** 2).astype(np.float32)
    mean = np.stack([(xx - R / 2) / R, (yy - R / 2) / R, np.full((R, R), 0.1)], -1) * 0.2
    basis = rng.normal(size=(k, R, R, 3)) * 0.01
    coef = rng.normal(size=(n, k))
    maps = (mean + np.einsum("nk,krsc->nrsc", coef, basis)) * mask[..., None]
    return maps.astype(np.float32), mask


def test_shape_space_is_orthonormal_on_the_mask_and_spans_the_training_maps():
    maps, mask = _space(np.random.default_rng(0))
    space = shape_space(maps, mask)
    b = space["basis"].reshape(len(space["sd"]), -1)
    assert len(space["sd"]) == 4  # the known dimension, not n - 1
    np.testing.assert_allclose(b @ b.T, np.eye(4), atol=1e-5)
    assert np.all(space["basis"][:, mask == 0] == 0)
    coords = np.stack([coordinates(space, m) for m in maps])
    np.testing.assert_allclose(coords.std(0, ddof=1), space["sd"], rtol=1e-4)
    for m, c in zip(maps, coords, strict=True):  # each map is the mean plus its coordinates
        recon = space["mean"] + np.einsum("k,krsc->rsc", c, space["basis"])
        np.testing.assert_allclose(recon, m, atol=1e-5)


def _camera(size=64):
    K = np.array([[2.5 * size, 0, size / 2], [0, 2.5 * size, size / 2], [0, 0, 1]], np.float32)
    viewmat = np.eye(4, dtype=np.float32)
    viewmat[2, 3] = 0.5  # the head 0.5 m in front of the camera, looking down +z
    return K, viewmat


def _project(points, K, viewmat):
    pc = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    uvw = pc @ K.T
    return uvw[:, :2] / uvw[:, 2:]


def _landmarks(space, c, uv, K, viewmat):
    geo = space["mean"] + np.einsum("k,krsc->rsc", c, space["basis"])
    ij = np.clip((uv * R).astype(int), 0, R - 1)  # texel centres: bilinear lookup is exact
    return _project(geo[ij[:, 1], ij[:, 0]], K, viewmat)


def test_fit_recovers_a_known_shape_from_exact_landmarks_and_ignores_invisible_ones():
    rng = np.random.default_rng(1)
    maps, mask = _space(rng)
    space = shape_space(maps, mask)
    texels = np.argwhere(mask > 0)[rng.choice(int(mask.sum()), 40, replace=False)]
    uv = (texels[:, ::-1] + 0.5) / R
    truth = space["sd"] * rng.normal(size=len(space["sd"]))
    K, viewmat = _camera()
    kpts = _landmarks(space, truth, uv, K, viewmat)
    visible = np.ones(40, bool)
    visible[::4] = False
    kpts[~visible] += 30.0  # wrong, and marked invisible
    c, info = fit_landmarks(space, np.zeros((R, R, 3)), uv, kpts, visible, K, viewmat, 64,
                            prior=1e-4)  # fmt: skip
    np.testing.assert_allclose(c, truth, atol=0.02 * space["sd"].max())
    assert info["landmarks"] == 30 and info["rms_px"] < 0.05
    # the prior pulls towards the mean shape, never past it
    c_prior, _ = fit_landmarks(space, np.zeros((R, R, 3)), uv, kpts, visible, K, viewmat, 64,
                               prior=100.0)  # fmt: skip
    assert np.linalg.norm(c_prior) < np.linalg.norm(c)
    few = np.zeros(40, bool)
    few[: MIN_LANDMARKS - 1] = True
    assert fit_landmarks(space, np.zeros((R, R, 3)), uv, kpts, few, K, viewmat, 64) is None


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.0])
def test_replace_coordinates_keeps_its_share_of_what_lies_outside_the_space(keep):
    maps, mask = _space(np.random.default_rng(2))
    space = shape_space(maps, mask)
    outside = np.random.default_rng(3).normal(size=(R, R, 3)) * mask[..., None] * 0.01
    flat = space["basis"].reshape(len(space["sd"]), -1)
    outside -= (flat.T @ (flat @ outside.ravel())).reshape(R, R, 3)  # orthogonal to the space
    geometry = maps[0] + outside
    c = np.arange(len(space["sd"]), dtype=np.float32) * 0.01
    got = replace_coordinates(space, geometry, c, keep)
    np.testing.assert_allclose(coordinates(space, got), c, atol=1e-5)
    want = space["mean"] + np.einsum("k,krsc->rsc", c, space["basis"]) + keep * outside
    np.testing.assert_allclose(got, want, atol=1e-5)
    if keep == 1.0:  # the default keeps it whole
        np.testing.assert_array_equal(replace_coordinates(space, geometry, c), got)


def test_on_a_held_out_capture_the_fit_beats_the_mean_shape(synth_dir):
    train, rec = open_source(synth_dir, "train"), open_source(synth_dir, "test")[0]
    maps = np.stack([np.asarray(train[i]["uv_geometry"], np.float32) for i in range(len(train))])
    mask = np.asarray(rec["uv_mask"], np.float32)
    space = shape_space(maps, mask)
    meta = read_metadata(synth_dir)["template"]
    t = template_store.from_metadata(meta, synth_dir, "metadata")
    geo = np.asarray(rec["uv_geometry"], np.float32)
    offset = (np.asarray(rec["view_uv_geometry"][0], np.float32) - geo) * mask[..., None]
    c, info = fit_landmarks(space, offset, t.uvs[t.landmark_ids], rec["view_kpts"][0],
                            rec["view_kpts_visible"][0] > 0, rec["view_K"][0],
                            rec["view_viewmat"][0], rec["view_image"].shape[1])  # fmt: skip
    fitted = replace_coordinates(space, space["mean"], c)
    l1 = lambda g: float(np.abs(g - geo)[mask > 0].mean() * 1000)
    assert info["landmarks"] >= MIN_LANDMARKS
    assert l1(fitted) < l1(space["mean"]) - MARGIN_MM, (l1(fitted), l1(space["mean"]))
