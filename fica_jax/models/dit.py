"""DiT with ControlMLP: FiCA's texture/geometry completion network (paper s.2.2; docs/architecture.md §2).

A latent DiT (Peebles & Xie, facebookresearch/DiT) with Pippo's ControlMLP, a light ControlNet:

  x [B, H, W, C] --pixel-unshuffle(p)--> linear (C p^2 -> D) --LayerNorm--> + 2D sin-cos pos
  c = t_emb(t) + image_proj(image_emb) + domain_emb(domain)        # [B, D], adaLN conditioning
  control [B, H, W, Cc] --ControlMLP--> h [B, N, D]                # tokens on the same grid
  depth x adaLN-Zero block i (attention + MLP), block i's MLP branch += ZeroControl_i(h, t_ctrl)
  final adaLN LayerNorm -> zero linear (D -> p^2 C) -> pixel-shuffle(p) -> velocity [B, H, W, C]

FiCA inputs [I]: `image_emb` is the CLIP image embedding; `domain` is the paper's domain switcher
(0 texture, 1 geometry, a learned embedding added to c); `control` holds the partial UV maps
[RGB, mask, normal, vertex] brought to latent resolution. Classifier-free guidance: where `drop`
is set, the image embedding is replaced by a learned null embedding and every ZeroControl output
by a learned null token (both zero-initialised).

The adaLN modulations, the final layer and the ZeroControl projections are zero-initialised
(adaLN-Zero), so a fresh model outputs exactly 0 and its control branch contributes exactly 0.
Blocks are stacked on a `LAYERS` axis with `nnx.vmap` and run with `nnx.scan` (one block is
compiled whatever the depth), optionally rematerialised by policy. Residual stream, norms and
modulation run in float32; matmuls run in the compute dtype `dtype`; params are `param_dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.models import layers
from fica_jax.models import remat as remat_lib

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture. `control_channels=0` builds a plain DiT (no ControlMLP)."""

    width: int = 1152
    depth: int = 28
    heads: int = 16
    patch: int = 2
    in_channels: int = 16  # latent channels C (FiCA: 32x32x16)
    mlp_ratio: float = 4.0
    image_emb_dim: int = 768  # CLIP ViT-L/14 projected embedding
    control_channels: int = 64  # Cc of the control map at latent resolution; 0: no control
    # Also concatenate the control to the noisy latent's channels before the patch embedding (as
    # inpainting diffusion models feed the masked image): every token sees what the portrait
    # showed of its patch from the first step, beside the ControlMLP's zero-initialised path.
    # Dropped with the other conditions (zeros) where `drop` is set.
    control_concat: bool = False
    num_domains: int = 2  # 0 texture, 1 geometry
    qk_norm: bool = True  # Pippo's per-head QK-norm
    freq_dim: int = 256  # timestep sinusoid size
    learned_pos: bool = False  # learnable position embedding (initialised to sin-cos)
    grid: int = 16  # token grid side; only used to size a learned position embedding
    remat: str = "none"  # per-block policy name (fica_jax.models.remat.REMAT_NAMES)


VARIANTS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(width=64, depth=2, heads=4, image_emb_dim=32, control_channels=8),
    "B": DiTConfig(width=768, depth=12, heads=12),
    "XL": DiTConfig(width=1152, depth=28, heads=16, control_channels=0),
    "paper": DiTConfig(width=1792, depth=28, heads=28),
}


