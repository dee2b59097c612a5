"""Rematerialisation (activation checkpointing) chosen by policy *name*, for every model.

MaxText convention: a config names a policy (`cfg.train.remat`), a model wraps its repeated block
with `wrap(fn, name)`. Every model constructor takes the same `remat: str` (or a
`jax.checkpoint_policies` callable for experiments) and resolves it here; models never import the
train package.

Names:
  none                 no remat: keep every activation (the wrapper is skipped entirely)
  full                 save nothing inside the block, recompute it all in the backward pass
  dots_saveable        keep every matmul output (cheapest recompute, most memory)
  dots_with_no_batch_dims_saveable   keep weight-only matmuls
  save_attn_mlp_out    keep only the tensors tagged `attn_out` and `mlp_out` (the two projections
                       that end each transformer branch, see `TAGS`): the backward recomputes
                       the block's interior but never its most expensive outputs twice
  save_qkv_attn_mlp_out   keep q/k/v (`qkv`) and both branch outputs: the backward recomputes
                       norms, attention scores/softmax/PV and the MLP's first matmul + GELU
  save_tagged          keep every tagged tensor (`TAGS`), i.e. all projection outputs of
                       attention and MLP: only attention's interior and elementwise work recompute
  everything_saveable  for debugging: saves everything (same memory as none, through the wrapper)

Choosing one [ours]: `fica plan` prints the hardware/model FLOP ratio (the recompute cost) and the
per-device peak bytes for a config and mesh; take the cheapest policy that fits the chip
(docs/architecture.md §9, benchmarks/results/plan_dit_*.json).

Tags are `jax.ad_checkpoint.checkpoint_name` labels put on tensors by the shared layers
(`fica_jax.models.layers`); a name-based policy only keeps what is tagged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fica_jax.errors import UserError

TAGS = ("qkv", "attn_out", "mlp_hidden", "mlp_out")

_POLICIES: dict[str, Callable] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "checkpoint_dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_mlp_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    "save_qkv_attn_mlp_out": jax.checkpoint_policies.save_only_these_names(
        "qkv", "attn_out", "mlp_out"
    ),
    "save_tagged": jax.checkpoint_policies.save_only_these_names(*TAGS),
}
REMAT_NAMES = ("none", *_POLICIES)

Remat = str | Callable


def policy(remat: Remat) -> Callable | None:
    """The `jax.checkpoint` policy for a name (None for "none"); a callable passes through.

    An unknown name is a `UserError` naming `train.remat` and the valid names.
    """
    if callable(remat):
        return remat
    if remat not in REMAT_NAMES:
        raise UserError(f"config train.remat={remat!r} is unknown; expected one of {REMAT_NAMES}")
    return _POLICIES.get(remat)


def wrap(fn: Callable, remat: Remat) -> Callable:
    """`fn` under `nnx.remat` with the named policy, or `fn` itself for "none"."""
    p = policy(remat)
    return fn if p is None else nnx.remat(fn, policy=p)


def tag(x: jax.Array, name: str) -> jax.Array:
    """Labels `x` for name-based policies (a no-op outside `jax.checkpoint`)."""
    return checkpoint_name(x, name)
