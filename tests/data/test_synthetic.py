"""Procedural synthetic capture generator (data_pipelines.synthetic)."""

import numpy as np
import pytest

from data_pipelines import schema
from data_pipelines.synthetic.generator import SynthConfig, make_identity, template_metadata

CFG = SynthConfig(uv_resolution=64, image_size=96, n_frames=2, template_resolution=32)


@pytest.fixture(scope="module")
def rec():
    return make_identity(0, CFG, seed=5)


@pytest.mark.heavy
def test_record_follows_schema(rec):
    schema.validate(rec)
    assert rec["view_image"].shape == (3, 96, 96, 3) and rec["partial_uv"].shape == (64, 64, 10)
    assert schema.decode(schema.encode(rec))["identity"] == rec["identity"]
    meta = template_metadata(CFG)
    assert meta["n_landmarks"] == rec["view_kpts"].shape[1] >= 68
    assert (
        meta["expression_dims"] == rec["view_expression"].shape[1] == len(meta["expression_names"])
    )
    assert meta["shape_dims"] == rec["id_coeffs"].shape[0]


def test_deterministic_and_distinct(rec):
    again = make_identity(0, CFG, seed=5)
    for k in schema.REQUIRED:
        np.testing.assert_array_equal(rec[k], again[k], err_msg=k)
    other = make_identity(7, CFG, seed=5)
    assert str(other["split"]) == "test" and str(rec["split"]) == "train"
    assert str(other["identity"]) != str(rec["identity"])
    assert not np.array_equal(other["uv_texture"], rec["uv_texture"])
    assert not np.allclose(other["uv_geometry"], rec["uv_geometry"])
    assert not np.array_equal(other["view_image"][0], rec["view_image"][0])


def test_views_are_plausible(rec):
    masks = rec["view_mask"].astype(bool)
    assert np.all(masks.reshape(3, -1).mean(1) > 0.05)
    kp = rec["view_kpts"][0]
    inside = np.all((kp >= 0) & (kp < 96), -1)
    assert inside.mean() > 0.9
    vis = rec["view_kpts_visible"][0].astype(bool)
    assert vis.mean() > 0.4 and np.all(inside[vis])
    # visible keypoints land on the head mask
    ij = np.floor(kp[vis]).astype(int)
    assert masks[0][ij[:, 1], ij[:, 0]].mean() > 0.95
    # dense maps are zero off the head, unit normals on it
    nrm = rec["view_nrm"].astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(nrm[masks], axis=-1), 1, atol=5e-3)
    assert np.all(nrm[~masks] == 0) and np.all(rec["view_depth"][~masks] == 0)
    uv = rec["view_uv"].astype(np.float32)[masks]
    assert uv.min() >= 0 and uv.max() <= 1


def test_gt_maps_and_partial_uv_agree(rec):
    mask = rec["uv_mask"].astype(bool)
    assert 0.3 < mask.mean() < 0.95
    nrm = rec["uv_normal"].astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(nrm[mask], axis=-1), 1, atol=5e-3)
    part = rec["partial_uv"].astype(np.float32)
    hit = part[..., 3] > 0
    assert hit.sum() > 100 and mask[hit].mean() > 0.98
    # unwrapped portrait positions sit on the portrait's posed UV position map
    posed = rec["view_uv_geometry"][0].astype(np.float32)
    err = np.linalg.norm(part[..., 7:][hit] - posed[hit], axis=-1)
    assert np.median(err) < 3e-3
    # the unwrapped colour is the texture times a shading factor common to the three channels
    tex = rec["uv_texture"].astype(np.float32) / 255
    bright = hit & (tex.mean(-1) > 0.2) & np.all(part[..., :3] < 0.98, -1)
    ratio = part[..., :3][bright] / np.maximum(tex[bright], 1e-3)
    spread = np.median(np.std(ratio, -1) / np.mean(ratio, -1))
    assert spread < 0.12
    # the neutral geometry map has the shape of a head (metres, face towards +z)
    geo = rec["uv_geometry"][mask]
    assert 0.15 < np.ptp(geo[:, 1]) < 0.4 and geo[:, 2].max() > 0.08
