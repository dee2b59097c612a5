"""The train state and the sharded update step, shared by `fica train` and `fica plan`.

big_vision's "model+optimizer", "sharding" and "update step" sections. The train state is a plain
dict, explicit about what is saved:

  step   int32 []           optimizer steps taken
  rng    uint32 [2]         base key; step s uses fold_in(rng, s), so a resumed run draws the
                            same numbers as an uninterrupted one
  params nested dict        the model's `nnx.Param`s (pure arrays, f32)
  rest   nested dict        any other nnx state of the model (read-only in the step)
  opt    optax state
  ema    nested dict or {}  EMA of params when `cfg.optim.ema_decay` > 0

Shardings come from the logical names on the parameters and the stage's rule table
(`fica_jax.sharding`); optimizer moments take their parameter's sharding. Initialisation is
`eval_shape` -> shardings -> `jit(init, out_shardings=...)`, so no device ever holds the whole
unsharded model.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.train import optim
from fica_jax.train.stage import Stage

# Random streams must not depend on how arrays are partitioned (resume on another mesh).
jax.config.update("jax_threefry_partitionable", True)

State = dict[str, Any]


@dataclasses.dataclass
class Setup:
    """Everything the loop (or the planner) needs to run or compile the step on one mesh."""

    cfg: ml_collections.ConfigDict
    stage: Stage
    mesh: Mesh
    rules: tuple
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    abstract_state: State  # ShapeDtypeStructs carrying their target shardings
    state_shardings: State
    init: Callable[[], State]  # jitted, sharded init
    jitted_step: Callable  # jitted (state, batch) -> (state, metrics); state is donated

    def context(self):
        """Mesh + rule table current while tracing, so `shd.constrain` works inside models."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(shd.axis_rules(self.rules))
        return stack

    def train_step(self, state: State, batch) -> tuple[State, dict[str, jax.Array]]:
        with self.context():
            return self.jitted_step(state, batch)

    def lower(self, state=None, batch=None):
        """Lowers the step (for `compile()`, cost and memory analysis); abstract args by default."""
        with self.context():
            return self.jitted_step.lower(
                self.abstract_state if state is None else state,
                self.abstract_batch() if batch is None else batch,
            )

    def model(self, params, rest=None) -> nnx.Module:
        """An NNX module view of (params, rest) for eval/sample hooks."""
        return nnx.merge(self.graphdef, params, rest if rest is not None else {})

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        out = {}
        for k, s in self.stage.batch_spec(self.cfg).items():
            out[k] = jax.ShapeDtypeStruct(
                s.shape, s.dtype, sharding=shd.batch_sharding(self.mesh, len(s.shape))
            )
        return out


def _model_fn(cfg: ml_collections.ConfigDict, stage: Stage):
    return lambda: stage.make_model(cfg, nnx.Rngs(params=cfg.seed, default=cfg.seed))


