"""SDXL AutoencoderKL in Flax NNX, numerically equal to `diffusers.AutoencoderKL` (SPECS.md s.1).

FiCA runs its diffusion model in the latent space of the SDXL VAE: UV texture and geometry maps
in [-1, 1] are encoded to 4-channel latents at 1/8 resolution (`z = posterior.sample() *
0.13025`) and decoded back with `decode(z / 0.13025)`. diffusers dropped its Flax VAE, so this is
our own port; `from_pretrained` (bottom of this file) imports the public diffusers safetensors
checkpoints and the tests prove parity with the PyTorch module.

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
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.models import layers
from fica_jax.models.weights import KeyReport

Array = jax.Array


# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL hyper-parameters; defaults are SDXL's (stabilityai/sdxl-vae config.json).

    remat: recompute each resnet block in the backward pass (gradient checkpointing); it trades
    ~30% more compute for not storing the block's activations (large at 512-1024 px).
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
    remat: bool = False

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
    data and fsdp indices differ (tests/test_vae.py::test_sharded_params_and_forward_on_mesh).
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


def _resnet(block: ResnetBlock, x: Array, remat: bool) -> Array:
    # nnx.remat lifts the module's variables through jax.checkpoint (graph-aware transform).
    return nnx.remat(lambda m, y: m(y))(block, x) if remat else block(x)


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

    def __call__(self, x: Array, remat: bool) -> Array:
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

    def __call__(self, x: Array, remat: bool) -> Array:
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
    weights with `from_pretrained(path)`.
    """

    def __init__(self, cfg: VAEConfig = VARIANTS["sdxl"], *, rngs: nnx.Rngs, dtype=jnp.float32):
        if any(c % cfg.norm_groups for c in cfg.block_out_channels):
            raise ValueError(f"block widths {cfg.block_out_channels} vs {cfg.norm_groups} groups")
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


def num_params(model_or_state) -> int:
    """Number of parameter scalars (works on abstract `nnx.eval_shape` models too)."""
    state = model_or_state
    if isinstance(model_or_state, nnx.Module):
        state = nnx.state(model_or_state, nnx.Param)
    return sum(int(jnp.size(v)) for v in jax.tree.leaves(state))


# ----------------------------------------------------------------------------- checkpoints
# A diffusers AutoencoderKL checkpoint is a directory with config.json and this safetensors file
# (the `vae/` folder of an SDXL pipeline, or stabilityai/sdxl-vae itself).
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"

# diffusers name fragments -> ours. The `query/key/value/proj_attn` names are those of diffusers
# < 0.14, which some hub VAE checkpoints still carry (diffusers renames them on load, as we do).
_RENAMES: tuple[tuple[str, str], ...] = (
    (".downsamplers.0.", ".resample."),
    (".upsamplers.0.", ".resample."),
    (".attentions.0.group_norm.", ".attention.norm."),
) + tuple(
    (f".attentions.0.{name}.", f".attention.attn.{ours}.")
    for names, ours in ((("to_q", "query"), "q"), (("to_k", "key"), "k"), (("to_v", "value"), "v"),
                        (("to_out.0", "proj_attn"), "out"))
    for name in names
)  # fmt: skip

