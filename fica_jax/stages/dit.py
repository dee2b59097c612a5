"""Stage `dit`: FiCA's texture/geometry completion DiT trained by flow matching (paper s.2.2).

One network, two domains: every batch holds the texture latent and the geometry latent of the
same identities, with their shared conditions (partial-UV control map at latent resolution, CLIP
image embedding). The loss is `fica_jax.flow.two_domain_loss`, L(texture, d_T) + L(geometry, d_G)
with logit-normal flow times; each example's conditions (image embedding and control) are
dropped with probability `cfg.model.p_uncond` for classifier-free guidance.

Batch (global, `batch_spec`):
  tex_latent  [B, h, w, C]   VAE latent of the complete UV texture (FiCA: 32x32x16)
  geo_latent  [B, h, w, C]   VAE latent of the complete UV geometry (position) map
  control     [B, h, w, Cc]  partial UV maps [RGB, mask, normal, vertex] at latent resolution
  image_emb   [B, E]         CLIP image embedding of the portrait

DATA STAND-IN: `make_data` does not read captures yet. Until the DiT data issue wires the VAE
encoder and the CLIP encoder into the pipeline, it yields a deterministic *synthetic* latent
stream with the right shapes and a learnable relation between conditions and targets
(`SyntheticLatents`), through a checkpointable Grain iterator. It exists so the train loop,
`fica plan` and the tests run end to end; a model trained on it is not a FiCA model.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.pipeline import host_records
from fica_jax import config, flow
from fica_jax.models.dit import VARIANTS, DiT, DiTConfig
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
        control_channels=m.control_channels,
        image_emb_dim=m.image_emb_dim,
        patch=m.patch,
        qk_norm=m.qk_norm,
        grid=m.latent_size // m.patch,
        remat=cfg.train.remat,
    )


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

    def loss_fn(model: DiT, batch, rng: jax.Array):
        k_drop, k_flow = jax.random.split(rng)
        b = batch["tex_latent"].shape[0]
        drop = jax.random.bernoulli(k_drop, p_uncond, (b,))
        cond2 = lambda a: jnp.concatenate([a, a], axis=0)  # same conditions for both domains
        image_emb, control = cond2(batch["image_emb"]), cond2(batch["control"])

        def velocity(x_s, t, domain, drop2):
            return model(x_s, t, image_emb, domain, control, drop2)

        loss, metrics = flow.two_domain_loss(
            velocity, batch["tex_latent"], batch["geo_latent"], k_flow, drop, **time_kw
        )
        return loss, {**metrics, "drop_frac": jnp.mean(drop.astype(jnp.float32))}

    return loss_fn


def make_eval(cfg: ml_collections.ConfigDict):
    """The training loss without condition dropout (the rng fixes times and noise)."""
    time_kw = _time_kw(cfg)

    def eval_fn(model: DiT, batch, rng: jax.Array):
        rng = jax.random.PRNGKey(0) if rng is None else rng
        b = batch["tex_latent"].shape[0]
        cond2 = lambda a: jnp.concatenate([a, a], axis=0)
        image_emb, control = cond2(batch["image_emb"]), cond2(batch["control"])

        def velocity(x_s, t, domain, drop2):
            return model(x_s, t, image_emb, domain, control, drop2)

        loss, metrics = flow.two_domain_loss(
            velocity,
            batch["tex_latent"],
            batch["geo_latent"],
            rng,
            jnp.zeros((b,), bool),
            **time_kw,
        )
        return {"loss": loss, **metrics}

    return eval_fn


# ----------------------------------------------------------------------------- data
class SyntheticLatents:
    """Record index -> one synthetic example (shape-correct stand-in until the DiT data issue).

    The texture latent is a smooth random field (4x4-block upsampled noise plus fine noise); the
    geometry latent is a fixed linear mix of it plus its own smooth field; a random visible
    half-plane masks both, and the control map is a fixed random projection of
    [masked texture, masked geometry, mask] to Cc channels; the image embedding is a fixed
    projection of the texture latent's channel means. All fixed maps come from seed 1234, the
    example from seed `record`: any process computes the same example for the same index.
    Top-level and picklable so Grain worker processes can import it.
    """

    def __init__(self, size: int, channels: int, control_channels: int, image_emb_dim: int):
        self.size, self.c, self.cc, self.e = size, channels, control_channels, image_emb_dim
        fixed = np.random.default_rng(1234)
        self.mix = fixed.standard_normal((channels, channels)) / np.sqrt(channels)
        self.ctrl = fixed.standard_normal((2 * channels + 1, control_channels))
        self.ctrl /= np.sqrt(2 * channels + 1)
        self.img = fixed.standard_normal((channels, image_emb_dim)) / np.sqrt(channels)

    def _field(self, rng: np.random.Generator) -> np.ndarray:
        coarse = max(1, self.size // 4)
        low = rng.standard_normal((coarse, coarse, self.c))
        up = np.kron(low, np.ones((self.size // coarse, self.size // coarse, 1)))
        return up + 0.1 * rng.standard_normal((self.size, self.size, self.c))

    def __call__(self, record: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(record))
        tex = self._field(rng)
        geo = 0.7 * tex @ self.mix + 0.7 * self._field(rng)
        yy, xx = np.mgrid[: self.size, : self.size] / max(1, self.size - 1) - 0.5
        angle, offset = rng.uniform(0, 2 * np.pi), rng.uniform(-0.2, 0.2)
        mask = (np.cos(angle) * xx + np.sin(angle) * yy > offset).astype(np.float64)[..., None]
        control = np.concatenate([tex * mask, geo * mask, mask], axis=-1) @ self.ctrl
        image_emb = np.tanh(tex.mean(axis=(0, 1)) @ self.img)
        f = lambda a: np.asarray(a, np.float32)
        return {
            "tex_latent": f(tex),
            "geo_latent": f(geo),
            "control": f(control),
            "image_emb": f(image_emb),
        }


def make_data(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int):
    """This host's batches of `SyntheticLatents` (a stand-in; see the module docstring).

    train: records [0, num_records) shuffled, repeated forever; eval: the next num_eval_records,
    once. Each host takes its slice (`host_records`) and batches batch_size / process_count.
    """
    m = cfg.model
    per_host = cfg.data.batch_size // process_count
    if split == "train":
        records, seed, epochs = (0, m.num_records), cfg.data.shuffle_seed, None
    else:
        records, seed, epochs = (m.num_records, m.num_records + m.num_eval_records), None, 1
    ds = host_records(
        grain.MapDataset.range(*records), process_index, process_count, seed=seed, num_epochs=epochs
    )
    ds = ds.map(
        SyntheticLatents(m.latent_size, m.latent_channels, m.control_channels, m.image_emb_dim)
    )
    return ds.batch(per_host, drop_remainder=True).to_iter_dataset()


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, m = cfg.data.batch_size, cfg.model
    s, f32 = m.latent_size, jnp.float32
    return {
        "tex_latent": jax.ShapeDtypeStruct((b, s, s, m.latent_channels), f32),
        "geo_latent": jax.ShapeDtypeStruct((b, s, s, m.latent_channels), f32),
        "control": jax.ShapeDtypeStruct((b, s, s, m.control_channels), f32),
        "image_emb": jax.ShapeDtypeStruct((b, m.image_emb_dim), f32),
    }


# name, sharding rule table, model, loss, data, batch spec (see fica_jax/train/stage.py).
STAGE = Stage("dit", "dit", make_model, make_loss, make_data, batch_spec, make_eval=make_eval)
