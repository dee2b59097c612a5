"""What a training stage plugs into the one shared train loop, and the one stage registry.

A stage (dense predictor, VAE, DiT, refiner, UPM, and the `toy` stage used by the runtime tests)
is one module exposing `STAGE = Stage(...)`: the stage declares everything about itself there
(name, sharding rule table, data, factories). The loop owns everything else: mesh, sharded init,
optimizer, accumulation, precision, checkpoints, logging, preemption. The registry is the
`fica_jax/stages/` package itself: `fica train NAME` imports `fica_jax.stages.NAME`; a stage kept
outside the package is named by the path of its `.py` file (or a dotted module path). Recipe for a
new stage: `fica_jax/stages/README.md`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib
import pkgutil
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import nnx

from fica_jax.errors import UserError

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
Config = ml_collections.ConfigDict
STAGES_PACKAGE = "fica_jax.stages"  # the registry: `fica train NAME` loads STAGES_PACKAGE.NAME
LossFn = Callable[[nnx.Module, Batch, jax.Array], tuple[jax.Array, Metrics]]
EvalFn = Callable[[nnx.Module, Batch, jax.Array], Metrics]
SampleFn = Callable[[nnx.Module, Batch, jax.Array, pathlib.Path, int], None]
ExampleFn = Callable[[Mapping[str, np.ndarray], np.random.Generator, Any], dict[str, np.ndarray]]


class RenderCall(NamedTuple):
    """One Gaussian render a training step makes per example (`Stage.renders`): its Gaussian
    count, square frame side and tile size, colour channels, and how many times per example it
    runs forward and backward. `fica plan` prices the renderer's kernel from these."""

    name: str
    gaussians: int
    size: int
    tile_size: int
    n_colors: int
    forward: int
    backward: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    """A stage's contract with the train loop. Every callable is a factory of `cfg`, called once
    outside jit, so config constants (loss weights, normalisation) are bound before tracing.

    name:        stage name used on the command line (`fica train NAME`) and in `cfg.stage`.
    rules:       key of the sharding rule table in `fica_jax.sharding.RULES`.
    make_model:  `(cfg, rngs) -> nnx.Module`; pure function of cfg and rngs (traced under
                 `eval_shape`, then jitted with sharded outputs: no host-side side effects).
    make_loss:   `(cfg) -> loss_fn`, `loss_fn(model, batch, rng) -> (scalar, {name: scalar})`;
                 runs inside jit in the compute dtype `cfg.train.compute_dtype`.
    example:     optional `(record, rng, options) -> {name: np.ndarray}`: one training example
                 from one record of the stage's data; a module-level function (Grain workers
                 import it by name) of the stage's own module (the DiT's lives with the latent
                 cache format it reads). `None` for a stage whose `make_data` builds its
                 examples otherwise (`toy`: from record indices).
    make_data:   `(cfg, split, process_index, process_count) -> iterable` of this host's batches
                 (dicts of numpy arrays), forever for "train", once for "eval"; the train
                 iterator must be checkpointable (`get_state`/`set_state`). Left out, it is
                 `data_pipelines.pipeline.CaptureData(example)`: `example` over capture shards.
    batch_spec:  `(cfg) -> {name: jax.ShapeDtypeStruct}` of one *global* batch; lets `fica plan`
                 compile the step ahead of time without data.
    make_eval:   optional `(cfg) -> eval_fn(model, batch, rng) -> {name: scalar}` on the eval split.
                 A baseline of figure X is named `baseline_X` (`baseline_<which>_X` for several).
    metrics:     every figure `make_eval` returns, baselines aside: {name: True if higher is
                 better}; what reports compare each baseline with (`vs_baselines`).
    make_sample: optional `(cfg) -> sample_fn(model, batch, rng, workdir, step)` writing previews.
    export_stats: optional `(cfg) -> (json dict, {name: np.ndarray})`: what the trained model
                 needs beside its parameters at inference (data normalisation, the template),
                 stored in its `fica export` (`model.json` "stats", `stats.*` tensors).
    fit_data:    optional `(meta) -> {dotted config key: value}`: the config values the data fix,
                 read from the `metadata.json` of the data the stage trains on (UV resolution,
                 image size, cameras; the latent cache's grid): `--config.KEY=VALUE` overrides
                 that make a config fit that data.
    renders:     optional `(cfg) -> [RenderCall]`: the Gaussian renders one training step makes
                 per example; `fica plan` adds the compositing kernel's analytic cost, which the
                 HLO roofline cannot see (`fica_jax/plan/render_cost.py`).
    """

    name: str
    rules: str
    make_model: Callable[[Config, nnx.Rngs], nnx.Module]
    make_loss: Callable[[Config], LossFn]
    batch_spec: Callable[[Config], dict[str, jax.ShapeDtypeStruct]]
    example: ExampleFn | None = None
    make_data: Callable[[Config, str, int, int], Iterable] | None = None
    make_eval: Callable[[Config], EvalFn] | None = None
    metrics: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    make_sample: Callable[[Config], SampleFn] | None = None
    export_stats: Callable[[Config], tuple[dict, dict[str, np.ndarray]]] | None = None
    fit_data: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    renders: Callable[[Config], list[RenderCall]] | None = None

    def __post_init__(self):
        if self.make_data is None:
            if self.example is None:
                raise UserError(f"stage {self.name!r}: give Stage(example=...) or make_data=...")
            from data_pipelines.pipeline import CaptureData

            object.__setattr__(self, "make_data", CaptureData(self.example))

    def metric_of(self, figure: str) -> str:
        """The declared metric an eval figure is, or is a baseline of: `X` and `baseline_X` ->
        X; `baseline_<which>_X` -> the longest declared X it ends with. An undeclared one is a
        `UserError` naming the stage and the figure."""
        rest = figure.removeprefix("baseline_")
        if rest in self.metrics:
            return rest
        ends = [m for m in self.metrics if rest != figure and rest.endswith("_" + m)]
        if not ends:
            raise UserError(
                f"stage {self.name!r}: eval figure {figure!r} is not declared; add its metric to "
                f"Stage(metrics={{name: higher_is_better}}) (declared: {sorted(self.metrics)})"
            )
        return max(ends, key=len)