# ----------------------------------------------------------------------------- embeddings
def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """DiT's sinusoid [cos, sin]. t: [B] float (network time, 0..1000) -> [B, dim] f32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=f32) / half)
    args = t.astype(f32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_2d(dim: int, gh: int, gw: int) -> np.ndarray:
    """DiT's fixed 2D sin-cos embedding, tokens row-major. -> [gh * gw, dim] float32.

    As in DiT (MAE), the first half of the features encodes the column, the second the row;
    each half is [sin, cos] of position x 1 / 10000^(k / (dim / 4)).
    """
    if dim % 4:
        raise ValueError(f"width {dim} must be divisible by 4 for the 2D sin-cos embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    cols, rows = np.meshgrid(np.arange(gw), np.arange(gh))  # [gh, gw] each

    def one(pos):
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one(cols), one(rows)], axis=1).astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale) + shift


def modulation(linear: nnx.Linear, c: jax.Array, n: int, dtype) -> list[jax.Array]:
    """`linear(c)` split into n f32 vectors [B, 1, D] (shift/scale/gate), batch-sharded only.

    The explicit layout is more than tidiness: without it XLA's SPMD partitioner (jax 0.10.2,
    CPU, data x fsdp x tensor mesh) silently swapped batch rows of `x + gate * attn(...)`;
    tests/stages/test_dit.py::test_sharding_annotations_and_sharded_forward catches that.
    """
    mod = shd.constrain(linear(c.astype(dtype)).astype(f32), shd.BATCH, None)
    return jnp.split(mod[:, None], n, axis=-1)


def _residual(y: jax.Array) -> jax.Array:
    """A block branch's output [B, N, D] in f32, laid out like the residual stream."""
    return shd.constrain(y.astype(f32), shd.BATCH, shd.LENGTH, shd.EMBED)


class TimestepEmbedder(nnx.Module):
    """t [B] -> [B, D]: sinusoid(256) -> Linear -> SiLU -> Linear (DiT: normal(0.02) init)."""

    def __init__(self, dim: int, freq_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, kernel_init=_NORMAL)
        self.freq_dim = freq_dim
        self.fc1 = layers.linear(freq_dim, dim, (None, shd.EMBED), **kw)
        self.fc2 = layers.linear(dim, dim, (shd.MLP, shd.EMBED), **kw)

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fc2(nnx.silu(self.fc1(timestep_embedding(t, self.freq_dim)))).astype(f32)


_NORMAL = nnx.initializers.normal(0.02)


# ----------------------------------------------------------------------------- control
class ControlMLP(nnx.Module):
    """Control map -> tokens on the DiT's patch grid. [B, H, W, Cc] -> [B, (H/p)(W/p), D].

    conv3x3 (Cc -> D), SiLU, conv (D -> 2D, stride p = the DiT patch: with patch 2 the paper's
    stride-2 3x3 conv; kernel max(3, p) so no pixel is skipped), SiLU, conv1x1 (2D -> D),
    LayerNorm (no affine). The ZeroControl blocks read these tokens.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, p = cfg.width, cfg.patch
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.conv_in = layers.conv(cfg.control_channels, d, 3, **kw)
        self.conv_down = layers.conv(d, 2 * d, max(3, p), stride=p, **kw)
        self.conv_out = layers.conv(2 * d, d, 1, **kw)
        self.norm = layers.layer_norm(d, rngs=rngs, affine=False)
        self.dtype = dtype

    def __call__(self, control: jax.Array) -> jax.Array:
        # Every conv output is pinned batch-sharded, channels replicated (FSDP: the kernels are
        # gathered, the activations never split over channels), as in fica_jax/models/vae.py.
        # Left to itself, XLA's partitioner (jax 0.10.2) follows the fsdp-sharded output
        # channels and then gathers the *global* batch to compute the stride-2 conv's weight
        # gradient on every device ("involuntary full rematerialization"): 42% of the paper
        # step's FLOPs on a data=8 x fsdp=8 mesh before this pin (`fica plan`, docs §9-§10).
        pin = lambda h: shd.constrain(h, shd.BATCH, None, None, None)
        h = nnx.silu(pin(self.conv_in(pin(control.astype(self.dtype)))))
        h = nnx.silu(pin(self.conv_down(h)))
        h = pin(self.conv_out(h))
        b, gh, gw, d = h.shape
        return self.norm(h.reshape(b, gh * gw, d))  # f32


class ZeroControl(nnx.Module):
    """One per DiT block: `shift, scale = zero_linear(SiLU(t_ctrl))`,
    `out = zero_linear(h * (1 + scale) + shift)`; a learned null token replaces `out` where
    `drop`. h: [B, N, D] f32, t_ctrl: [B, D] f32 (already SiLU'd), drop: [B] bool -> [B, N, D].
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, zero_init=True)
        self.mod = layers.linear(dim, 2 * dim, (shd.EMBED, shd.MLP), **kw)
        self.proj = layers.linear(dim, dim, (shd.MLP, shd.EMBED), **kw)
        self.null = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=(shd.NORM,))
        self.dtype = dtype

    def __call__(self, h: jax.Array, t_ctrl: jax.Array, drop: jax.Array) -> jax.Array:
        shift, scale = modulation(self.mod, t_ctrl, 2, self.dtype)
        out = _residual(self.proj(modulate(h, shift, scale).astype(self.dtype)))
        return jnp.where(drop[:, None, None], self.null[...].astype(f32), out)


