"""Stage `vae`: fine-tune (or train) the SDXL-architecture autoencoder on UV texture + geometry maps.

FiCA's completion model works in SDXL-VAE latent space (paper Sec. 2.2, supplement: 512 UV maps
-> 64x64x4 latents). Labs load the pre-trained SDXL VAE (`cfg.model.init_from_diffusers`) and may
fine-tune it on their UV maps; where no weights are at hand (the tiny demo, a new UV resolution or
map type) this stage trains the autoencoder from scratch, so the DiT's latent space is always a
learned one, never random.

One network serves both domains, as in the paper: every batch holds the texture maps and the
geometry (position) maps of the same identities (textures arrive in [0, 1], as in every stage),
each mapped to [-1, 1] by
`fica_jax.models.uv_latent.normalize_map` with the position statistics from the config
(`map_stats`: by default positions are encoded as the residual from the training split's mean
shape, which is what varies between identities).

Loss = L1(recon, x) over texels inside the UV layout + kl_weight * KL(posterior || N(0, I)),
the usual latent-diffusion autoencoder objective without the adversarial term (a perceptual term
needs LPIPS weights, which are not shipped; `cfg.model.kl_weight` sets the KL balance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import transforms as T
from data_pipelines.pipeline import check_uv_resolution
from data_pipelines.shards import template_stats
from fica_jax import config
from fica_jax.infer.latents import map_stats, model_inputs, train_mean_geometry
from fica_jax.models import uv_latent
from fica_jax.models.vae import VARIANTS, AutoencoderKL, VAEConfig
from fica_jax.train.stage import Stage


def vae_config(cfg: ml_collections.ConfigDict) -> VAEConfig:
    """The variant named by `cfg.model.variant`, with `block_out_channels` etc. overridable."""
    keys = ("block_out_channels", "layers_per_block", "norm_groups", "latent_channels")
    return config.variant(
        VARIANTS,
        cfg.model.variant,
        "model.variant",
        {k: cfg.model.get(k) for k in keys},
        remat=cfg.train.remat,
    )


def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> AutoencoderKL:
    return AutoencoderKL(vae_config(cfg), rngs=rngs, dtype=jnp.dtype(cfg.train.compute_dtype))


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


def make_loss(cfg: ml_collections.ConfigDict):
    # a resolution the VAE or the data cannot give is refused here, before anything compiles
    r, f = int(cfg.data.uv_resolution), vae_config(cfg).spatial_factor
    check_uv_resolution(cfg.data.dir, r, f)
    stats, kl_weight = map_stats(cfg), float(cfg.model.kl_weight)

    def loss_fn(model: AutoencoderKL, batch, rng: jax.Array):
        x, m = model_inputs(batch, stats)
        recon, post = model(x, rng)
        l1 = _masked_l1(recon, x, m)
        kl = jnp.mean(post.kl())
        metrics = {"l1": l1, "kl": kl, **_split_metrics(recon, x, m, stats)}
        return l1 + kl_weight * kl, metrics

    return loss_fn


def make_eval(cfg: ml_collections.ConfigDict):
    """Reconstruction with the posterior mode (what the DiT's targets are encoded with), the
    8x-downsample-then-bilinear-upsample baseline on the same maps and, for geometry, the
    training mean shape (the template every identity would get without its own geometry)."""
    stats, r = map_stats(cfg), int(cfg.data.uv_resolution)
    mean_shape = train_mean_geometry(str(cfg.data.dir), r) if cfg.data.dir else None

    def eval_fn(model: AutoencoderKL, batch, rng: jax.Array):
        del rng
        x, m = model_inputs(batch, stats)
        recon = model.decode(model.encode(x).mode())
        out = _split_metrics(recon, x, m, stats)
        f = model.cfg.spatial_factor
        base = downsample_upsample(x, f)
        out.update({f"baseline_{k}": v for k, v in _split_metrics(base, x, m, stats).items()})
        if mean_shape is not None:
            b = x.shape[0] // 2
            shape = jnp.broadcast_to(jnp.asarray(mean_shape), batch["uv_geometry"].shape)
            shape = uv_latent.normalize_map("position", shape, stats, batch["uv_mask"])
            both = jnp.concatenate([x[:b], shape], axis=0)
            geo = _split_metrics(both, x, m, stats)["geometry_l1_mm"]
            out["baseline_mean_shape_geometry_l1_mm"] = geo
        return out

    return eval_fn


def downsample_upsample(x: jax.Array, factor: int) -> jax.Array:
    """Area-average by `factor`, then bilinear back: what a latent of the same grid keeps."""
    b, h, w, c = x.shape
    small = x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
    return jax.image.resize(small, x.shape, method="bilinear")


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
    fn = jax.jit(lambda mdl, b: make_eval(cfg)(mdl, b, None))
    rows = [jax.device_get(fn(model, {k: jnp.asarray(v) for k, v in b.items()})) for b in batches]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def example(record: T.Record, rng: np.random.Generator, opts: T.TransformOptions) -> T.Example:
    """A capture record's UV maps at `data.uv_resolution` (`T.resize_uv`); no augmentation (UV
    atlas positions are meaningful)."""
    return T.uv_maps(record, opts.uv_resolution)


def fit_data(meta) -> dict:
    """The VAE encodes the captures' UV maps at their resolution (a smaller `data.uv_resolution`
    resamples them, maps and position reference alike)."""
    return {"data.uv_resolution": int(meta["uv_resolution"])}


def export_stats(cfg: ml_collections.ConfigDict) -> tuple[dict, dict[str, np.ndarray]]:
    """The map normalisation the VAE was trained with (and its position reference map), and the
    head template of the maps it encodes."""
    s = map_stats(cfg)
    ref = s.position_reference
    template = template_stats(cfg.data.dir)[0]["template"]  # its facts; the UPM carries arrays
    arrays = {} if ref is None else {"stats.position_reference": ref}
    return {"map_stats": s.to_dict(), "template": template}, arrays


# name, sharding rule table, model, loss, data, batch spec (see fica_jax/train/stage.py).
STAGE = Stage(
    name="vae",
    rules="vae",
    make_model=make_model,
    make_loss=make_loss,
    example=example,  # over capture shards (make_data: CaptureData(example))
    batch_spec=batch_spec,
    make_eval=make_eval,
    metrics={"texture_psnr": True, "geometry_l1_mm": False},
    export_stats=export_stats,
    fit_data=fit_data,
)
