"""CLIP image encoder in Flax NNX with Hugging Face checkpoint import (docs/architecture.md §6).

FiCA conditions the diffusion model on the CLIP embedding of the portrait (Sec. 2.2; docs/architecture.md
§2, conditioning). transformers 5 dropped its Flax CLIP, so this is our own port of
`CLIPVisionModelWithProjection`: patch conv (no bias) + class token + learned positions,
`pre_layrnorm`, pre-LN blocks with quick-GELU, pooled = post_layernorm(CLS token), image embedding
= `visual_projection(pooled)` (no bias). It reuses the scanned `Encoder` of `fica_jax.models.vit`
(the same `layers.Attention`/`layers.Mlp`), so a checkpoint's 24 blocks compile as one.
`from_pretrained(local_dir)` reads a local HF directory (CLIPModel or CLIPVisionModel*).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.models import layers, weights
from fica_jax.models.vit import Encoder, resize_pos_embed, torch_leaf

# CLIPImageProcessor defaults (openai/clip-vit-*).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Fields of a transformers `CLIPVisionConfig` (names in comments)."""

    width: int  # hidden_size
    depth: int  # num_hidden_layers
    heads: int  # num_attention_heads
    mlp: int  # intermediate_size
    patch: int  # patch_size
    image_size: int  # image_size (square)
    proj_dim: int  # projection_dim
    eps: float = 1e-5  # layer_norm_eps
    act: str = "quick_gelu"  # hidden_act
    remat: str = "none"  # a policy name from fica_jax.models.remat.REMAT_NAMES

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], source: str = "config.json") -> CLIPConfig:
        """From a CLIPVisionConfig dict, or a CLIPModel config (its `vision_config` plus the
        top-level `projection_dim`, which is the one the projection uses)."""
        d = dict(d)
        proj = d.get("projection_dim")
        if "vision_config" in d:
            d = {**d["vision_config"], **({"projection_dim": proj} if proj else {})}
        act = d.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise UserError(
                f"{source}: hidden_act {act!r} unsupported; expected {list(ACTIVATIONS)}"
            )
        try:
            return cls(
                width=int(d["hidden_size"]),
                depth=int(d["num_hidden_layers"]),
                heads=int(d["num_attention_heads"]),
                mlp=int(d["intermediate_size"]),
                patch=int(d["patch_size"]),
                image_size=int(d["image_size"]),
                proj_dim=int(d.get("projection_dim", 512)),
                eps=float(d.get("layer_norm_eps", 1e-5)),
                act=act,
            )
        except KeyError as e:
            raise UserError(f"{source}: CLIP vision config lacks {e.args[0]!r}") from None


VARIANTS: dict[str, CLIPConfig] = {
    "vit-l/14": CLIPConfig(1024, 24, 16, 4096, patch=14, image_size=224, proj_dim=768),
    "vit-l/14-336": CLIPConfig(1024, 24, 16, 4096, patch=14, image_size=336, proj_dim=768),
    "vit-b/16": CLIPConfig(768, 12, 12, 3072, patch=16, image_size=224, proj_dim=512),
    "vit-b/32": CLIPConfig(768, 12, 12, 3072, patch=32, image_size=224, proj_dim=512),
    "tiny": CLIPConfig(32, 2, 4, 64, patch=4, image_size=16, proj_dim=16),
}


