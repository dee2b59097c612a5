"""Rematerialisation (activation checkpointing) policies chosen by name from `cfg.train.remat`.

MaxText convention: a config names a policy, a model wraps its repeated block with
`nnx.remat(..., policy=remat_policy(name))`. `"none"` means no remat at all (the model should skip
the wrapper, see `use_remat`); `"full"` saves nothing and recomputes the whole block.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from fica_jax.errors import UserError

_POLICIES: dict[str, Callable | None] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "checkpoint_dots": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_NAMES = ("none", *_POLICIES)


def use_remat(name: str) -> bool:
    """True when `name` asks for any rematerialisation."""
    if name not in REMAT_NAMES:
        raise UserError(f"config train.remat={name!r} is unknown; expected one of {REMAT_NAMES}")
    return name != "none"


def remat_policy(name: str) -> Callable | None:
    """The `jax.checkpoint` policy for `cfg.train.remat` (None for "none")."""
    use_remat(name)
    return _POLICIES.get(name)
