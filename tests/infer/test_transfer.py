"""`infer/evidence.py` and `infer/transfer.py`: the shading fit recovers a known light, the data's
level is what the training portraits give, the correction field is a normalised convolution of
the evidence, and on a synthetic capture's own geometry and camera the transfer moves only
texels near those the portrait shows, towards the capture's albedo."""

import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.pipeline import open_source
from fica_jax.infer.evidence import exposure_gain, fit_shading, shading
from fica_jax.infer.transfer import DETAIL, SIGMA, correction, transfer


def _normals(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_fit_shading_recovers_a_known_linear_light():
    rng = np.random.default_rng(0)
    nrm, albedo = _normals(rng, 400), rng.uniform(0.2, 0.9, (400, 3))
    coef = np.array([[0.6, 0.2, -0.1, 0.3], [0.5, 0.1, 0.2, 0.1], [0.7, -0.2, 0.0, 0.2]])
    observed = albedo * shading(jnp.asarray(nrm), jnp.asarray(coef))
    got = fit_shading(observed, jnp.asarray(albedo), jnp.asarray(nrm), jnp.ones(400))
    np.testing.assert_allclose(np.asarray(got), coef, atol=5e-3)  # the ridge's ~1% pull


def test_exposure_gain_is_the_mean_shading_of_the_training_unwraps():
    rng = np.random.default_rng(1)
    records = []
    for level in (0.6, 0.7, 0.8):
        tex = rng.uniform(0.2, 0.9, (16, 16, 3))
        part = np.zeros((16, 16, 10), np.float32)
        part[:10, :, :3] = tex[:10] * level
        part[:10, :, 3] = 1.0
        part[..., 4:7] = _normals(rng, 256).reshape(16, 16, 3)
        records.append({"partial_uv": part, "uv_texture": np.round(tex * 255).astype(np.uint8)})
    np.testing.assert_allclose(exposure_gain(records), [0.7] * 3, atol=0.01)  # the median


def _block(r=64):
    """A texture with its own gradient, and a block of texels the portrait shows."""
    tex = np.full((r, r, 3), 0.4, np.float32)
    tex[:, :, 1] = np.linspace(0.2, 0.6, r)[None]
    weight = np.zeros((r, r), np.float32)
    weight[20:44, 8:24] = 1.0
    mask = np.ones((r, r), np.float32)
    mask[:, 60:] = 0.0  # off the atlas: never touched
    return tex, weight, mask


def test_colour_band_spreads_the_evidence_smoothly_and_no_further_than_its_reach():
    tex, weight, mask = _block()
    r = tex.shape[0]
    offset = np.array([0.2, -0.1, 0.05], np.float32)
    sigma, reach = 1.0 / 16, 0.6  # a band that ends inside the map and saturates in the block
    out = correction(tex, tex + offset, weight, mask, sigma, reach)  # evidence: texture + offset
    share, moved = out["weight"], out["texture"] - tex
    # the correction is the offset itself wherever it reaches (a normalised convolution of a
    # constant difference is that constant, and the colour band leaves no detail band), with
    # all of its share inside the block
    assert np.all(share[24:40, 12:20] == 1.0)
    np.testing.assert_allclose(moved[24:40, 12:20], np.broadcast_to(offset, (16, 8, 3)), atol=1e-5)
    # it fades into the unseen texels beside the block, monotonically, and stops at 4 sigma
    row = share[32, 24:]
    assert 0 < row[2] < 1 and np.all(np.diff(row) <= 0)
    stop = 24 + int(4 * sigma * r + 0.5) + 1
    assert share[32, stop] == 0 and np.all(out["texture"][:, stop:] == tex[:, stop:])
    assert np.all(share[:, 60:] == 0)
    # where it is partial the offset is scaled by the share, not changed in direction
    part = (share > 0.05) & (share < 0.95)
    np.testing.assert_allclose(moved[part], share[part][:, None] * offset, atol=1e-5)


def test_detail_band_adds_the_evidence_features_at_the_detail_share():
    tex, weight, mask = _block()
    tex[:] = 0.4  # flat: only the evidence has detail
    checker = (np.indices(tex.shape[:2]).sum(0) % 2)[..., None] * np.float32([0.2, 0.1, 0.3])
    albedo = 0.5 + checker - checker.mean((0, 1))
    out = correction(tex, albedo, weight, mask, 1.0 / 16, 0.6)["texture"]
    inner = (slice(26, 38), slice(12, 20))
    # the evidence's level arrives whole, its checker at DETAIL of its amplitude: where both
    # bands are whole, the colour-corrected texture and the evidence blended at DETAIL
    np.testing.assert_allclose(out[inner].mean((0, 1)), albedo[inner].mean((0, 1)), atol=2e-3)
    np.testing.assert_allclose(
        out[inner].std((0, 1)), DETAIL * albedo[inner].std((0, 1)), rtol=0.02
    )
    # and none of it outside the texels it comes from
    outside = (weight == 0) & (mask > 0)
    np.testing.assert_allclose(out[outside].std(0), 0.0, atol=0.02)
    no_detail = correction(tex, albedo, weight, mask, 1.0 / 16, 0.6, detail=0.0)["texture"]
    assert np.all(no_detail[inner].std((0, 1)) < 0.1 * out[inner].std((0, 1)))


@pytest.fixture(scope="module")
def held_out(synth_dir):
    """The held-out synthetic identity's portrait batch on its own geometry, and the training
    split's exposure gain."""
    train, rec = open_source(synth_dir, "train"), open_source(synth_dir, "test")[0]
    gain = exposure_gain(train[i] for i in range(len(train)))
    geo = np.asarray(rec["uv_geometry"], np.float32)
    batch = {
        "portrait_image": np.asarray(rec["view_image"][0], np.float32)[None] / 255.0,
        "portrait_mask": np.asarray(rec["view_mask"][0], np.float32)[None],
        "portrait_K": np.asarray(rec["view_K"][0], np.float32)[None],
        "portrait_viewmat": np.asarray(rec["view_viewmat"][0], np.float32)[None],
        "portrait_offset": (np.asarray(rec["view_uv_geometry"][0], np.float32) - geo)[None],
        "landmark_uv": np.zeros((1, 1, 2), np.float32),
    }
    return rec, geo, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(gain)


def _run(held_out, texture, **bands):
    rec, geo, batch, gain = held_out
    mask = jnp.asarray(rec["uv_mask"], jnp.float32)[None]
    out = transfer(jnp.asarray(texture)[None], jnp.asarray(geo)[None], mask, batch, gain,
                   **bands)  # fmt: skip
    return np.asarray(out["texture"][0]), np.asarray(out["weight"][0])


MARGIN_DB = 2.0  # measured: 15.7 dB vs 13.1 for the mean texture


def _psnr(a, b, sel):
    return -10 * np.log10(np.mean(np.square(a[sel] - b[sel])))


def test_transfer_moves_texels_near_those_the_portrait_shows_towards_their_albedo(
    held_out, synth_dir
):
    from scipy.ndimage import binary_dilation

    rec = held_out[0]
    train = open_source(synth_dir, "train")
    mean = np.mean([np.asarray(train[i]["uv_texture"], np.float32) / 255.0
                    for i in range(len(train))], 0)  # fmt: skip
    out, weight = _run(held_out, mean)
    gt = np.asarray(rec["uv_texture"], np.float32) / 255.0
    seen = np.asarray(rec["partial_uv"], np.float32)[..., 3] > 0.5  # the exact unwrap's texels
    # untouched where the weight is 0; the weight lies within the correction's reach (4 sigma)
    # of the ground-truth unwrap's texels (grown by one texel: the unwrap at 32 px misses texels
    # between pixels), and mostly on them
    np.testing.assert_array_equal(out[weight == 0], mean[weight == 0])
    reach = int(4 * SIGMA * seen.shape[0] + 0.5) + 1
    near = binary_dilation(seen, np.ones((2 * reach + 1,) * 2, bool))
    assert weight.sum() > 0.3 * seen.sum()
    assert weight[~near].sum() == 0
    assert (weight * seen).sum() > 0.5 * weight.sum()
    # on the texels the portrait shows, the corrected texture is closer to the albedo than the
    # mean training texture it started from (the default band is wide for this 32^2 map: its
    # share there is 0.26-0.45)
    assert _psnr(out, gt, seen) > _psnr(mean, gt, seen) + MARGIN_DB


def test_the_level_comes_from_the_data_not_from_the_input_texture(held_out):
    rec = held_out[0]
    shape = (*rec["uv_mask"].shape, 3)
    tex = np.broadcast_to(np.float32([0.6, 0.45, 0.35]), shape)  # smooth: the field's own
    bands = {"sigma": 1.0 / 16, "reach": 0.6}  # a band whose share saturates on this small map
    a, wa = _run(held_out, tex, **bands)  # low-pass leaves it alone
    b, wb = _run(held_out, 0.5 * tex, **bands)  # a darker albedo estimate: same shading shape
    full = wa == 1.0  # texels taking all of the correction (elsewhere the input's share differs)
    assert full.sum() > 50
    np.testing.assert_array_equal(wa, wb)
    np.testing.assert_allclose(a[full], b[full], atol=1e-4)


def test_refiner_evidence_cues_are_the_de_lit_portrait_on_the_texels_it_shows(held_out, synth_dir):
    """`infer.refine.refine` with an evidence refiner appends `evidence_cues` of the same
    `delit_albedo` the transfer pastes: albedo x weight, weight, weight x (albedo - input
    texture), with weight only on texels the portrait's depth test keeps; there the albedo is
    the capture's texture far better than the mean training texture the refiner is given."""
    from flax import nnx

    from fica_jax.infer.refine import refine
    from fica_jax.models.refiner import Refiner, RefinerConfig

    rec, geo, batch, gain = held_out
    train = open_source(synth_dir, "train")
    mean = np.mean([np.asarray(train[i]["uv_texture"], np.float32) / 255.0
                    for i in range(len(train))], 0)  # fmt: skip
    r, size = geo.shape[0], int(batch["portrait_image"].shape[1])
    b = dict(batch, input_texture=jnp.asarray(mean)[None], input_geometry=jnp.asarray(geo)[None],
             uv_mask=jnp.asarray(rec["uv_mask"], jnp.float32)[None],
             exposure_gain=gain[None])  # fmt: skip
    model = Refiner(RefinerConfig(uv_resolution=r, image_size=size, evidence=True),
                    rngs=nnx.Rngs(0))  # fmt: skip
    cues = np.asarray(refine(model, b)["cues"][0])
    assert cues.shape == (r, r, 14)
    vis, albedo_w, w, diff = cues[..., 6], cues[..., 7:10], cues[..., 10], cues[..., 11:]
    assert w.max() == 1.0 and np.all(w[vis == 0] == 0) and (w > 0).sum() > 50
    on = w > 0
    albedo = albedo_w[on] / w[on][:, None]
    np.testing.assert_allclose(diff[on], w[on][:, None] * (albedo - mean[on]), atol=1e-5)
    assert np.all(diff[~on] == 0) and np.all(albedo_w[~on] == 0)
    gt = np.asarray(rec["uv_texture"], np.float32) / 255.0
    sure = w > 0.5
    gain_db = _psnr(albedo_w / np.maximum(w, 1e-6)[..., None], gt, sure) - _psnr(mean, gt, sure)
    assert gain_db > MARGIN_DB, gain_db
    with pytest.raises(ValueError, match="exposure_gain"):
        refine(model, {k: v for k, v in b.items() if k != "exposure_gain"})
