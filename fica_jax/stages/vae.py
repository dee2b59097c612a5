"""Stage `vae`: fine-tune (or train) the SDXL-architecture autoencoder on UV texture + geometry maps.

FiCA's completion model works in SDXL-VAE latent space (paper Sec. 2.2, supplement: 512 UV maps
-> 64x64x4 latents). Labs load the pre-trained SDXL VAE (`cfg.model.init_from_diffusers`) and may
fine-tune it on their UV maps; where no weights are at hand (the tiny demo, a new UV resolution or
map type) this stage trains the autoencoder from scratch, so the DiT's latent space is always a
learned one, never random.

One network serves both domains, as in the paper: every batch holds the texture maps and the
geometry (position) maps of the same identities, each mapped to [-1, 1] by
`fica_jax.models.uv_latent.normalize_map` with the position statistics from the config.

Loss = L1(recon, x) over texels inside the UV layout + kl_weight * KL(posterior || N(0, I)),
the usual latent-diffusion autoencoder objective without the adversarial term (a perceptual term
needs LPIPS weights, which are not shipped; `cfg.model.kl_weight` sets the KL balance).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.pipeline import stage_data
from fica_jax.models import uv_latent
from fica_jax.models.vae import VARIANTS, AutoencoderKL, VAEConfig
from fica_jax.train.stage import Stage, needs_config


def vae_config(cfg: ml_collections.ConfigDict) -> VAEConfig:
    """The variant named by `cfg.model.variant`, with `block_out_channels` etc. overridable."""
    m = cfg.model
    base = VARIANTS[m.variant] if m.variant in VARIANTS else None
    if base is None:
        raise ValueError(f"unknown VAE variant {m.variant!r}; expected one of {sorted(VARIANTS)}")
    fields = {}
    for key in ("block_out_channels", "layers_per_block", "norm_groups", "latent_channels"):
        value = m.get(key)
        if value:
            fields[key] = tuple(value) if isinstance(value, list | tuple) else value
    return VAEConfig(**{**base.__dict__, **fields, "remat": cfg.train.remat != "none"})


def map_stats(cfg: ml_collections.ConfigDict) -> uv_latent.MapStats:
    return uv_latent.MapStats(
        position_center=tuple(cfg.model.position_center),
        position_extent=tuple(cfg.model.position_extent),
    )


def init_fn(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> AutoencoderKL:
    return AutoencoderKL(vae_config(cfg), rngs=rngs, dtype=jnp.dtype(cfg.train.compute_dtype))


def model_inputs(batch, stats: uv_latent.MapStats) -> tuple[jax.Array, jax.Array]:
    """[2B, R, R, 3] maps in [-1, 1] (texture rows then geometry rows) and their [2B, R, R, 1]
    UV-layout mask."""
    mask = batch["uv_mask"]
    # The pipeline gives the texture already in [-1, 1]; normalize_map expects [0, 1] floats.
    tex = uv_latent.normalize_map("texture", (batch["uv_texture"] + 1.0) * 0.5, stats, mask)
    geo = uv_latent.normalize_map("position", batch["uv_geometry"], stats, mask)
    x = jnp.concatenate([tex, geo], axis=0)
    m = jnp.concatenate([mask, mask], axis=0)[..., None]
    return x, m


def _masked_l1(a, b, m):
    return jnp.sum(jnp.abs(a - b) * m) / (jnp.sum(m) * a.shape[-1] + 1e-6)


def _split_metrics(recon, x, m, stats) -> dict[str, jax.Array]:
    b = x.shape[0] // 2
    tex_err = jnp.sum(jnp.square((recon[:b] - x[:b]) * 0.5) * m[:b]) / (jnp.sum(m[:b]) * 3 + 1e-6)
    geo = lambda y: uv_latent.denormalize_map("position", y, stats)
    geo_l1 = _masked_l1(geo(recon[b:]), geo(x[b:]), m[b:])
    return {
        "texture_psnr": -10.0 * jnp.log10(tex_err + 1e-12),
        "geometry_l1_mm": 1000.0 * geo_l1,
    }


def make_loss_fn(cfg: ml_collections.ConfigDict):
    stats, kl_weight = map_stats(cfg), float(cfg.model.kl_weight)

    def loss_fn(model: AutoencoderKL, batch, rng: jax.Array):
        x, m = model_inputs(batch, stats)
        recon, post = model(x, rng)
        l1 = _masked_l1(recon, x, m)
        kl = jnp.mean(post.kl())
        metrics = {"l1": l1, "kl": kl, **_split_metrics(recon, x, m, stats)}
        return l1 + kl_weight * kl, metrics

    return loss_fn


def make_eval_fn(cfg: ml_collections.ConfigDict):
    """Reconstruction with the posterior mode (what the DiT's targets are encoded with) and the
    8x-downsample-then-bilinear-upsample baseline on the same maps."""
    stats = map_stats(cfg)

    def eval_fn(model: AutoencoderKL, batch, rng: jax.Array):
        del rng
        x, m = model_inputs(batch, stats)
        recon = model.decode(model.encode(x).mode())
        out = _split_metrics(recon, x, m, stats)
        f = model.cfg.spatial_factor
        base = downsample_upsample(x, f)
        out.update({f"baseline_{k}": v for k, v in _split_metrics(base, x, m, stats).items()})
        return out

    return eval_fn


def downsample_upsample(x: jax.Array, factor: int) -> jax.Array:
    """Area-average by `factor`, then bilinear back: what a latent of the same grid keeps."""
    b, h, w, c = x.shape
    small = x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return jax.image.resize(small, x.shape, method="bilinear")


def make_data(cfg, split, process_index, process_count):
    return stage_data(cfg, split, process_index, process_count, stage="vae")


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, r = cfg.data.batch_size, cfg.data.uv_resolution
    f32 = jnp.float32
    return {
        "uv_texture": jax.ShapeDtypeStruct((b, r, r, 3), f32),
        "uv_geometry": jax.ShapeDtypeStruct((b, r, r, 3), f32),
        "uv_normal": jax.ShapeDtypeStruct((b, r, r, 3), f32),
        "uv_mask": jax.ShapeDtypeStruct((b, r, r), f32),
    }


def reference_metrics(batches, model, cfg) -> dict[str, float]:
    """Mean eval metrics over an iterable of host batches (used by reports and tests)."""
    fn = jax.jit(lambda mdl, b: make_eval_fn(cfg)(mdl, b, None))
    rows = [jax.device_get(fn(model, {k: jnp.asarray(v) for k, v in b.items()})) for b in batches]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def configure(cfg: ml_collections.ConfigDict) -> Stage:
    return dataclasses.replace(STAGE, loss_fn=make_loss_fn(cfg), eval_fn=make_eval_fn(cfg))


STAGE = Stage(
    name="vae",
    network="vae",
    init_fn=init_fn,
    loss_fn=needs_config("vae"),
    make_data=make_data,
    batch_spec=batch_spec,
    configure=configure,
)
