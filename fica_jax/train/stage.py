"""What a training stage plugs into the one shared train loop.

A stage (dense predictor, VAE, DiT, refiner, UPM, and the `toy` stage used by the runtime tests)
is a module under `fica_jax/stages/` exposing `STAGE = Stage(...)`. The loop owns everything
else: mesh, sharded init, optimizer, accumulation, precision, checkpoints, logging, preemption.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
from flax import nnx

from fica_jax.errors import UserError

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage's contract with the train loop.

    name:      stage name used on the command line (`fica train NAME`).
    network:   key of the sharding rule table in `fica_jax.sharding.RULES`.
    init_fn:   `(cfg, rngs) -> nnx.Module`; pure function of cfg and rngs (it is traced under
               `eval_shape` and then jitted with sharded outputs, so no host-side side effects).
    loss_fn:   `(model, batch, rng) -> (scalar loss, {name: scalar})`; runs inside jit, in the
               compute dtype given by `cfg.train.compute_dtype`.
    make_data: `(cfg, split, process_index, process_count) -> grain IterDataset/DataLoader`
               yielding this host's per-host batches (dicts of numpy arrays) forever (train) or
               once (eval). Its iterator must be checkpointable (`get_state`/`set_state`).
    batch_spec: `(cfg) -> {name: jax.ShapeDtypeStruct}` of one *global* batch; lets
               `fica plan` compile the step ahead of time without data.
    eval_fn:   optional `(model, batch, rng) -> {name: scalar}` evaluated on the eval split.
    sample_fn: optional `(model, batch, rng, workdir, step) -> None` writing images/avatars.
    configure: optional `(cfg) -> Stage` returning the stage with config-dependent functions
               (loss weights, normalisation constants) bound, so `loss_fn` keeps its
               three-argument form and the config is read once, outside the jitted step.
    """

    name: str
    network: str
    init_fn: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
    loss_fn: Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, Metrics]]
    make_data: Callable[[ml_collections.ConfigDict, str, int, int], Any]
    batch_spec: Callable[[ml_collections.ConfigDict], dict[str, jax.ShapeDtypeStruct]]
    eval_fn: Callable[[nnx.Module, Batch, jax.Array], Metrics] | None = None
    sample_fn: Callable[..., None] | None = None
    configure: Callable[[ml_collections.ConfigDict], Stage] | None = None


def needs_config(stage_name: str) -> Callable[..., Any]:
    """Placeholder `loss_fn` of a stage whose real loss is built by `configure(cfg)`."""

    def unbound(*args, **kwargs):
        raise RuntimeError(f"stage {stage_name!r} is config-bound: use get_stage(name, cfg)")

    return unbound


# Stage name -> module defining STAGE. Imported lazily so `fica data ...` stays light.
STAGE_MODULES: dict[str, str] = {
    "toy": "fica_jax.stages.toy",
    "vae": "fica_jax.stages.vae",
    "dense": "fica_jax.stages.dense",
    "dit": "fica_jax.stages.dit",
}


def get_stage(name: str, cfg: ml_collections.ConfigDict | None = None) -> Stage:
    """The registered stage; with `cfg`, its config-bound form (see `Stage.configure`)."""
    if name not in STAGE_MODULES:
        raise UserError(f"unknown stage {name!r}; expected one of {sorted(STAGE_MODULES)}")
    stage = importlib.import_module(STAGE_MODULES[name]).STAGE
    if cfg is not None and stage.configure is not None:
        stage = stage.configure(cfg)
    return stage
