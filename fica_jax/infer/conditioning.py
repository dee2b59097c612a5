"""Portrait -> FiCA conditioning (paper Sec. 2.1): an image embedding and the partial UV maps.

The fine-tuned dense predictor gives per-pixel UV coordinates, vertex positions, normals and a
foreground mask; the portrait's pixels are unwrapped into UV space with
`fica_jax.geometry.unwrap.unwrap_partial` (the generator's rule for the ground truth), giving
`[UV_RGB (3), UV_mask (1), UV_nrm (3), UV_vtx (3)]` (`data_pipelines.schema.PARTIAL_UV_CHANNELS`).

The image embedding is CLIP's projected embedding when CLIP weights are given. Without them (the
tiny demo, or a lab without the weights), the mean-pooled final tokens of the trained dense ViT
serve as the embedding; `Conditioning.embedding` always says which one was used, and every report
built from it must print that.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fica_jax.geometry.unwrap import unwrap_partial
from fica_jax.models import clip as clip_lib
from fica_jax.models.vit import DensePredictor


@dataclasses.dataclass(frozen=True)
class Conditioning:
    partial_uv: jax.Array  # [B, R, R, 10]
    image_emb: jax.Array  # [B, E]
    embedding: str  # "clip" or "dense-vit-pooled"
    dense: dict[str, jax.Array]  # the dense predictor's maps [B, H, W, C] (mask as probability)


def predict_dense(model: DensePredictor, images: jax.Array) -> dict[str, jax.Array]:
    """images [B, H, W, 3] in [0, 1] -> uv [B,H,W,2] in [0,1], vtx, unit nrm, mask prob [B,H,W]."""
    out = model(images)
    nrm = out["nrm"] / jnp.maximum(jnp.linalg.norm(out["nrm"], axis=-1, keepdims=True), 1e-6)
    return {
        "uv": jnp.clip(out["uv"], 0.0, 1.0),
        "vtx": out["vtx"],
        "nrm": nrm,
        "mask": jax.nn.sigmoid(out["mask_logits"][..., 0]),
        "pooled": out["pooled"],
    }


def unwrap_batch(images: jax.Array, dense: dict[str, jax.Array], resolution: int) -> jax.Array:
    """Unwraps each portrait's foreground pixels (mask prob > 0.5) into [B, R, R, 10]."""
    fn = lambda img, m, uv, n, v: unwrap_partial(img, m > 0.5, uv, n, v, resolution)
    return jax.vmap(fn)(images, dense["mask"], dense["uv"], dense["nrm"], dense["vtx"])


@nnx.jit
def embed_clip(images: jax.Array, clip_model: clip_lib.CLIPVisionEncoder) -> jax.Array:
    """images [B, H, W, 3] in [0, 1] -> CLIP image embeddings [B, E]."""
    return clip_model(clip_lib.preprocess(images, clip_model.cfg.image_size))["image_embeds"]


# Defined once at module level: nnx.jit caches the trace by function identity (a jit built
# inside `condition` would re-trace on every call).
@nnx.jit(static_argnums=(2,))
def _run(dense_model, images, resolution, clip_model):
    dense = predict_dense(dense_model, images)
    partial = unwrap_batch(images, dense, resolution)
    if clip_model is not None:
        emb = embed_clip(images, clip_model)
    else:
        emb = dense["pooled"]
    return partial, emb, dense


def condition(
    images: jax.Array,  # [B, H, W, 3] in [0, 1]
    dense_model: DensePredictor,
    uv_resolution: int,
    clip_model: clip_lib.CLIPVisionEncoder | None = None,
) -> Conditioning:
    """Runs the dense predictor (+ CLIP when given) and unwraps the portraits into UV space."""
    partial, emb, dense = _run(dense_model, images, uv_resolution, clip_model)
    return Conditioning(
        partial_uv=partial,
        image_emb=emb,
        embedding="clip" if clip_model is not None else "dense-vit-pooled",
        dense=dense,
    )
