"""Shared NNX building blocks whose every parameter carries logical sharding names.

Only what several networks use lives here (projections, convs, norms, attention, MLP). Norms and
softmax run in float32 whatever the compute dtype (MaxText convention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.train.remat import remat_policy, use_remat

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
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q).astype(v.dtype), self.k_norm(k).astype(v.dtype)
        q = shd.constrain(q, shd.BATCH, shd.LENGTH, shd.HEADS, shd.HEAD_DIM)
        logits = jnp.einsum("BNHK,BMHK->BHNM", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        o = jnp.einsum("BHNM,BMHK->BNHK", probs, v).reshape(b, n, -1)
        return self.out(o)


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
        return self.fc2(self.act(self.fc1(x)))


def scan_blocks(blocks: nnx.Module, x: jax.Array, remat=None) -> jax.Array:
    """Runs blocks stacked on a leading `LAYERS` axis (built with `nnx.vmap`) as one `nnx.scan`,
    so a 40-block model compiles one block. `remat`: a policy name from `fica_jax.train.remat`
    or a `jax.checkpoint_policies` callable; none/None keeps activations."""

    def apply(block, h):
        return block(h)

    if callable(remat) or (remat is not None and use_remat(remat)):
        apply = nnx.remat(apply, policy=remat if callable(remat) else remat_policy(remat))

    @nnx.scan(
        in_axes=(nnx.Carry, 0),
        out_axes=nnx.Carry,
        transform_metadata={nnx.PARTITION_NAME: shd.LAYERS},
    )
    def run(h, block):
        return apply(block, h)

    return run(x, blocks)