def _split(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _opt_shardings(tx, abs_params, param_sh, mesh: Mesh):
    """Optimizer-state shardings: param-like leaves mirror their parameter, others replicate."""
    abs_opt = jax.eval_shape(tx.init, abs_params)
    replicated = NamedSharding(mesh, P())
    return optax.tree_map_params(
        tx,
        lambda _, sh: sh,
        abs_opt,
        param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def _microbatches(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...] with microbatch i = rows i, i+n, i+2n, ...

    Interleaving keeps every microbatch spread over all data shards (a contiguous split would put
    microbatch 0 on the first devices only).
    """
    b = x.shape[0]
    if b % n:
        raise UserError(f"config data.batch_size={b} is not divisible by train.grad_accum={n}")
    y = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return shd.constrain(y, None, shd.BATCH, *([None] * (x.ndim - 1)))


def build(cfg: ml_collections.ConfigDict, stage: Stage, mesh: Mesh) -> Setup:
    """Traces the model abstractly, derives shardings and jits init and the update step."""
    rules = shd.rules_for(stage.rules)
    model_fn = _model_fn(cfg, stage)
    tx = optim.make_optimizer(cfg)
    use_ema = float(cfg.optim.ema_decay) > 0

    graphdef, abs_params, abs_rest = _split(nnx.eval_shape(model_fn))
    param_sh = shd.param_shardings(abs_params, mesh, rules).to_pure_dict()
    rest_sh = shd.param_shardings(abs_rest, mesh, rules).to_pure_dict()
    abs_params_pure = abs_params.to_pure_dict()
    replicated = NamedSharding(mesh, P())
    shardings = {
        "step": replicated,
        "rng": replicated,
        "params": param_sh,
        "rest": rest_sh,
        "opt": _opt_shardings(tx, abs_params_pure, param_sh, mesh),
        "ema": param_sh if use_ema else {},
    }

    def init_state() -> State:
        _, params, rest = _split(model_fn())
        params = params.to_pure_dict()
        return {
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.PRNGKey(cfg.seed + 1),
            "params": params,
            "rest": rest.to_pure_dict(),
            "opt": tx.init(params),
            "ema": jax.tree.map(jnp.copy, params) if use_ema else {},
        }

    abstract = jax.eval_shape(init_state)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    init = jax.jit(init_state, out_shardings=shardings)
    step_fn = make_step_fn(cfg, stage, graphdef, tx)

    jitted = jax.jit(step_fn, out_shardings=(shardings, replicated), donate_argnums=0)
    return Setup(cfg, stage, mesh, rules, graphdef, tx, abstract, shardings, init, jitted)


def make_step_fn(cfg: ml_collections.ConfigDict, stage: Stage, graphdef, tx) -> Callable:
    """(state, batch) -> (state, metrics): accumulate grads over microbatches, clip, AdamW, EMA.

    The loss of a step is the mean of its microbatch losses (each microbatch loss is a mean over
    its examples), which equals the full-batch loss for per-example-mean losses. A step whose loss
    or gradient is not finite leaves the state unchanged and reports `finite = 0`; the loop stops.
    """
    accum = int(cfg.train.grad_accum)
    stage_loss = stage.make_loss(cfg)
    ema_decay = float(cfg.optim.ema_decay)
    schedule = optim.lr_schedule(cfg)

    def loss_of(params, rest, batch, rng):
        model = nnx.merge(graphdef, params, rest)
        loss, aux = stage_loss(model, batch, rng)
        return loss.astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32), aux)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def step_fn(state: State, batch) -> tuple[State, dict[str, jax.Array]]:
        params, rest = state["params"], state["rest"]
        rng = jax.random.fold_in(state["rng"], state["step"])
        if accum == 1:
            (loss, aux), grads = grad_fn(params, rest, batch, rng)
        else:
            micro = jax.tree.map(lambda x: _microbatches(x, accum), batch)
            first = jax.tree.map(lambda x: x[0], micro)
            (l_shape, a_shape), g_shape = jax.eval_shape(grad_fn, params, rest, first, rng)
            zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)

            def body(carry, xs):
                mb, i = xs
                (lm, am), gm = grad_fn(params, rest, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (lm, am, gm)), None

            init = (zeros(l_shape), zeros(a_shape), zeros(g_shape))
            total, _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
            loss, aux, grads = jax.tree.map(lambda t: t / accum, total)

        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optim.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = {
            "step": state["step"] + 1,
            "rng": state["rng"],
            "params": new_params,
            "rest": rest,
            "opt": opt,
            "ema": optim.ema_update(state["ema"], new_params, ema_decay) if ema_decay > 0 else {},
        }
        # Never let a non-finite update into the state (so nothing NaN can ever be checkpointed).
        keep = {**state, "step": state["step"] + 1}
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, keep)
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": grad_norm,
            "param_norm": optim.global_norm(new_params),
            "update_norm": optim.global_norm(updates),
            "learning_rate": schedule(state["step"]),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    return step_fn
