"""Sapiens-style dense prediction heads (docs/architecture.md §6; FiCA Sec. 2.1, dense correspondences).

Each head takes stride-16 ViT features [B, h, w, D] and predicts a per-pixel map. It follows
Sapiens' `VitHead` (seg/mmseg/models/decode_heads/vit_head.py): three 4x4 stride-2 transposed convs
without bias (x8 in total), each followed by InstanceNorm (no affine, eps 1e-5) + SiLU, optional
1x1 conv + InstanceNorm + SiLU layers, then a final 1x1 conv (`conv_seg`). That brings stride 16
back to stride 2; the last factor 2 to full resolution is a bilinear resize (`final_upsample`),
the same `resize(..., mode='bilinear')` Sapiens applies to its logits before the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.models import layers

_LECUN = nnx.initializers.lecun_normal()


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """torch.nn.InstanceNorm2d (affine=False, no running stats) on NHWC, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.var(x32, axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def conv_transpose_x2(cin: int, cout: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    """4x4 stride-2 transposed conv without bias: [B, H, W, cin] -> [B, 2H, 2W, cout].

    torch `ConvTranspose2d(k=4, s=2, padding=1)` equals a conv of the zero-dilated input padded by
    k - 1 - p = 2 per side with the flipped kernel (`weights.conv_transpose_kernel` flips).
    """
    return nnx.ConvTranspose(
        cin,
        cout,
        kernel_size=(4, 4),
        strides=(2, 2),
        padding=((2, 2), (2, 2)),
        use_bias=False,
        kernel_init=nnx.with_partitioning(_LECUN, (None, None, shd.CONV_IN, shd.CONV_OUT)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class DenseHead(nnx.Module):
    """Stride-16 features [B, h, w, D] -> map [B, h * 8 * up, w * 8 * up, out] (float32).

    Parameter names mirror Sapiens' VitHead: `deconvs[i]` = decode_head.deconv_layers.{3i},
    `convs[i]` = decode_head.conv_layers.{3i}, `final` = decode_head.conv_seg.
    """

    def __init__(
        self,
        din: int,
        out: int,
        *,
        channels: int,
        convs: int = 0,
        final_upsample: int = 2,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.deconvs = nnx.List(
            [conv_transpose_x2(c_in, channels, **kw) for c_in in (din, channels, channels)]
        )
        self.convs = nnx.List([layers.conv(channels, channels, 1, **kw) for _ in range(convs)])
        self.final = layers.conv(channels, out, 1, **kw)
        self.final_upsample = final_upsample

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in (*self.deconvs, *self.convs):
            x = nnx.silu(instance_norm(layer(x)))
            x = shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS)
        y = self.final(x).astype(jnp.float32)
        if self.final_upsample != 1:
            b, h, w, c = y.shape
            f = self.final_upsample
            # Half-pixel-centre bilinear, as torch's interpolate(align_corners=False).
            y = jax.image.resize(y, (b, h * f, w * f, c), "bilinear", antialias=False)
        return y
