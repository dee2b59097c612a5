"""SDXL AutoencoderKL in Flax NNX, numerically equal to `diffusers.AutoencoderKL` (docs/architecture.md §1).

FiCA runs its diffusion model in the latent space of the SDXL VAE: UV texture and geometry maps
in [-1, 1] are encoded to 4-channel latents at 1/8 resolution (`z = posterior.sample() *
0.13025`) and decoded back with `decode(z / 0.13025)`. diffusers dropped its Flax VAE, so this is
our own port; `fica_jax.models.vae_import.from_pretrained` imports the public diffusers
safetensors checkpoints and the tests prove parity with the PyTorch module.

Structure (names follow diffusers so the checkpoint key map stays a few renames):
  encoder: conv_in -> down_blocks[i] (resnets x L, stride-2 downsampler except the last)
           -> mid_block (resnet, single-head self-attention, resnet) -> GroupNorm, SiLU, conv_out
  quant_conv (1x1, 2*latent) -> DiagonalGaussian(mean, logvar)
  post_quant_conv (1x1) -> decoder: conv_in -> mid_block -> up_blocks[i] (resnets x (L+1),
           nearest x2 + conv except the last) -> GroupNorm, SiLU, conv_out

Arrays are NHWC. GroupNorm and the attention softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.models import layers
from fica_jax.models import remat as remat_lib

Array = jax.Array


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters; defaults are SDXL's (stabilityai/sdxl-vae config.json).

    remat: a policy name from `fica_jax.models.remat.REMAT_NAMES` ("none", "full",
    "dots_saveable", ...) under which each resnet block is recomputed in the backward pass
    (gradient checkpointing); "full" trades ~30% more compute for not storing the block's
    activations (large at 512-1024 px).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    latent_channels: int = 4
    scaling_factor: float = 0.13025
    shift_factor: float = 0.0  # SDXL has none; SD3/Flux VAEs do
    mid_block_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    remat: str = "none"  # a policy name from fica_jax.models.remat.REMAT_NAMES

    @property
    def spatial_factor(self) -> int:
        """Image pixels per latent pixel along each axis (8 for SDXL)."""
        return 2 ** (len(self.block_out_channels) - 1)


VARIANTS: dict[str, VAEConfig] = {
    # 83.65M parameters; 512x512x3 image <-> 64x64x4 latent.
    "sdxl": VAEConfig(),
    # Same block structure at toy width (tests, CPU demo); spatial factor 2.
    "tiny": VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_groups=8),
}


# ----------------------------------------------------------------------------- posterior
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)); mean/logvar: [B, h, w, latent] float32."""

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussian:
        """moments: [B, h, w, 2*latent] -> posterior; logvar clipped to [-30, 20] as diffusers."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: Array) -> Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Array:
        """KL(self || other), other defaulting to N(0, 1); summed over (h, w, c) -> [B]."""
        if other is None:
            kl = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            kl = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * jnp.sum(kl, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- blocks
def _constrain(x: Array) -> Array:
    # Activations stay batch-sharded (FSDP: weights are gathered, never the activations split
    # over channels); a no-op outside `sharding.axis_rules` + a mesh.
    return shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS)


def _conv(conv: nnx.Conv, x: Array) -> Array:
    """Runs `conv` with batch-sharded, channel-replicated input and output.

    Pinning both sides is also a workaround: left free, the partitioner (jax 0.10.2, CPU, both
    Shardy and GSPMD) may shard a 3x3 conv's input and output channels over `tensor` on a
    (data, fsdp, tensor) mesh, and that layout computes wrong values for the batch shards whose
    data and fsdp indices differ (tests/models/test_vae.py::test_sharded_params_and_forward_on_mesh).
    """
    return _constrain(conv(_constrain(x)))


def _conv3(cin: int, cout: int, *, rngs: nnx.Rngs, dtype, stride: int = 1, padding=1):
    return layers.conv(cin, cout, 3, stride=stride, padding=padding, rngs=rngs, dtype=dtype)


class ResnetBlock(nnx.Module):
    """GroupNorm-SiLU-conv3x3 twice plus a (1x1-projected) shortcut. x: [B,H,W,cin] -> cout."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, dtype):
        self.norm1 = layers.group_norm(cin, groups=groups, eps=1e-6, rngs=rngs)
        self.conv1 = _conv3(cin, cout, rngs=rngs, dtype=dtype)
        self.norm2 = layers.group_norm(cout, groups=groups, eps=1e-6, rngs=rngs)
        self.conv2 = _conv3(cout, cout, rngs=rngs, dtype=dtype)
        self.conv_shortcut = (
            layers.conv(cin, cout, 1, padding=0, rngs=rngs, dtype=dtype) if cin != cout else None
        )

    def __call__(self, x: Array) -> Array:
        h = _conv(self.conv1, nnx.silu(self.norm1(x)))
        h = _conv(self.conv2, nnx.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = _conv(self.conv_shortcut, x)
        return _constrain(x + h)


def _resnet(block: ResnetBlock, x: Array, remat: remat_lib.Remat) -> Array:
    # nnx.remat (under the named policy) lifts the module's variables through jax.checkpoint.
    return remat_lib.wrap(lambda m, y: m(y), remat)(block, x)


class Downsample(nnx.Module):
    """diffusers' Downsample2D(padding=0): zero-pad bottom/right by one, stride-2 conv3x3."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype):
        self.conv = _conv3(c, c, stride=2, padding=0, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
        return _conv(self.conv, jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour x2 then conv3x3. [B, H, W, C] -> [B, 2H, 2W, C]."""

    def __init__(self, c: int, *, rngs: nnx.Rngs, dtype):
        self.conv = _conv3(c, c, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return _conv(self.conv, jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class MidAttention(nnx.Module):
    """Single-head spatial self-attention with GroupNorm and residual (diffusers `Attention`
    built from the deprecated attention block: heads = channels // channels = 1)."""

    def __init__(self, c: int, groups: int, *, rngs: nnx.Rngs, dtype):
        self.norm = layers.group_norm(c, groups=groups, eps=1e-6, rngs=rngs)
        self.attn = layers.Attention(c, 1, rngs=rngs, qkv_bias=True, dtype=dtype)

    def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> same
        b, h, w, c = x.shape
        y = self.attn(self.norm(x).reshape(b, h * w, c))
        return _constrain(x + y.reshape(b, h, w, c).astype(x.dtype))


class MidBlock(nnx.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, c: int, groups: int, attention: bool, *, rngs: nnx.Rngs, dtype):
        self.resnets = nnx.List(
            [ResnetBlock(c, c, groups, rngs=rngs, dtype=dtype) for _ in range(2)]
        )
        self.attention = MidAttention(c, groups, rngs=rngs, dtype=dtype) if attention else None

    def __call__(self, x: Array, remat: remat_lib.Remat) -> Array:
        x = _resnet(self.resnets[0], x, remat)
        if self.attention is not None:
            x = self.attention(x)
        return _resnet(self.resnets[1], x, remat)


class ResnetStack(nnx.Module):
    """n resnet blocks then an optional resampler: diffusers' DownEncoderBlock2D (with a
    Downsample) and UpDecoderBlock2D (with an Upsample). [B, H, W, cin] -> [B, H', W', cout]."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, resample, *, rngs, dtype):
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs, dtype=dtype)
             for i in range(n)]
        )  # fmt: skip
        self.resample = resample(cout, rngs=rngs, dtype=dtype) if resample else None

    def __call__(self, x: Array, remat: remat_lib.Remat) -> Array:
        for r in self.resnets:
            x = _resnet(r, x, remat)
        return x if self.resample is None else self.resample(x)


class Encoder(nnx.Module):
    """[B, H, W, in_channels] -> moments [B, H/f, W/f, 2*latent] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype):
        ch, g, n = cfg.block_out_channels, cfg.norm_groups, len(cfg.block_out_channels)
        self.remat = cfg.remat
        self.conv_in = _conv3(cfg.in_channels, ch[0], rngs=rngs, dtype=dtype)
        self.down_blocks = nnx.List(
            [ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g,
                         Downsample if i < n - 1 else None, rngs=rngs, dtype=dtype)
             for i in range(n)]
        )  # fmt: skip
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_attention, rngs=rngs, dtype=dtype)
        self.conv_norm_out = layers.group_norm(ch[-1], groups=g, eps=1e-6, rngs=rngs)
        self.conv_out = _conv3(ch[-1], 2 * cfg.latent_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        x = _conv(self.conv_in, x)
        for blk in self.down_blocks:
            x = blk(x, self.remat)
        x = self.mid_block(x, self.remat)
        return _conv(self.conv_out, nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """latent [B, h, w, latent] -> image [B, h*f, w*f, out_channels]."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype):
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_groups
        n = len(ch)
        self.remat = cfg.remat
        self.conv_in = _conv3(cfg.latent_channels, ch[0], rngs=rngs, dtype=dtype)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_attention, rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List(
            [ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g,
                         Upsample if i < n - 1 else None, rngs=rngs, dtype=dtype)
             for i in range(n)]
        )  # fmt: skip
        self.conv_norm_out = layers.group_norm(ch[-1], groups=g, eps=1e-6, rngs=rngs)
        self.conv_out = _conv3(ch[-1], cfg.out_channels, rngs=rngs, dtype=dtype)

    def __call__(self, z: Array) -> Array:
        x = _conv(self.conv_in, z)
        x = self.mid_block(x, self.remat)
        for blk in self.up_blocks:
            x = blk(x, self.remat)
        return _conv(self.conv_out, nnx.silu(self.conv_norm_out(x)))


# ----------------------------------------------------------------------------- model
class AutoencoderKL(nnx.Module):
    """SDXL-style KL autoencoder. Images [B, H, W, C] in [-1, 1]; H, W divisible by the factor.

    `dtype` is the compute dtype of convs/projections (e.g. jnp.bfloat16); parameters are
    float32; norms, the posterior, the softmax and the decoded image stay float32.
    Build the paper model with `AutoencoderKL(VARIANTS["sdxl"], rngs=nnx.Rngs(0))`, or load
    weights with `vae_import.from_pretrained(path)`.
    """

    def __init__(self, cfg: VAEConfig = VARIANTS["sdxl"], *, rngs: nnx.Rngs, dtype=jnp.float32):
        if any(c % cfg.norm_groups for c in cfg.block_out_channels):
            raise ValueError(f"block widths {cfg.block_out_channels} vs {cfg.norm_groups} groups")
        remat_lib.policy(cfg.remat)  # an unknown policy name fails here (UserError), not in jit
        self.cfg = cfg
        self.dtype = dtype
        lat = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dtype)
        conv1 = lambda c: layers.conv(c, c, 1, padding=0, rngs=rngs, dtype=dtype)
        self.quant_conv = conv1(2 * lat) if cfg.use_quant_conv else None
        self.post_quant_conv = conv1(lat) if cfg.use_post_quant_conv else None

    def encode(self, x: Array) -> DiagonalGaussian:
        """x: [B, H, W, in_channels] in [-1, 1] -> posterior over [B, H/f, W/f, latent]."""
        f = self.cfg.spatial_factor
        if x.ndim != 4 or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"encode expects [B, H, W, C] with H, W divisible by {f}: {x.shape}")
        m = self.encoder(x)
        if self.quant_conv is not None:
            m = _conv(self.quant_conv, m)
        return DiagonalGaussian.from_moments(m)

    def decode(self, z: Array) -> Array:
        """z: [B, h, w, latent] (unscaled) -> image [B, h*f, w*f, out_channels], float32."""
        if self.post_quant_conv is not None:
            z = _conv(self.post_quant_conv, z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: Array, rng: Array | None = None) -> tuple[Array, DiagonalGaussian]:
        """Reconstruction (from a posterior sample if `rng` is given, else its mean)."""
        post = self.encode(x)
        z = post.mode() if rng is None else post.sample(rng)
        return self.decode(z), post

    def encode_to_latent(self, x: Array, rng: Array | None = None) -> Array:
        """Diffusion latent `(posterior.sample() - shift) * scaling_factor`; mean if rng is None."""
        post = self.encode(x)
        z = post.mode() if rng is None else post.sample(rng)
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def decode_from_latent(self, z: Array) -> Array:
        """Inverse of the latent scaling: `decode(z / scaling_factor + shift)`."""
        return self.decode(z / self.cfg.scaling_factor + self.cfg.shift_factor)