# Original CompVis/SGM names (stabilityai's single-file sdxl_vae.safetensors, full SD/SDXL
# checkpoints under `first_stage_model.`) -> diffusers names, as diffusers' single-file loader
# does. LDM's decoder.up.{i} is indexed by resolution level (0 = full resolution) while diffusers'
# up_blocks are in execution order, so up.{i} is up_blocks.{n - 1 - i} (`ldm_to_diffusers_key`).
LDM_PREFIXES = ("first_stage_model.", "vae.")
_LDM_RENAMES: tuple[tuple[str, Any], ...] = (
    (
        r"^(encoder|decoder)\.mid\.block_(\d)\.",
        lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.",
    ),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", r"\1.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.", r"\1.mid_block.attentions.0.to_\2."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", r"\1.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets."),
    (r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0."),
    (r"\.nin_shortcut\.", ".conv_shortcut."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out."),
)


def is_ldm_state_dict(state_dict: Mapping[str, Any]) -> bool:
    return any(re.match(r"^(encoder\.down|decoder\.up|encoder\.mid)\.", k) for k in state_dict)


def ldm_to_diffusers_key(key: str, num_blocks: int) -> str:
    """'decoder.up.3.block.0.nin_shortcut.weight' (n=4) -> 'decoder.up_blocks.0.resnets.0.
    conv_shortcut.weight'."""
    for pattern, repl in _LDM_RENAMES:
        key = re.sub(pattern, repl, key)
    m = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", key)
    if m:
        sub = "resnets." if m[2] == "block" else "upsamplers.0."
        key = f"decoder.up_blocks.{num_blocks - 1 - int(m[1])}.{sub}{m[3]}"
    return key


def torch_key_to_path(key: str) -> tuple[str | int, ...]:
    """'encoder.down_blocks.0.resnets.1.conv1.weight' -> our nnx path (weight -> kernel/scale
    is decided by the target's rank, so the leaf stays 'weight' here)."""
    k = key
    for old, new in _RENAMES:
        k = k.replace(old, new)
    return tuple(int(p) if p.isdigit() else p for p in k.split("."))


def _nnx_path_to_key(path: tuple) -> tuple:
    """Our parameter path with the leaf generalised to torch's 'weight'/'bias'."""
    leaf = {"kernel": "weight", "scale": "weight"}.get(path[-1], path[-1])
    return (*path[:-1], leaf)


def _torch_to_nnx_array(a: np.ndarray, target_ndim: int) -> np.ndarray:
    """Conv [O, I, kh, kw] -> [kh, kw, I, O]; linear [O, I] -> [I, O]; 1x1-conv attention
    projections of original checkpoints [O, I, 1, 1] -> [I, O]; vectors unchanged."""
    if a.ndim == 4 and target_ndim == 2:
        a = a[:, :, 0, 0]
    if a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if a.ndim == 2:
        return a.T
    return a


def match_state_dict(
    model: AutoencoderKL, state_dict: Mapping[str, np.ndarray]
) -> tuple[dict[tuple, np.ndarray], KeyReport]:
    """Maps a diffusers AutoencoderKL state dict onto `model`'s parameters without assigning.

    Returns ({nnx path: array in our layout}, report); the report names the checkpoint's own
    keys. Original-format (LDM) names are recognised. Works on abstract (`nnx.eval_shape`)
    models, and on zero-stride views (`np.broadcast_to`) for shape-only checks.
    """
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    by_key = {_nnx_path_to_key(p): p for p in params}
    missing_keys = set(by_key)
    unexpected, mismatched, assign = [], [], {}
    ldm, n = is_ldm_state_dict(state_dict), len(model.cfg.block_out_channels)
    for key in sorted(state_dict):
        tkey = torch_key_to_path(ldm_to_diffusers_key(key, n) if ldm else key)
        if tkey not in by_key:
            unexpected.append(key)
            continue
        path = by_key[tkey]
        missing_keys.discard(tkey)
        arr = _torch_to_nnx_array(np.asarray(state_dict[key]), len(params[path].shape))
        if tuple(arr.shape) != tuple(params[path].shape):
            mismatched.append(f"{key}: {tuple(arr.shape)} -> {tuple(params[path].shape)}")
            continue
        assign[path] = arr
    missing = sorted("/".join(map(str, by_key[k])) for k in missing_keys)
    return assign, KeyReport(missing, unexpected, mismatched, loaded=len(assign))


def load_torch_state_dict(
    model: AutoencoderKL, state_dict: Mapping[str, np.ndarray], *, strict: bool = True
) -> KeyReport:
    """Copies a diffusers AutoencoderKL state dict (numpy arrays) into `model` in place.

    Every matching tensor is assigned (cast to the parameter dtype); with `strict`, any missing,
    unexpected or shape-mismatched tensor raises a `UserError` carrying the report (and nothing
    is assigned).
    """
    assign, report = match_state_dict(model, state_dict)
    if strict and not report.ok:
        raise UserError(f"checkpoint does not fit AutoencoderKL({model.cfg}): {report}")
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, arr in assign.items():
        params[path].set_value(jnp.asarray(arr, dtype=params[path].dtype))
    return report


def config_from_diffusers(d: Mapping[str, Any], source: str = "config.json") -> VAEConfig:
    """A diffusers AutoencoderKL `config.json` dict -> VAEConfig (refusing other architectures)."""
    name = d.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise UserError(f"{source}: _class_name is {name!r}; expected 'AutoencoderKL'")
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):  # fmt: skip
        bad = [t for t in d.get(key, [want]) if t != want]
        if bad:
            raise UserError(f"{source}: {key} has {bad}; only {want!r} blocks are supported")
    if d.get("act_fn", "silu") != "silu":
        raise UserError(f"{source}: act_fn is {d['act_fn']!r}; expected 'silu'")
    try:
        return VAEConfig(
            in_channels=int(d.get("in_channels", 3)),
            out_channels=int(d.get("out_channels", 3)),
            block_out_channels=tuple(int(c) for c in d["block_out_channels"]),
            layers_per_block=int(d.get("layers_per_block", 1)),
            norm_groups=int(d.get("norm_num_groups", 32)),
            latent_channels=int(d.get("latent_channels", 4)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            shift_factor=float(d.get("shift_factor") or 0.0),
            mid_block_attention=bool(d.get("mid_block_add_attention", True)),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: cannot read the AutoencoderKL config ({e!r})") from None


def _find_checkpoint(path: Path) -> tuple[Path | None, Path]:
    """(config.json or None, weights file) for a checkpoint directory or safetensors file."""
    expected = (
        f"expected a diffusers AutoencoderKL directory holding {CONFIG_NAME} and {WEIGHTS_NAME} "
        "(or a pipeline directory with a vae/ folder), or a .safetensors file"
    )
    if not path.exists():
        raise UserError(f"VAE checkpoint {path} does not exist; {expected}")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"VAE checkpoint {path} is not a .safetensors file; {expected}")
        return None, path
    if not (path / CONFIG_NAME).is_file() and (path / "vae" / CONFIG_NAME).is_file():
        path = path / "vae"
    if not (path / CONFIG_NAME).is_file():
        raise UserError(f"VAE checkpoint directory {path} has no {CONFIG_NAME}; {expected}")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        # Precision variants (`diffusion_pytorch_model.fp16.safetensors`) are fine too.
        variants = sorted(path.glob("diffusion_pytorch_model*.safetensors"))
        if not variants:
            bins = sorted(p.name for p in path.glob("*.bin"))
            hint = f" (found {bins}: re-save with safe_serialization=True)" if bins else ""
            raise UserError(f"VAE checkpoint directory {path} has no {WEIGHTS_NAME}{hint}")
        weights = variants[0]
    return path / CONFIG_NAME, weights


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a VAE file; of a full SD/SDXL checkpoint only the `first_stage_model.`
    (or `vae.`) ones, prefix removed, without reading the rest of the file."""
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            keys = list(f.keys())
            for prefix in LDM_PREFIXES:
                if any(k.startswith(prefix) for k in keys):
                    keys = [k for k in keys if k.startswith(prefix)]
                    return {k[len(prefix) :]: f.get_tensor(k) for k in keys}
            return {k: f.get_tensor(k) for k in keys}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None


def from_pretrained(
    path: str | os.PathLike,
    *,
    cfg: VAEConfig | None = None,
    dtype=jnp.float32,
    remat: bool = False,
) -> AutoencoderKL:
    """Builds an AutoencoderKL from a local diffusers checkpoint (nothing is downloaded).

    path: a directory with config.json + diffusion_pytorch_model.safetensors (or a pipeline
    directory whose vae/ folder has them), or a bare .safetensors file, in which case `cfg`
    (default: the SDXL variant) gives the architecture. Parameters are float32 on the default
    device; reshard with `jax.device_put(nnx.state(m), sharding.param_shardings(...))`.
    Raises `UserError` for a bad path or a checkpoint that does not fit the architecture.
    """
    config_file, weights = _find_checkpoint(Path(path))
    if cfg is None:
        if config_file is None:
            cfg = VARIANTS["sdxl"]
        else:
            try:
                raw = json.loads(config_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{config_file}: not readable JSON ({e})") from None
            cfg = config_from_diffusers(raw, str(config_file))
    cfg = dataclasses.replace(cfg, remat=remat)
    state_dict = read_safetensors(weights)
    # Build abstract shapes only: every parameter is then set from the checkpoint (strict).
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    try:
        load_torch_state_dict(model, state_dict, strict=True)
    except UserError as e:
        raise UserError(f"{weights}: {e}") from None
    # Every variable of the model is a checkpoint parameter; anything still abstract is a bug.
    assert not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))
    return model
