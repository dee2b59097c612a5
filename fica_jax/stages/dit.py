"""Stage `dit`: FiCA's texture/geometry completion DiT trained by flow matching (paper s.2.2).

One network, two domains: every batch holds the texture latent and the geometry latent of the
same identities, with their shared conditions (the partial-UV control maps at latent resolution,
the portrait's image embedding). The loss is `fica_jax.flow.two_domain_loss`,
L(texture, d_T) + L(geometry, d_G) with logit-normal flow times; each example's conditions are
dropped with probability `cfg.model.p_uncond` for classifier-free guidance.

Data: the latent cache written by `fica data cache` (`cfg.data.dir`; `data_pipelines/latents.py`).
Training samples each latent from its cached VAE posterior. The conditioning inputs are
switchable for the paper's ablation: `cfg.model.control_maps` picks control groups from
(rgb, mask, nrm, vtx) and `cfg.model.use_image_emb=False` zeroes the embedding.

Batch (global, `batch_spec`):
  tex_latent  [B, G, G, C]   sampled VAE latent of the complete UV texture (FiCA: 32x32x16)
  geo_latent  [B, G, G, C]   sampled VAE latent of the complete UV geometry (position) map
  control     [B, G, G, Cc]  chosen control groups, C channels each (Cc = C x groups)
  image_emb   [B, E]         image embedding of the portrait

Held-out evaluation (`make_eval`; decoded with the cache's VAE run, or `cfg.model.vae`) samples both
domains with `cfg.model.eval_steps` guided Euler steps, decodes them and reports texture PSNR /
SSIM on the UV mask against the mean training texture and geometry L1 (mm) against the mean
training neutral geometry, and (when condition dropout trained the null condition) against the
same model sampled from the same noise with every condition dropped (`baseline_uncond_*`: what
the conditioning adds); texture PSNR is also split into the texels the control covers
(`*_visible`: the cache's `partial_uv` mask, i.e. the dense predictor's unwrap in a
`--control dense` cache; `fica eval` splits by the ground-truth unwrap) and the rest
(`*_unseen`), for the samples, the mean texture and the VAE's reconstruction (the ceiling);
`make_sample` writes the preview sheet and a TensorBoard image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.latents import (
    LatentSource,
    cache_metadata,
    control_width,
    latent_example,
    load_baselines,
)
from fica_jax import config, flow
from fica_jax.errors import UserError
from fica_jax.infer.latents import decoding_context, latent_pipeline
from fica_jax.infer.sample import decode, preview_rows, sample_maps, temperatures, uv_metrics
from fica_jax.models.dit import VARIANTS, DiT, DiTConfig
from fica_jax.preview import write_step_sheet
from fica_jax.train.stage import Stage


def dit_config(cfg: ml_collections.ConfigDict) -> DiTConfig:
    """`VARIANTS[cfg.model.variant]` with the data shapes from the config; width/depth/heads
    override the variant when non-zero."""
    m = cfg.model
    return config.variant(
        VARIANTS,
        m.variant,
        "model.variant",
        {k: m.get(k) for k in ("width", "depth", "heads")},
        in_channels=m.latent_channels,
        control_channels=_control_width(cfg),
        image_emb_dim=m.image_emb_dim,
        patch=m.patch,
        qk_norm=m.qk_norm,
        control_concat=bool(m.get("control_concat", False)),
        grid=m.latent_size // m.patch,
        remat=cfg.train.remat,
    )


def _control_width(cfg: ml_collections.ConfigDict) -> int:
    """Channels of the control input (`data_pipelines.latents.control_width`); "pixels" needs
    the UV resolution: `model.uv_resolution`, else the cache's."""
    m = cfg.model
    kind, r = str(m.get("control_input", "latents")), int(m.get("uv_resolution", 0))
    if kind == "pixels" and not r:  # "pooled" is as wide at any resolution
        if not cfg.data.dir:
            raise UserError(f"model.control_input={kind!r} needs model.uv_resolution or data.dir")
        r = int(cache_metadata(cfg.data.dir)["uv_resolution"])
    return control_width(m.control_maps, kind, int(m.latent_channels), r // int(m.latent_size))


def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DiT:
    return DiT(
        dit_config(cfg),
        rngs=rngs,
        dtype=jnp.dtype(cfg.train.compute_dtype),
        param_dtype=jnp.dtype(cfg.train.param_dtype),
    )


def _time_kw(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    m = cfg.model
    return dict(mean=float(m.t_mean), std=float(m.t_std), shift=float(m.t_shift))


def make_loss(cfg: ml_collections.ConfigDict):
    """(model, batch, rng) -> (L_T + L_G, metrics), with CFG condition dropout."""
    p_uncond, time_kw = float(cfg.model.p_uncond), _time_kw(cfg)
    emb_noise = float(cfg.model.get("emb_noise", 0.0))

    def loss_fn(model: DiT, batch, rng: jax.Array):
        k_drop, k_flow = jax.random.split(rng)
        b = batch["tex_latent"].shape[0]
        drop = jax.random.bernoulli(k_drop, p_uncond, (b,))
        cond2 = lambda a: jnp.concatenate([a, a], axis=0)  # same conditions for both domains
        image_emb = batch["image_emb"]
        if emb_noise:  # conditioning augmentation: noise at emb_noise x each embedding's RMS
            rms = jnp.sqrt(jnp.mean(jnp.square(image_emb), axis=-1, keepdims=True))
            image_emb = image_emb + emb_noise * rms * jax.random.normal(
                jax.random.fold_in(rng, 7), image_emb.shape
            )
        image_emb, control = cond2(image_emb), cond2(batch["control"])

        def velocity(x_s, t, domain, drop2):
            return model(x_s, t, image_emb, domain, control, drop2)

        loss, metrics = flow.two_domain_loss(
            velocity, batch["tex_latent"], batch["geo_latent"], k_flow, drop, **time_kw
        )
        return loss, {**metrics, "drop_frac": jnp.mean(drop.astype(jnp.float32))}

    return loss_fn


def make_eval(cfg: ml_collections.ConfigDict):
    """The flow loss without condition dropout (fixed times and noise) and, with a VAE
    (`cfg.model.vae`), decoded held-out metrics of guided samples against the baselines."""
    time_kw = _time_kw(cfg)
    ctx = (
        decoding_context(cfg, cache_metadata(cfg.data.dir), "config model.vae")
        if cfg.data.dir
        else None
    )
    if ctx is not None:
        vae_def, vae_state = nnx.split(ctx.vae)
    steps, scale, shift = (
        int(cfg.model.eval_steps),
        float(cfg.model.cfg_scale),
        float(cfg.model.t_shift),
    )
    temp = temperatures(cfg.model.get("temperature", 1.0))
    uncond = float(cfg.model.p_uncond) > 0  # the null condition is trained

    def eval_fn(model: DiT, batch, rng: jax.Array):
        rng = jax.random.PRNGKey(0) if rng is None else rng
        b = batch["tex_latent"].shape[0]
        cond2 = lambda a: jnp.concatenate([a, a], axis=0)
        image_emb, control = cond2(batch["image_emb"]), cond2(batch["control"])

        def velocity(x_s, t, domain, drop2):
            return model(x_s, t, image_emb, domain, control, drop2)

        loss, out = flow.two_domain_loss(
            velocity,
            batch["tex_latent"],
            batch["geo_latent"],
            rng,
            jnp.zeros((b,), bool),
            **time_kw,
        )
        # the flow loss and its terms; not `s_mean`, the mean flow time drawn (no figure of merit)
        out = {
            "loss": loss,
            "loss_texture": out["loss_texture"],
            "loss_geometry": out["loss_geometry"],
        }
        if ctx is not None:
            vae = nnx.merge(vae_def, vae_state)
            kw = dict(steps=steps, cfg_scale=scale, shift=shift, temperature=temp, jit=False)
            texture, geometry = sample_maps(model, vae, ctx.stats, ctx.unshuffle, batch, rng, **kw)
            out.update(uv_metrics(texture, geometry, batch, ctx.baselines))
            if uncond:  # the same noise without any condition: what the conditioning adds
                kw["cfg_scale"] = 0.0
                tex0, geo0 = sample_maps(model, vae, ctx.stats, ctx.unshuffle, batch, rng, **kw)
                free = uv_metrics(tex0, geo0, batch, ctx.baselines)
                out["baseline_uncond_texture_psnr"] = free["texture_psnr"]
                out["baseline_uncond_geometry_l1_mm"] = free["geometry_l1_mm"]
            # What the VAE alone keeps of the ground truth (the ceiling for any sample).
            recon, recon_geo = decode(
                vae,
                ctx.stats,
                ctx.unshuffle,
                batch["tex_latent"],
                batch["geo_latent"],
                batch["uv_mask"],
                jit=False,
            )
            ceiling = uv_metrics(recon, recon_geo, batch, ctx.baselines)
            out["vae_texture_psnr"] = ceiling["texture_psnr"]
            out["vae_geometry_l1_mm"] = ceiling["geometry_l1_mm"]
            for part in ("visible", "unseen"):  # the texels the portrait shows / hides
                if f"texture_psnr_{part}" in ceiling:
                    out[f"vae_texture_psnr_{part}"] = ceiling[f"texture_psnr_{part}"]
        return out

    return eval_fn


def make_sample(cfg: ml_collections.ConfigDict):
    """Preview sheet of the eval batch (`fica_jax.preview.write_step_sheet`: PNG + TensorBoard)."""
    if not cfg.data.dir:
        return None
    ctx = decoding_context(cfg, cache_metadata(cfg.data.dir), "config model.vae")
    steps, scale, shift = (
        int(cfg.model.eval_steps),
        float(cfg.model.cfg_scale),
        float(cfg.model.t_shift),
    )
    temp = temperatures(cfg.model.get("temperature", 1.0))

    vae_def, vae_state = nnx.split(ctx.vae)

    # The VAE's arrays enter as constants (as in eval_fn): they live on one device while the
    # DiT is sharded over the training mesh.
    @nnx.jit
    def maps(model, batch, rng):
        vae = nnx.merge(vae_def, vae_state)
        kw = dict(steps=steps, cfg_scale=scale, shift=shift, temperature=temp, jit=False)
        return sample_maps(model, vae, ctx.stats, ctx.unshuffle, batch, rng, **kw)

    def sample_fn(model: DiT, batch, rng, workdir, step: int) -> None:
        texture, geometry = maps(model, batch, rng)
        batch, texture, geometry = jax.device_get((batch, texture, geometry))
        write_step_sheet(preview_rows(batch, texture, geometry), workdir, step)

    return sample_fn


def make_data(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int):
    """Train: posterior samples, shuffled, forever. Eval: posterior means and the ground-truth
    maps of the held-out identities, one ordered pass (at least one full batch)."""
    if split == "train":
        return latent_pipeline(cfg, split, process_index, process_count, ground_truth=False)
    n = len(LatentSource(cfg.data.dir, "test"))
    epochs = max(1, -(-int(cfg.data.batch_size) // max(n, 1)))
    return latent_pipeline(
        cfg,
        split,
        process_index,
        process_count,
        ground_truth=True,
        augment=False,
        shuffle=False,
        num_epochs=epochs,
    )


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, m = cfg.data.batch_size, cfg.model
    s, f32 = m.latent_size, jnp.float32
    cc = _control_width(cfg)
    return {
        "tex_latent": jax.ShapeDtypeStruct((b, s, s, m.latent_channels), f32),
        "geo_latent": jax.ShapeDtypeStruct((b, s, s, m.latent_channels), f32),
        "control": jax.ShapeDtypeStruct((b, s, s, cc), f32),
        "image_emb": jax.ShapeDtypeStruct((b, m.image_emb_dim), f32),
    }


def export_stats(cfg: ml_collections.ConfigDict) -> tuple[dict, dict[str, np.ndarray]]:
    """What sampling needs from the latent cache the DiT trained on: its VAE, latent scale and
    layout, the UV mask the maps decode under and the mean-texture / mean-shape baselines."""
    meta = cache_metadata(cfg.data.dir)
    keep = ("map_stats", "latent_scale", "unshuffle", "vae", "grid", "token_channels",
            "image_emb_dim", "embedding", "control_groups", "control_source", "uv_resolution",
            "template")  # fmt: skip
    arrays = {"stats.uv_mask": np.asarray(LatentSource(cfg.data.dir, "train")[0]["uv_mask"])}
    try:
        base = load_baselines(cfg.data.dir)
    except UserError:  # caches without baselines (test fixtures) carry no reference map
        base = {}
    arrays |= {f"stats.{k}": np.asarray(v) for k, v in base.items()}
    if meta.get("map_stats", {}).get("reference_digest") and "position_reference" not in base:
        raise UserError(f"{cfg.data.dir}: the cache's position reference map is missing")
    json_part = {k: meta[k] for k in keep if k in meta}
    return json_part, {k: v.astype(np.float32) for k, v in arrays.items()}


def fit_data(meta) -> dict:
    """The latent cache's grid, token channels, embedding width and UV resolution (its
    `metadata.json`)."""
    return {
        "model.uv_resolution": int(meta["uv_resolution"]),
        "model.latent_size": int(meta["grid"]),
        "model.latent_channels": int(meta["token_channels"]),
        "model.image_emb_dim": int(meta["image_emb_dim"]),
    }


STAGE = Stage(
    name="dit",
    rules="dit",
    make_model=make_model,
    make_loss=make_loss,
    # over latent cache rows; it lives with the cache format, which `fica sample` reads too
    example=latent_example,
    make_data=make_data,
    batch_spec=batch_spec,
    make_eval=make_eval,
    metrics={
        "loss": False,
        "loss_texture": False,
        "loss_geometry": False,
        "texture_psnr": True,
        "texture_ssim": True,
        "geometry_l1_mm": False,
        "vae_texture_psnr": True,
        "vae_geometry_l1_mm": False,
        "texture_psnr_visible": True,
        "texture_psnr_unseen": True,
        "vae_texture_psnr_visible": True,
        "vae_texture_psnr_unseen": True,
    },
    make_sample=make_sample,
    export_stats=export_stats,
    fit_data=fit_data,
)