# ----------------------------------------------------------------------------- blocks
class DiTBlock(nnx.Module):
    """adaLN-Zero block (+ its ZeroControl when the model has a ControlMLP).

    x: [B, N, D] f32 residual; c: [B, D] f32 (SiLU'd conditioning); h, t_ctrl, drop: control
    tokens / SiLU'd control timestep / CFG mask, or None without control -> [B, N, D] f32.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.layer_norm(d, rngs=rngs, affine=False)
        self.attn = layers.Attention(d, cfg.heads, qk_norm=cfg.qk_norm, **kw)
        self.norm2 = layers.layer_norm(d, rngs=rngs, affine=False)
        gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)
        self.mlp = layers.Mlp(d, int(d * cfg.mlp_ratio), act=gelu_tanh, **kw)
        self.ada = layers.linear(d, 6 * d, (shd.EMBED, shd.MLP), zero_init=True, **kw)
        self.control = ZeroControl(d, **kw) if cfg.control_channels else None
        self.dtype = dtype

    def __call__(self, x, c, h=None, t_ctrl=None, drop=None) -> jax.Array:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation(self.ada, c, 6, self.dtype)
        y = modulate(self.norm1(x), shift_a, scale_a).astype(self.dtype)
        x = x + gate_a * _residual(self.attn(y))
        y = modulate(self.norm2(x), shift_m, scale_m).astype(self.dtype)
        x = x + gate_m * _residual(self.mlp(y))
        if self.control is not None:
            x = x + self.control(h, t_ctrl, drop)
        return shd.constrain(x, shd.BATCH, shd.LENGTH, shd.EMBED)


class FinalLayer(nnx.Module):
    """adaLN LayerNorm -> zero linear (D -> p^2 C). x [B, N, D], c [B, D] -> [B, N, p^2 C]."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, out = cfg.width, cfg.patch**2 * cfg.in_channels
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, zero_init=True)
        self.norm = layers.layer_norm(d, rngs=rngs, affine=False)
        self.ada = layers.linear(d, 2 * d, (shd.EMBED, shd.MLP), **kw)
        self.linear = layers.linear(d, out, (shd.EMBED, None), **kw)
        self.dtype = dtype

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = modulation(self.ada, c, 2, self.dtype)
        return self.linear(modulate(self.norm(x), shift, scale).astype(self.dtype)).astype(f32)


