"""UV map <-> latent token packing and the per-kind map normalisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import fica_jax  # noqa: F401  (turns off eager sharding)
from fica_jax.errors import UserError
from fica_jax.models import layers
from fica_jax.models import uv_latent as U
from fica_jax.models import vae as V

RS = np.random.RandomState(0)


def test_config_shapes_and_token_counts():
    cfg = U.UVLatentConfig()
    assert (cfg.latent_resolution, cfg.grid, cfg.token_channels) == (64, 32, 16)
    assert cfg.num_tokens(patch=2) == 256 and cfg.num_tokens() == 1024
    assert U.UVLatentConfig(unshuffle=4).num_tokens() == 256
    assert U.UVLatentConfig(uv_resolution=256).num_tokens(2) == 64
    with pytest.raises(UserError, match="DiT patch 3"):
        cfg.num_tokens(3)
    with pytest.raises(UserError, match="not divisible"):
        U.UVLatentConfig(uv_resolution=500)


@pytest.mark.parametrize("factor", [2, 4])
def test_pack_unpack_are_exact_inverses_with_documented_layout(factor):
    z = jnp.asarray(RS.randn(2, 64, 64, 4).astype(np.float32))
    t = layers.pixel_unshuffle(z, factor)
    assert t.shape == (2, 64 // factor, 64 // factor, 4 * factor * factor)
    np.testing.assert_array_equal(layers.pixel_shuffle(t, factor), z)
    # out[b, i, j, (dy*u + dx)*C + c] == z[b, i*u + dy, j*u + dx, c]
    b, i, j, dy, dx, c = 1, 3, 5, factor - 1, 1, 2
    assert t[b, i, j, (dy * factor + dx) * 4 + c] == z[b, i * factor + dy, j * factor + dx, c]
    # Same values as torch's pixel_unshuffle up to its (c, dy, dx) channel order.
    ref = torch.nn.functional.pixel_unshuffle(
        torch.from_numpy(np.array(z)).permute(0, 3, 1, 2), factor
    )
    ref = ref.numpy().transpose(0, 2, 3, 1).reshape(2, 64 // factor, 64 // factor, 4, factor**2)
    np.testing.assert_array_equal(ref.transpose(0, 1, 2, 4, 3).reshape(t.shape), t)


def test_texture_uint8_round_trip_is_bit_exact():
    tex = RS.randint(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    y = U.normalize_map("texture", tex)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    assert y.min() >= -1 and y.max() <= 1 and y[tex == 0].max() == -1 and y[tex == 255].min() == 1
    np.testing.assert_array_equal(U.denormalize_map("texture", y, uint8=True), tex)
    # jax in -> jax out, same numbers; float textures in [0, 1].
    yj = U.normalize_map("texture", jnp.asarray(tex))
    assert isinstance(yj, jax.Array)
    np.testing.assert_allclose(yj, y, atol=1e-7)
    f = RS.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(
        U.denormalize_map("texture", U.normalize_map("texture", f)), f, atol=1e-6
    )


def test_position_normal_mask_round_trips_and_clipping():
    pos = RS.uniform(-0.2, 0.3, (2, 8, 8, 3)).astype(np.float32) + np.float32([0.0, 1.6, 0.1])
    stats = U.MapStats.from_positions(pos)
    y = U.normalize_map("position", pos, stats)
    assert np.abs(y).max() <= 1 / 1.1 + 1e-6  # the 10% margin keeps data off the clip
    np.testing.assert_allclose(U.denormalize_map("position", y, stats), pos, atol=1e-6)
    far = pos + 10.0
    np.testing.assert_array_equal(U.normalize_map("position", far, stats), 1.0)  # clipped

    n = RS.randn(2, 8, 8, 3).astype(np.float32)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    np.testing.assert_allclose(
        U.denormalize_map("normal", U.normalize_map("normal", n)), n, atol=1e-6
    )
    # Decoded normals are not unit: denormalisation projects them back.
    back = U.denormalize_map("normal", 0.5 * n)
    np.testing.assert_allclose(np.linalg.norm(back, axis=-1), 1.0, atol=1e-6)

    m = (RS.uniform(size=(2, 8, 8, 1)) > 0.5).astype(np.float32)
    np.testing.assert_array_equal(U.denormalize_map("mask", U.normalize_map("mask", m)), m)


def test_background_texels_get_fixed_values():
    mask = np.zeros((1, 4, 4), np.float32)
    mask[:, :2] = 1.0
    stats = U.MapStats(position_center=(0, 1, 0), position_extent=(2, 2, 2))
    tex = np.full((1, 4, 4, 3), 200, np.uint8)
    y = U.normalize_map("texture", tex, stats, mask)
    assert (y[:, 2:] == -1).all() and np.allclose(y[:, :2], 200 / 127.5 - 1)
    pos = np.full((1, 4, 4, 3), 0.5, np.float32)
    yp = U.normalize_map("position", pos, stats, mask[..., None])
    assert (yp[:, 2:] == 0).all()
    xp = U.denormalize_map("position", yp, stats, mask)
    np.testing.assert_allclose(xp[:, :2], 0.5, atol=1e-6)
    assert (xp[:, 2:] == 0).all()


def test_stats_from_masked_positions_and_dict_round_trip():
    pos = RS.uniform(-1, 1, (4, 4, 3)).astype(np.float32)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 1:3] = True
    pos[~mask] = 100.0  # outliers outside the mask must not affect the stats
    stats = U.MapStats.from_positions(pos, mask, isotropic=False)
    inside = pos[mask]
    np.testing.assert_allclose(
        stats.position_center, (inside.min(0) + inside.max(0)) / 2, rtol=1e-6
    )
    np.testing.assert_allclose(
        stats.position_extent, (inside.max(0) - inside.min(0)) / 2 * 1.1, rtol=1e-6
    )
    assert U.MapStats.from_dict(stats.to_dict()) == stats
    with pytest.raises(UserError, match="unknown keys"):
        U.MapStats.from_dict({"centre": [0, 0, 0]})
    with pytest.raises(UserError, match="must be positive"):
        U.MapStats(position_extent=(1.0, 0.0, 1.0))
    with pytest.raises(UserError, match="unknown UV map kind 'albedo'"):
        U.normalize_map("albedo", pos)


def test_position_reference_residual_round_trip_and_digest():
    """Centred on a per-texel reference, positions encode their residual / extent (numpy and
    jax alike), decode back exactly, and a reference other than the digested one is refused."""
    ref = RS.uniform(-0.2, 0.2, (4, 4, 3)).astype(np.float32)
    pos = ref + RS.uniform(-0.01, 0.01, (2, 4, 4, 3)).astype(np.float32)
    stats = U.MapStats(position_extent=(0.02,) * 3).with_reference(ref)
    y = U.normalize_map("position", pos, stats)
    np.testing.assert_allclose(y, (pos - ref) / 0.02, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(U.normalize_map("position", jnp.asarray(pos), stats)), y, rtol=1e-6
    )
    np.testing.assert_allclose(U.denormalize_map("position", y, stats), pos, atol=1e-6)
    d = stats.to_dict()
    assert "position_reference" not in d and d["reference_digest"] == U.reference_digest(ref)
    back = U.MapStats.from_dict(d, ref)
    np.testing.assert_array_equal(back.position_reference, ref)
    assert back == stats
    with pytest.raises(UserError, match="not supplied"):
        U.MapStats.from_dict(d)
    with pytest.raises(UserError, match="not the one"):
        U.MapStats.from_dict(d, ref + 1e-3)
    # without a reference the same extent would clip every texel of this head to +-1
    assert (
        np.abs(U.normalize_map("position", pos, U.MapStats(position_extent=(0.02,) * 3))).max() == 1
    )


def test_position_maps_of_another_resolution_than_the_reference_are_refused():
    """A reference made at one data.uv_resolution does not broadcast against maps of another: a
    one-line UserError naming the key, numpy and jax, both directions."""
    stats = U.MapStats(position_extent=(0.02,) * 3).with_reference(np.zeros((4, 4, 3), np.float32))
    pos = np.zeros((2, 8, 8, 3), np.float32)
    for x in (pos, jnp.asarray(pos)):
        for fn in (U.normalize_map, U.denormalize_map):
            with pytest.raises(UserError, match=r"8x8 texels.*data.uv_resolution=4.*expected 4x4"):
                fn("position", x, stats)


@pytest.mark.heavy
def test_encode_decode_uv_maps_with_tiny_vae():
    vae = V.AutoencoderKL(V.VARIANTS["tiny"], rngs=nnx.Rngs(0))
    cfg = U.UVLatentConfig(uv_resolution=16, vae_factor=2)
    stats = U.MapStats(position_center=(0.0, 1.6, 0.0), position_extent=(0.2, 0.2, 0.2))
    maps = {
        "texture": jnp.asarray(RS.randint(0, 256, (2, 16, 16, 3)).astype(np.uint8)),
        "position": jnp.asarray(RS.uniform(-0.1, 0.1, (2, 16, 16, 3)) + [0.0, 1.6, 0.0]),
        "mask": jnp.ones((2, 16, 16, 1)),
    }
    grids = U.encode_uv_maps(vae, maps, None, cfg=cfg, stats=stats)
    assert {k: g.shape for k, g in grids.items()} == {k: (2, 4, 4, 16) for k in maps}
    # Batched over kinds == one kind at a time, and == the VAE's own scaled latent, packed.
    alone = U.encode_uv_maps(vae, {"position": maps["position"]}, None, cfg=cfg, stats=stats)
    np.testing.assert_allclose(alone["position"], grids["position"], atol=1e-5)
    z = vae.encode_to_latent(U.normalize_map("position", maps["position"], stats))
    np.testing.assert_allclose(layers.pixel_unshuffle(z, 2), grids["position"], atol=1e-5)
    # Sampling differs from the mean but keeps shapes.
    sampled = U.encode_uv_maps(vae, maps, jax.random.key(1), cfg=cfg, stats=stats)
    assert not np.allclose(sampled["texture"], grids["texture"])

    out = U.decode_uv_maps(vae, grids, cfg=cfg, stats=stats, mask=jnp.ones((2, 16, 16)))
    assert out["texture"].shape == out["position"].shape == (2, 16, 16, 3)
    assert out["mask"].shape == (2, 16, 16, 1)
    dec = vae.decode_from_latent(layers.pixel_shuffle(grids["position"], 2))
    np.testing.assert_allclose(out["position"], dec * 0.2 + jnp.array([0.0, 1.6, 0.0]), atol=1e-5)
    assert 0 <= float(out["texture"].min()) and float(out["texture"].max()) <= 1

    with pytest.raises(UserError, match="does not match the VAE"):
        U.encode_uv_maps(
            vae, maps, None, cfg=U.UVLatentConfig(uv_resolution=16, vae_factor=8, unshuffle=1)
        )


def test_sdxl_512_maps_give_32x32x16_grids():
    vae = nnx.eval_shape(lambda: V.AutoencoderKL(V.VARIANTS["sdxl"], rngs=nnx.Rngs(0)))
    maps = {
        "texture": jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.uint8),
        "position": jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32),
    }
    grids = nnx.eval_shape(lambda v, m: U.encode_uv_maps(v, m, None), vae, maps)
    assert {k: g.shape for k, g in grids.items()} == {k: (1, 32, 32, 16) for k in maps}
    out = nnx.eval_shape(lambda v, g: U.decode_uv_maps(v, g), vae, grids)
    assert out["texture"].shape == (1, 512, 512, 3)
