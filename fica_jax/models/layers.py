"""Shared NNX building blocks whose every parameter carries logical sharding names.

Only what several networks use lives here (projections, convs, norms, attention, MLP). Norms and
softmax run in float32 whatever the compute dtype (MaxText convention).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.models import remat as remat_lib

_LECUN = nnx.initializers.lecun_normal()
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


def linear(
    din: int,
    dout: int,
    names: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    zero_init: bool = False,
    kernel_init=None,
    dtype=None,
    param_dtype=jnp.float32,
) -> nnx.Linear:
    """`nnx.Linear` with kernel sharded by `names` (in, out) and bias by `names[1]`."""
    init = _ZEROS if zero_init else (kernel_init or _LECUN)
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(init, names),
        bias_init=nnx.with_partitioning(_ZEROS, (names[1],)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: str | int | tuple = "SAME",
    use_bias: bool = True,
    zero_init: bool = False,
    dtype=None,
    param_dtype=jnp.float32,
) -> nnx.Conv:
    """NHWC `nnx.Conv` with kernel [kh, kw, in, out] sharded as (None, None, CONV_IN, CONV_OUT).

    An int `padding` pads symmetrically (PyTorch's `padding=p`), which differs from 'SAME' for
    strided convs; use it when matching a PyTorch reference.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    init = _ZEROS if zero_init else _LECUN
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(init, (None, None, shd.CONV_IN, shd.CONV_OUT)),
        bias_init=nnx.with_partitioning(_ZEROS, (shd.CONV_OUT,)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def layer_norm(
    dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, affine: bool = True, param_dtype=jnp.float32
) -> nnx.LayerNorm:
    """LayerNorm computed in float32 (its output is cast back by the caller's next layer)."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_bias=affine,
        use_scale=affine,
        scale_init=nnx.with_partitioning(_ONES, (shd.NORM,)),
        bias_init=nnx.with_partitioning(_ZEROS, (shd.NORM,)),
        dtype=jnp.float32,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def group_norm(
    dim: int, *, rngs: nnx.Rngs, groups: int = 32, eps: float = 1e-6, param_dtype=jnp.float32
) -> nnx.GroupNorm:
    return nnx.GroupNorm(
        dim,
        num_groups=groups,
        epsilon=eps,
        scale_init=nnx.with_partitioning(_ONES, (shd.NORM,)),
        bias_init=nnx.with_partitioning(_ZEROS, (shd.NORM,)),
        dtype=jnp.float32,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head self-attention; q/k/v and output projections sharded over heads.

    x: [B, N, D] -> [B, N, D]. Optional per-head RMS QK-norm (Pippo's variant).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        rngs: nnx.Rngs,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.head_dim, self.dtype = heads, dim // heads, dtype
        kw = dict(rngs=rngs, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype)
        self.q = linear(dim, dim, (shd.EMBED, shd.HEADS), **kw)
        self.k = linear(dim, dim, (shd.EMBED, shd.HEADS), **kw)
        self.v = linear(dim, dim, (shd.EMBED, shd.HEADS), **kw)
        self.out = linear(
            dim, dim, (shd.HEADS, shd.EMBED), rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )
        if qk_norm:
            rms = lambda: nnx.RMSNorm(
                self.head_dim,
                epsilon=1e-6,
                scale_init=nnx.with_partitioning(_ONES, (shd.NORM,)),
                dtype=jnp.float32,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            self.q_norm, self.k_norm = rms(), rms()
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.heads, self.head_dim)
        q, k, v = (remat_lib.tag(split(f(x)), "qkv") for f in (self.q, self.k, self.v))
        if self.q_norm is not None:
            q, k = self.q_norm(q).astype(v.dtype), self.k_norm(k).astype(v.dtype)
        q = shd.constrain(q, shd.BATCH, shd.LENGTH, shd.HEADS, shd.HEAD_DIM)
        logits = jnp.einsum("BNHK,BMHK->BHNM", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("BHNM,BMHK->BNHK", probs, v).reshape(b, n, -1)
        return remat_lib.tag(self.out(o), "attn_out")


class Mlp(nnx.Module):
    """Linear -> activation -> Linear, hidden sharded over `MLP`. x: [..., D] -> [..., D]."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        rngs: nnx.Rngs,
        act=nnx.gelu,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        self.act = act
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(dim, hidden, (shd.EMBED, shd.MLP), **kw)
        self.fc2 = linear(hidden, dim, (shd.MLP, shd.EMBED), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = remat_lib.tag(self.act(self.fc1(x)), "mlp_hidden")
        return remat_lib.tag(self.fc2(h), "mlp_out")


def scan_blocks(
    blocks: nnx.Module, x: jax.Array, remat: remat_lib.Remat = "none", *ctx
) -> jax.Array:
    """Runs blocks stacked on a leading `LAYERS` axis (built with `nnx.vmap`) as one `nnx.scan`,
    so a 40-block model compiles one block: `x = block_i(x, *ctx)` for i = 0..depth-1.

    x:      the carry ([B, N, D] for transformers), same shape in and out.
    remat:  a policy name from `fica_jax.models.remat` (or a policy callable); each block is
            rematerialised under it.
    ctx:    extra inputs every block sees unchanged (DiT: adaLN conditioning, control tokens).
    """

    def apply(block, h, ctx):
        return block(h, *ctx)

    apply = remat_lib.wrap(apply, remat)

    @nnx.scan(
        in_axes=(nnx.Carry, 0, None),
        out_axes=nnx.Carry,
        transform_metadata={nnx.PARTITION_NAME: shd.LAYERS},
    )
    def run(h, block, ctx):
        return apply(block, h, ctx)

    return run(x, blocks, tuple(ctx))


def num_params(model_or_state) -> int:
    """Number of parameter entries of a model or its state (works on `nnx.eval_shape` outputs)."""
    state = nnx.state(model_or_state, nnx.Param)
    return int(sum(math.prod(v.shape) for v in jax.tree.leaves(state)))


def pixel_unshuffle(x: jax.Array, p: int) -> jax.Array:
    """Pixel-unshuffle. [B, H, W, C] -> [B, H/p, W/p, p*p*C], features ordered (row offset,
    column offset, C) as TF's space_to_depth (torch's pixel_unshuffle orders (C, dy, dx))."""
    b, h, w, c = x.shape
    if h % p or w % p:
        raise ValueError(f"map {h}x{w} is not divisible by the unshuffle factor {p}")
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def pixel_shuffle(x: jax.Array, p: int) -> jax.Array:
    """Pixel-shuffle, the exact inverse of `pixel_unshuffle`: [B, h, w, p*p*C] -> [B, hp, wp, C]."""
    b, h, w, pc = x.shape
    if pc % (p * p):
        raise ValueError(f"{pc} channels are not divisible by the shuffle factor {p}^2")
    c = pc // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)