class CLIPVisionEncoder(nnx.Module):
    """Preprocessed images [B, S, S, 3] -> dict(last_hidden_state [B, 1 + (S/p)^2, D] (before
    post_layernorm, as transformers), pooled [B, D], image_embeds [B, proj_dim]); float32."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.cfg, self.dtype = cfg, dtype
        d = cfg.width
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.patch_embed = layers.conv(
            3, d, cfg.patch, stride=cfg.patch, padding="VALID", use_bias=False, dtype=dtype, **kw
        )
        normal = nnx.initializers.normal(0.02)
        self.class_embedding = nnx.Param(
            normal(rngs.params(), (d,), param_dtype), out_sharding=(shd.EMBED,)
        )
        self.pos_embed = nnx.Param(
            normal(rngs.params(), (1 + cfg.grid**2, d), param_dtype), out_sharding=(None, shd.EMBED)
        )
        self.pre_norm = layers.layer_norm(d, eps=cfg.eps, **kw)
        self.encoder = Encoder(
            d,
            cfg.depth,
            cfg.heads,
            cfg.mlp,
            eps=cfg.eps,
            act=ACTIVATIONS[cfg.act],
            remat=cfg.remat,
            dtype=dtype,
            **kw,
        )
        self.post_norm = layers.layer_norm(d, eps=cfg.eps, **kw)
        self.proj = layers.linear(
            d, cfg.proj_dim, (shd.EMBED, None), use_bias=False, dtype=dtype, **kw
        )

    def __call__(self, pixels: jax.Array) -> dict[str, jax.Array]:
        pixels = shd.constrain(pixels, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS)
        t = self.patch_embed(pixels).astype(jnp.float32)  # [B, h, w, D]
        b, h, w, d = t.shape
        pos = self.pos_embed[...].astype(jnp.float32)
        # Inputs of another size get bicubically resized positions (transformers'
        # interpolate_pos_encoding; jax's bicubic kernel differs slightly from torch's).
        patch_pos = resize_pos_embed(pos[1:], (self.cfg.grid, self.cfg.grid), (h, w))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(jnp.float32) + pos[0], (b, 1, d))
        x = jnp.concatenate([cls, t.reshape(b, h * w, d) + patch_pos[None]], axis=1)
        x = self.pre_norm(shd.constrain(x, shd.BATCH, shd.LENGTH, shd.EMBED))
        last = self.encoder(x)
        pooled = self.post_norm(last[:, 0])
        return {
            "last_hidden_state": last,
            "pooled": pooled,
            "image_embeds": self.proj(pooled).astype(jnp.float32),
        }


def preprocess(images: jax.Array, size: int = 224) -> jax.Array:
    """Images [B, H, W, 3] in [0, 1] -> CLIP input [B, size, size, 3].

    As CLIPImageProcessor: bicubic resize of the shorter side to `size` (antialiased, like
    PIL), centre crop, then (x - mean) / std with CLIP's statistics.
    """
    b, h, w, c = images.shape
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    x = jax.image.resize(images.astype(jnp.float32), (b, nh, nw, c), "bicubic", antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top : top + size, left : left + size]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# ----------------------------------------------------------------------------- HF import
_BLOCK = {
    "self_attn.q_proj": ("attn", "q"),
    "self_attn.k_proj": ("attn", "k"),
    "self_attn.v_proj": ("attn", "v"),
    "self_attn.out_proj": ("attn", "out"),
    "layer_norm1": ("ln1",),
    "layer_norm2": ("ln2",),
    "mlp.fc1": ("mlp", "fc1"),
    "mlp.fc2": ("mlp", "fc2"),
}
_TOP = {
    "vision_model.pre_layrnorm": ("pre_norm",),
    "vision_model.post_layernorm": ("post_norm",),
    "visual_projection": ("proj",),
    "vision_model.embeddings.patch_embedding": ("patch_embed",),
}
# Parts of a full CLIPModel checkpoint the image encoder does not use.
_IGNORED = (
    "text_model.",
    "text_projection.",
    "logit_scale",
    "vision_model.embeddings.position_ids",
)


def hf_to_nnx(
    state_dict: Mapping[str, np.ndarray], cfg: CLIPConfig
) -> tuple[dict[tuple, np.ndarray], list[str]]:
    """transformers CLIP(Vision)Model keys -> ({nnx path: array}, unmapped keys)."""
    flat, per_layer, unmapped = {}, {}, []
    for key, arr in state_dict.items():
        arr = np.asarray(arr)
        if key.startswith(_IGNORED):
            continue
        if key == "vision_model.embeddings.class_embedding":
            flat[("class_embedding",)] = arr
        elif key == "vision_model.embeddings.position_embedding.weight":
            flat[("pos_embed",)] = arr  # an nn.Embedding table [N, D]: no transpose
        elif (mod := key.rsplit(".", 1)[0]) in _TOP:
            path, a = torch_leaf(_TOP[mod], key.rsplit(".", 1)[1], arr)
            flat[path] = a
        elif m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in _BLOCK:
                unmapped.append(key)
                continue
            path, a = torch_leaf(("encoder", "blocks", *_BLOCK[m[2]]), m[3], arr)
            per_layer[(path, int(m[1]))] = a
        else:
            unmapped.append(key)
    stacked, problems = weights.stack_layers(per_layer, cfg.depth)
    return flat | stacked, unmapped + problems


def load_hf(
    model: CLIPVisionEncoder, source: str | Path | Mapping[str, np.ndarray], *, strict: bool = True
) -> weights.KeyReport:
    """Copies a transformers CLIP checkpoint (path or state dict) into `model` in place."""
    what = "state dict" if isinstance(source, Mapping) else str(source)
    sd = dict(source) if isinstance(source, Mapping) else weights.load_state_dict(source)
    arrays, unmapped = hf_to_nnx(sd, model.cfg)
    return weights.assign(
        model, arrays, strict=strict, what=f"CLIP {model.cfg} from {what}", unexpected=unmapped
    )


def from_pretrained(
    local_dir: str | Path, *, dtype=None, param_dtype=jnp.float32, remat: str = "none"
) -> CLIPVisionEncoder:
    """A CLIPVisionEncoder from a local Hugging Face directory (config.json + safetensors), e.g. a
    snapshot of openai/clip-vit-large-patch14. Nothing is downloaded."""
    p = Path(local_dir).expanduser()
    if not p.is_dir():
        raise UserError(
            f"CLIP checkpoint {p} is not a directory; expected a local Hugging Face checkpoint "
            "directory with config.json and *.safetensors"
        )
    cfg = dataclasses.replace(
        CLIPConfig.from_hf(weights.read_config(p), str(p / "config.json")), remat=remat
    )
    model = nnx.eval_shape(
        lambda: CLIPVisionEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
    )
    # Materialise zeros (cheap) instead of a random init, then overwrite every parameter.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    model = nnx.merge(graphdef, state)
    load_hf(model, p)
    return model