def vs_baselines(stage: Stage, figures: Mapping[str, float]) -> dict[str, dict]:
    """Each baseline among eval `figures` (names without `eval/`) beside the metric it is a
    baseline of, where that was logged too: {"X" or "<which>_X": {"value", "baseline",
    "better"}}, `better` in the direction `stage.metrics` declares."""
    out = {}
    for key, base in figures.items():
        if not key.startswith("baseline_"):
            continue
        metric = stage.metric_of(key)
        if metric not in figures:  # e.g. the dense pose baseline without the pose head
            continue
        value = figures[metric]
        up = stage.metrics[metric]
        out[key.removeprefix("baseline_")] = {
            "value": value,
            "baseline": base,
            "better": bool(value > base if up else value < base),
        }
    return out


def stage_names() -> list[str]:
    """The stages shipped in `fica_jax/stages/` (every module there defining STAGE)."""
    # Found by name, not imported: the stages sit above the train loop (tests/foundation/test_layers.py).
    where = importlib.util.find_spec(STAGES_PACKAGE).submodule_search_locations
    return sorted(m.name for m in pkgutil.iter_modules(where) if not m.ispkg)


def _load_file(path: pathlib.Path) -> Any:
    name = f"_fica_stage_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def get_stage(spec: str) -> Stage:
    """The stage named `spec`: a module of `fica_jax/stages/`, a `path/to/stage.py`, or a dotted
    importable module path. Anything else is a one-line `UserError` listing the stages."""
    if spec.endswith(".py"):
        path = pathlib.Path(spec)
        if not path.is_file():
            raise UserError(f"stage file {spec} not found; expected a .py file defining STAGE")
        module = _load_file(path)
    elif "." in spec:
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError:
            raise UserError(f"stage module {spec!r} cannot be imported") from None
    elif spec in stage_names():
        module = importlib.import_module(f"{STAGES_PACKAGE}.{spec}")
    else:
        raise UserError(
            f"unknown stage {spec!r}; expected one of {stage_names()} or a path/to/stage.py"
        )
    stage = getattr(module, "STAGE", None)
    if not isinstance(stage, Stage):
        raise UserError(f"stage module {spec!r} defines no STAGE = fica_jax.train.stage.Stage(...)")
    return stage
