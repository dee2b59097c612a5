"""Stage `dense`: fine-tune the Sapiens-style dense predictor on capture data (FiCA Sec. 2.1).

FiCA fine-tunes Sapiens-1B to predict per-pixel UV coordinates, vertex coordinates and normals
(supplement: L1 for UV and vertices, cosine similarity for normals); we add a foreground-mask head
(BCE) because unwrapping needs to know which pixels are head. The paper's augmentations (random
crop and scale, photometric distortion) are applied by the `dense` data transform.

Per-pixel targets only count inside the ground-truth mask. Vertex positions are compared after
the same centre/extent normalisation the VAE uses for geometry maps, so the loss weights do not
depend on the dataset's length unit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from data_pipelines import transforms
from data_pipelines.pipeline import CaptureData
from fica_jax import config
from fica_jax.models.vit import VARIANTS, DensePredictor
from fica_jax.train.stage import Stage


def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DensePredictor:
    # Non-zero `cfg.model.{width,depth,heads,patch,head_channels,final_upsample}` change the
    # named variant (the CPU demo uses a finer patch grid than Sapiens' 16).
    keys = ("width", "depth", "heads", "patch", "head_channels", "final_upsample")
    variant = config.variant(
        VARIANTS,
        cfg.model.variant,
        "model.variant",
        {k: cfg.model[k] for k in keys},
        image_size=(cfg.data.image_size, cfg.data.image_size),
        remat=cfg.train.remat,
    )
    return DensePredictor(variant, rngs=rngs, dtype=jnp.dtype(cfg.train.compute_dtype))


def _masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
    """Mean of x [B, H, W, C] over pixels where m [B, H, W] is 1 (and over channels)."""
    return jnp.sum(x * m[..., None]) / (jnp.sum(m) * x.shape[-1] + 1e-6)


def dense_losses(
    pred: dict[str, jax.Array], batch, center: jax.Array, extent: jax.Array
) -> dict[str, jax.Array]:
    """Per-term losses. pred: uv [B,H,W,2], vtx [B,H,W,3], nrm [B,H,W,3], mask_logits [B,H,W,1]."""
    m = batch["mask"]
    norm = lambda p: (p - center) / extent
    nrm = pred["nrm"] / jnp.maximum(jnp.linalg.norm(pred["nrm"], axis=-1, keepdims=True), 1e-6)
    cos = jnp.sum(nrm * batch["nrm"], axis=-1, keepdims=True)
    logits = pred["mask_logits"][..., 0]
    bce = jnp.mean(jnp.maximum(logits, 0) - logits * m + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    return {
        "uv_l1": _masked_mean(jnp.abs(pred["uv"] - batch["uv"]), m),
        "vtx_l1": _masked_mean(jnp.abs(norm(pred["vtx"]) - norm(batch["vtx"])), m),
        "nrm_cos": _masked_mean(1.0 - cos, m),
        "mask_bce": bce,
    }


def make_loss(cfg: ml_collections.ConfigDict):
    w = cfg.model.loss_weights
    weights = {"uv_l1": w.uv, "vtx_l1": w.vtx, "nrm_cos": w.nrm, "mask_bce": w.mask}
    center = jnp.asarray(cfg.model.position_center, jnp.float32)
    extent = jnp.asarray(cfg.model.position_extent, jnp.float32)

    def loss_fn(model: DensePredictor, batch, rng: jax.Array):
        del rng
        terms = dense_losses(model(batch["image"]), batch, center, extent)
        loss = sum(weights[k] * v for k, v in terms.items())
        return loss, terms

    return loss_fn


def make_eval(cfg: ml_collections.ConfigDict):
    """UV error on held-out identities against the best constant predictor of the same pixels
    (the per-batch mean UV of the foreground), vertex error in mm, normal angle in degrees, and
    mask IoU."""

    def eval_fn(model: DensePredictor, batch, rng: jax.Array):
        del rng
        pred, m = model(batch["image"]), batch["mask"]
        mean_uv = jnp.sum(batch["uv"] * m[..., None], axis=(0, 1, 2)) / (jnp.sum(m) + 1e-6)
        nrm = pred["nrm"] / jnp.maximum(jnp.linalg.norm(pred["nrm"], axis=-1, keepdims=True), 1e-6)
        cos = jnp.clip(jnp.sum(nrm * batch["nrm"], -1, keepdims=True), -1.0, 1.0)
        hit = (pred["mask_logits"][..., 0] > 0).astype(jnp.float32)
        inter, union = jnp.sum(hit * m), jnp.sum(jnp.maximum(hit, m))
        return {
            "uv_l1": _masked_mean(jnp.abs(pred["uv"] - batch["uv"]), m),
            "baseline_uv_l1": _masked_mean(jnp.abs(mean_uv - batch["uv"]), m),
            "vtx_l1_mm": 1000.0 * _masked_mean(jnp.abs(pred["vtx"] - batch["vtx"]), m),
            "nrm_deg": _masked_mean(jnp.degrees(jnp.arccos(cos)), m),
            "mask_iou": inter / (union + 1e-6),
        }

    return eval_fn


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, s, n_kpts = cfg.data.batch_size, cfg.data.image_size, cfg.data.landmarks
    f32 = jnp.float32
    return {
        "image": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "mask": jax.ShapeDtypeStruct((b, s, s), f32),
        "uv": jax.ShapeDtypeStruct((b, s, s, 2), f32),
        "vtx": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "nrm": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "kpts": jax.ShapeDtypeStruct((b, n_kpts, 2), f32),
        "kpts_visible": jax.ShapeDtypeStruct((b, n_kpts), f32),
        "view": jax.ShapeDtypeStruct((b,), jnp.int32),
    }


make_data = CaptureData(transforms.dense_example)

# name, sharding rule table, model, loss, data, batch spec (see fica_jax/train/stage.py).
STAGE = Stage("dense", "vit", make_model, make_loss, make_data, batch_spec, make_eval=make_eval)
