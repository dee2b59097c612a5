"""`infer/shape_samples.py`: the refiner's training maps get the landmark fit `fica generate`
gives its input, a training identity in a shape space without its own shape, a held-out one in
the whole training space; the textures stay; a second fit changes nothing."""

import numpy as np
import pytest

from data_pipelines.pipeline import open_source
from data_pipelines.shards import dataset_template
from fica_jax.geometry import template_store
from fica_jax.geometry.shape_fit import coordinates, shape_space
from fica_jax.infer.generate import fit_shape
from fica_jax.infer.shape_samples import fit_sample_maps, record_pose


def _maps(synth_dir, folder, skip=()):
    """Stand-in DiT maps: each identity's ground-truth geometry shifted by a few millimetres."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        src = open_source(synth_dir, split)
        for i in range(len(src)):
            rec = src[i]
            name = str(rec["identity"])
            if name in skip:
                continue
            geo = np.asarray(rec["uv_geometry"], np.float32)
            mask = np.asarray(rec["uv_mask"], np.float32)[..., None]
            geo = geo + rng.normal(size=3).astype(np.float32) * 0.004 * mask
            np.save(folder / f"{name}_geometry.npy", geo)
            np.save(folder / f"{name}_texture.npy", np.full(geo.shape, 0.5, np.float32))


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_samples_are_fitted_as_generate_fits_them_never_in_their_own_shape(
    synth_dir, tmp_path, keep
):
    train, test = open_source(synth_dir, "train"), open_source(synth_dir, "test")
    skip = str(train[1]["identity"])
    _maps(synth_dir, tmp_path, skip=(skip,))
    before = {p.name: np.load(p) for p in tmp_path.glob("*.npy")}
    got = fit_sample_maps(tmp_path, synth_dir, keep)
    assert got["fitted"] == len(train) + len(test) - 1 and not got["skipped"]
    assert not (tmp_path / f"{skip}_geometry.npy").exists()  # no map, nothing written

    geos = np.stack([np.asarray(train[i]["uv_geometry"], np.float32) for i in range(len(train))])
    atlas = np.asarray(train[0]["uv_mask"])
    key = template_store.key(dataset_template(synth_dir))
    for src, which in ((train, 0), (train, 4), (test, 0)):
        rec = src[which]
        name = str(rec["identity"])
        held_out = src is test
        rows = [i for i in range(len(train)) if held_out or i != which]  # leave-one-out here
        space = shape_space(geos[rows], atlas, 32)
        mask = np.asarray(rec["uv_mask"], np.float32)
        size = int(rec["view_image"].shape[1])
        want, info = fit_shape(space, key, before[f"{name}_geometry.npy"], mask,
                               record_pose(rec), size, keep)  # fmt: skip
        assert info["landmarks"] >= 8
        fitted = np.load(tmp_path / f"{name}_geometry.npy")
        np.testing.assert_array_equal(fitted, want)
        assert not np.allclose(fitted, before[f"{name}_geometry.npy"])
        if keep == 0.0:  # the fitted shape itself: nothing outside the space
            inside = space["mean"] + np.einsum("k,krsc->rsc", coordinates(space, fitted),
                                               space["basis"])  # fmt: skip
            np.testing.assert_allclose(fitted, inside * mask[..., None], atol=1e-6)
    for name, arr in before.items():
        if name.endswith("_texture.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / name), arr)

    again = {p.name: np.load(p) for p in tmp_path.glob("*_geometry.npy")}
    fit_sample_maps(tmp_path, synth_dir, keep)
    for name, arr in again.items():
        np.testing.assert_allclose(np.load(tmp_path / name), arr, atol=1e-6)
