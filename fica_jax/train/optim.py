"""Optimizer from config: AdamW, linear warmup + cosine/constant schedule, clipping, EMA.

Fields live in `configs/common.py` (`cfg.optim.*`). Gradient accumulation is done by the train step
itself (a `lax.scan` over microbatches, `fica_jax/train/step.py`), so the optimizer sees exactly one
update per step and the learning-rate schedule counts optimizer steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fica_jax.errors import UserError


def lr_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    o, steps = cfg.optim, int(cfg.train.steps)
    warmup = max(int(o.warmup_steps), 0)
    if o.schedule == "constant":
        main = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        main = optax.cosine_decay_schedule(o.lr, max(steps - warmup, 1))
    else:
        raise UserError(f"config optim.schedule={o.schedule!r}; expected 'cosine' or 'constant'")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warmup), main], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Clip-by-global-norm (if `clip_norm` > 0) followed by AdamW on the schedule."""
    o = cfg.optim
    parts = []
    if o.clip_norm and o.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    parts.append(
        optax.adamw(lr_schedule(cfg), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, eps=1e-8)
    )
    return optax.chain(*parts)


def ema_update(ema, params, decay: float):
    """`ema <- decay * ema + (1 - decay) * params` (f32 params, so no dtype juggling)."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def global_norm(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
