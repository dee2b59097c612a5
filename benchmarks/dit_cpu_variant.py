"""The CPU-only variant of our DiT block forwards that `benchmarks/dit_step.py` measures beside
the library's (`ours_cpu_variant`); see the comment below for why it is not library code."""

import jax
import jax.numpy as jnp
from flax import nnx

from fica_jax.models import remat as remat_lib


# A CPU-only variant of our block forwards, measured beside the library's (`--skip variant`
# leaves it out). XLA:CPU (jax 0.10.2) lowers autodiff's kernel gradient of a [B, N, D] @ [D, F]
# projection, a contraction over the two token axes, to a transposed copy plus a slow generic
# dot; writing that gradient as one [D, B*N] @ [B*N, F] matmul (a custom VJP) and
# rematerialising the MLP activation alone makes our step ~20% faster on CPU. It stays out of
# `fica_jax.models.layers` because the custom-VJP matmul is not a `dot_general` to the remat
# policies (`dots_saveable`, the paper config's, would recompute it), and on TPU/GPU the
# autodiff form is already a plain matmul.
@jax.custom_vjp
def _matmul(x, w):
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, w):
    return _matmul(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())))
    return dx, x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _dense(layer: nnx.Linear, x):
    """`layer(x)`: same values and grads, the kernel gradient as one flat matmul."""
    bias = layer.bias[...] if layer.bias is not None else None
    x, kernel, bias = layer.promote_dtype((x, layer.kernel[...], bias), dtype=layer.dtype)
    y = _matmul(x, kernel)
    return y if bias is None else y + bias


def _attn_call_variant(self, x):
    """`layers.Attention.__call__` with `_dense` projections (the CPU variant)."""
    b, n, _ = x.shape
    split = lambda t: t.reshape(b, n, self.heads, self.head_dim)
    q, k, v = (remat_lib.tag(split(_dense(f, x)), "qkv") for f in (self.q, self.k, self.v))
    if self.q_norm is not None:
        q, k = self.q_norm(q).astype(v.dtype), self.k_norm(k).astype(v.dtype)
    logits = jnp.einsum("BNHK,BMHK->BHNM", q, k).astype(jnp.float32) / jnp.sqrt(self.head_dim)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    o = jnp.einsum("BHNM,BMHK->BNHK", probs, v).reshape(b, n, -1)
    return remat_lib.tag(_dense(self.out, o), "attn_out")


def _mlp_call_variant(self, x):
    """`layers.Mlp.__call__` with `_dense` and the activation rematerialised on its own."""
    act = jax.checkpoint(self.act, prevent_cse=False)
    h = remat_lib.tag(act(_dense(self.fc1, x)), "mlp_hidden")
    return remat_lib.tag(_dense(self.fc2, h), "mlp_out")