# ----------------------------------------------------------------------------- model
class DiT(nnx.Module):
    """Velocity network F(x_t, t, image_emb, domain, control, drop) -> v (FiCA eq. L_diffusion).

    x:         [B, H, W, C]  noisy latent (FiCA: 32x32x16), H, W divisible by the patch
    t:         [B]           network time in [0, 1000] (flow time s x 1000)
    image_emb: [B, E]        CLIP image embedding
    domain:    [B] int       0 texture, 1 geometry
    control:   [B, H, W, Cc] partial UV maps at latent resolution (ignored without ControlMLP)
    drop:      [B] bool      classifier-free-guidance drop mask (None: keep all conditions)
    returns    [B, H, W, C]  float32 velocity
    """

    def __init__(
        self,
        cfg: DiTConfig,
        *,
        rngs: nnx.Rngs,
        dtype=f32,
        param_dtype=f32,
    ):
        remat_lib.policy(cfg.remat)  # an unknown policy name fails here, not at the first call
        self.cfg, self.dtype = cfg, dtype
        d = cfg.width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        cin = cfg.in_channels + (cfg.control_channels if cfg.control_concat else 0)
        self.patch_embed = layers.linear(cfg.patch**2 * cin, d, (None, shd.EMBED), **kw)
        self.patch_norm = layers.layer_norm(d, rngs=rngs, affine=False)
        if cfg.learned_pos:
            pos = jnp.asarray(sincos_2d(d, cfg.grid, cfg.grid), param_dtype)
            self.pos = nnx.Param(pos, out_sharding=(None, shd.EMBED))
        self.t_embed = TimestepEmbedder(d, cfg.freq_dim, **kw)
        self.image_proj = layers.linear(cfg.image_emb_dim, d, (None, shd.EMBED), **kw)
        self.image_null = nnx.Param(jnp.zeros((d,), param_dtype), out_sharding=(shd.EMBED,))
        self.domain_embed = nnx.Embed(
            cfg.num_domains,
            d,
            embedding_init=nnx.with_partitioning(_NORMAL, (None, shd.EMBED)),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        if cfg.control_channels:
            self.control_mlp = ControlMLP(cfg, **kw)
            self.control_t_embed = TimestepEmbedder(d, cfg.freq_dim, **kw)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: shd.LAYERS})
        def make_blocks(rngs):
            return DiTBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.blocks = make_blocks(rngs)
        self.final = FinalLayer(cfg, **kw)

    def _pos_embed(self, gh: int, gw: int) -> jax.Array:
        if self.cfg.learned_pos:
            if gh * gw != self.pos.shape[0]:
                raise ValueError(f"learned position embedding is for a {self.cfg.grid}^2 grid")
            return self.pos[...].astype(f32)
        return jnp.asarray(sincos_2d(self.cfg.width, gh, gw))

    def __call__(self, x, t, image_emb, domain, control=None, drop=None) -> jax.Array:
        b, hh, ww, _ = x.shape
        p = self.cfg.patch
        tokens, ctx = self.embed(x, t, image_emb, domain, control, drop)
        out = self.final(layers.scan_blocks(self.blocks, tokens, self.cfg.remat, *ctx), ctx[0])
        return layers.pixel_shuffle(out.reshape(b, hh // p, ww // p, -1), p)

    def embed(self, x, t, image_emb, domain, control=None, drop=None):
        """Inputs -> (tokens [B, N, D] f32, block context).

        The context is (c,) without control, else (c, h, t_ctrl, drop): c [B, D] the SiLU'd
        adaLN conditioning, h [B, N, D] ControlMLP tokens, t_ctrl [B, D] SiLU'd control time.
        """
        cfg, p = self.cfg, self.cfg.patch
        b, hh, ww, cin = x.shape
        if hh % p or ww % p:
            raise ValueError(f"latent {hh}x{ww} is not divisible by the DiT patch {p}")
        drop = jnp.zeros((b,), bool) if drop is None else drop.astype(bool)
        if cfg.control_concat:
            if control is None:
                raise ValueError("this DiT concatenates its control: pass `control` [B, H, W, Cc]")
            kept = jnp.where(drop[:, None, None, None], 0.0, control.astype(x.dtype))
            x = jnp.concatenate([x, kept], -1)
            cin = x.shape[-1]

        patches = layers.pixel_unshuffle(x, p).reshape(b, -1, p * p * cin).astype(self.dtype)
        tokens = (
            self.patch_norm(self.patch_embed(patches)) + self._pos_embed(hh // p, ww // p)[None]
        )
        tokens = shd.constrain(tokens, shd.BATCH, shd.LENGTH, shd.EMBED)

        img = self.image_proj(image_emb.astype(self.dtype)).astype(f32)
        img = jnp.where(drop[:, None], self.image_null[...].astype(f32), img)
        c = self.t_embed(t) + img + self.domain_embed(domain).astype(f32)
        c = nnx.silu(c)  # every adaLN applies SiLU first (DiT); done once here

        if not cfg.control_channels:
            return tokens, (c,)
        if control is None:
            raise ValueError("this DiT has a ControlMLP: pass `control` [B, H, W, Cc]")
        h = shd.constrain(self.control_mlp(control), shd.BATCH, shd.LENGTH, shd.EMBED)
        if h.shape[1] != tokens.shape[1]:
            raise ValueError(f"control {control.shape} does not map onto the {hh}x{ww} latent grid")
        return tokens, (c, h, nnx.silu(self.control_t_embed(t)), drop)


def build(name_or_cfg: str | DiTConfig, *, rngs: nnx.Rngs, **kw) -> DiT:
    """A DiT from a `VARIANTS` name or a `DiTConfig`."""
    cfg = VARIANTS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    return DiT(cfg, rngs=rngs, **kw)
