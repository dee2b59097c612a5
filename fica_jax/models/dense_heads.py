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
from flax.nnx.nn import dtypes

from fica_jax import sharding as shd
from fica_jax.models import layers

_DECONV_INIT = nnx.with_partitioning(
    nnx.initializers.lecun_normal(), (None, None, shd.CONV_IN, shd.CONV_OUT)
)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """torch.nn.InstanceNorm2d (affine=False, no running stats) on NHWC, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
    var = jnp.var(x32, axis=(1, 2), keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def upsample_conv_x2(x: jax.Array, kernel: jax.Array, impl: str | None = None) -> jax.Array:
    """`nnx.ConvTranspose(k=4, strides=2, padding=((2, 2), (2, 2)))` in sub-pixel form, exactly.

    x [B, H, W, cin], kernel [4, 4, cin, cout] in nnx.ConvTranspose's (unflipped) layout ->
    [B, 2H, 2W, cout]. The transposed conv is y[o] = sum_k xd[o + k - 2] w[k] over the zero-dilated
    input xd (xd[2i] = x[i]), so per axis output 2m + a only meets taps k = 2t + a (t = 0, 1) at
    x[m - 1 + a + t]. With K[t, a] = w[2t + a] and xp = x padded by 1, one 2x2 VALID conv gives
    z[p, a] = xp[p] K[0, a] + xp[p + 1] K[1, a] on the (H+1, W+1) grid, and y[2m + a] = z[m + a, a]:
    the 4 phases are 4*cout channels of one dense conv (no multiplies by inserted zeros, a quarter
    of the dilated form's work), then a shifted slice per phase and depth-to-space.

    impl: "conv" (lax conv) or "dot" (the same 2x2 conv as im2col + one matmul); default "dot" on
    CPU, where XLA's conv kernel-gradient is slow (benchmarks/dense_step.py), else "conv".
    """
    b, h, w, cin = x.shape
    cout = kernel.shape[-1]
    # [th, a, tw, c, cin, cout] -> [th, tw, cin, cout, a, c] -> [2, 2, cin, cout * 4]: cout stays
    # the major output factor, so a CONV_OUT-sharded kernel stays sharded the same way.
    k = kernel.reshape(2, 2, 2, 2, cin, cout).transpose(0, 2, 4, 5, 1, 3).reshape(2, 2, cin, -1)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    impl = impl or ("dot" if jax.default_backend() == "cpu" else "conv")
    if impl == "dot":
        taps = [xp[:, i : i + h + 1, j : j + w + 1] for i in (0, 1) for j in (0, 1)]
        z = jnp.concatenate(taps, axis=-1) @ k.reshape(4 * cin, 4 * cout)
    elif impl == "conv":
        dims = ("NHWC", "HWIO", "NHWC")
        z = jax.lax.conv_general_dilated(xp, k, (1, 1), "VALID", dimension_numbers=dims)
    else:
        raise ValueError(f"unknown impl {impl!r}; expected 'conv' or 'dot'")
    z = z.reshape(b, h + 1, w + 1, cout, 2, 2)
    rows = [
        jnp.stack([z[:, a : a + h, c : c + w, :, a, c] for c in (0, 1)], axis=3) for a in (0, 1)
    ]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, cout)  # [B, H, a, W, c, cout]


class ConvTransposeX2(nnx.Module):
    """4x4 stride-2 transposed conv without bias: [B, H, W, cin] -> [B, 2H, 2W, cout].

    torch `ConvTranspose2d(k=4, s=2, padding=1)` equals a conv of the zero-dilated input padded by
    k - 1 - p = 2 per side with the flipped kernel (`weights.conv_transpose_kernel` flips). The
    parameter is `nnx.ConvTranspose`'s (`kernel` [4, 4, cin, cout], same init and sharding), so
    checkpoints and Sapiens imports are unchanged; the compute is `upsample_conv_x2`.
    """

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        self.in_features, self.out_features, self.dtype = cin, cout, dtype
        self.kernel = nnx.Param(_DECONV_INIT(rngs.params(), (4, 4, cin, cout), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = dtypes.promote_dtype((x, self.kernel[...]), dtype=self.dtype)
        return upsample_conv_x2(x, kernel)


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
        pixel_channels: int = 0,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.deconvs = nnx.List(
            [ConvTransposeX2(c_in, channels, **kw) for c_in in (din, channels, channels)]
        )
        self.convs = nnx.List([layers.conv(channels, channels, 1, **kw) for _ in range(convs)])
        self.final = layers.conv(channels + pixel_channels, out, 1, **kw)
        self.final_upsample = final_upsample

    def __call__(self, x: jax.Array, pixels: jax.Array | None = None) -> jax.Array:
        """`pixels` [B, H, W, S]: full-resolution features (`PixelBranch`) the final conv also
        reads; the deconv output is first brought to their resolution (bilinear)."""
        for layer in (*self.deconvs, *self.convs):
            x = nnx.silu(instance_norm(layer(x)))
            x = shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS)
        if pixels is not None:
            b, _, _, c = x.shape
            x = jax.image.resize(x, (b, *pixels.shape[1:3], c), "bilinear", antialias=False)
            return self.final(jnp.concatenate([x, pixels.astype(x.dtype)], -1)).astype(jnp.float32)
        y = self.final(x).astype(jnp.float32)
        if self.final_upsample != 1:
            b, h, w, c = y.shape
            f = self.final_upsample
            # Half-pixel-centre bilinear, as torch's interpolate(align_corners=False).
            y = jax.image.resize(y, (b, h * f, w * f, c), "bilinear", antialias=False)
        return y


class PixelBranch(nnx.Module):
    """Full-resolution features for the heads' final convs: a small U-Net on the image (3x3
    convs + SiLU at 1, 1/2 and 1/4 resolution, bilinear up, skips concatenated; receptive field
    ~40 px). Our addition, off in the Sapiens variants: with 8 px patches and a few hundred steps
    the tokens place silhouettes and texel correspondences only to within a patch; the branch
    gives every pixel its own edges, colours and neighbourhood."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        c = channels
        self.down = nnx.List([layers.conv(3, c, 3, **kw), layers.conv(c, 2 * c, 3, stride=2, **kw),
                              layers.conv(2 * c, 2 * c, 3, stride=2, **kw)])  # fmt: skip
        self.mid = layers.conv(2 * c, 2 * c, 3, **kw)
        self.up = nnx.List([layers.conv(4 * c, 2 * c, 3, **kw), layers.conv(3 * c, c, 3, **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        pin = lambda h: shd.constrain(h, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS)
        skips = []
        for conv in self.down:
            x = pin(nnx.silu(conv(x)))
            skips.append(x)
        x = pin(nnx.silu(self.mid(x)))
        for conv, skip in zip(self.up, skips[-2::-1], strict=True):
            b, h, w, _ = skip.shape
            x = jax.image.resize(x, (b, h, w, x.shape[-1]), "bilinear", antialias=False)
            x = pin(nnx.silu(conv(jnp.concatenate([x, skip], -1))))
        return x
