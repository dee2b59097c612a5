"""The one shared train loop (big_vision's train.py sections), driven by a stage's `Stage`.

Sections: mesh -> input -> model + optimizer + sharding (`fica_jax/train/step.py`) -> checkpoint
(resume / `--init_from`) -> loop (update step, NaN guard, logging, eval, checkpoint, preemption).

Every host runs this same program (multi-controller JAX): each reads its own slice of the data
(`make_data(cfg, split, process_index, process_count)`) and `put_batch` assembles the global batch.
"""

from __future__ import annotations

import math
import pathlib
import signal
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from fica_jax import sharding as shd
from fica_jax.errors import UserError
from fica_jax.files import write_text
from fica_jax.perf import hlo_stats
from fica_jax.train import metrics as mlib
from fica_jax.train.checkpoint import Checkpointer, load_params
from fica_jax.train.stage import get_stage
from fica_jax.train.step import Setup, build


class NonFiniteError(UserError):
    """Training stopped because a logged metric became NaN/Inf (one line from the CLI)."""


class _Preemption:
    """SIGTERM -> flag checked after every step (single process; multi-host uses jax's sync point,
    whose coordination service catches SIGTERM itself)."""

    def __init__(self, install: bool):
        self.flag = False
        self._old = None
        if install:
            self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _check_finite(step: int, scalars: dict[str, float], ckpt: Checkpointer) -> None:
    # Name the loss first when it is among the bad values: it is what users watch.
    bad = sorted((k for k, v in scalars.items() if not math.isfinite(v)), key=lambda k: k != "loss")
    if scalars.get("finite", 1.0) != 1.0 or bad:
        name = bad[0] if bad else "loss"
        ckpt.wait()
        last = ckpt.latest_step()
        kept = f"last good checkpoint is step {last}" if last is not None else "no checkpoint"
        raise NonFiniteError(
            f"step {step}: {name} is {scalars.get(name)} (not finite); stopped without saving, "
            f"{kept} in {ckpt.directory}"
        )


class _Evaluator:
    """Means of the stage's eval function over the eval split (read once), and the stage's
    sample hook on the first eval batch; both built once from the config."""

    def __init__(self, setup: Setup, cfg: ml_collections.ConfigDict, workdir: pathlib.Path):
        self.setup, self.cfg, self.workdir = setup, cfg, workdir
        stage = setup.stage
        eval_fn = stage.make_eval(cfg) if stage.make_eval is not None else None
        self._sample = stage.make_sample(cfg) if stage.make_sample is not None else None

        def one(params, rest, batch, rng):
            return eval_fn(setup.model(params, rest), batch, rng)

        self._fn = jax.jit(one) if eval_fn is not None else None  # built once

    def _batches(self):
        data = self.setup.stage.make_data(
            self.cfg, "eval", jax.process_index(), jax.process_count()
        )
        for host_batch in data:
            yield shd.put_batch(host_batch, self.setup.mesh)

    def __call__(self, state: dict, step: int) -> dict[str, float]:
        if self._fn is None:
            return {}
        params = state["ema"] if state["ema"] else state["params"]
        totals, n = {}, 0
        with self.setup.context():
            for batch in self._batches():
                out = jax.device_get(self._fn(params, state["rest"], batch, state["rng"]))
                for k, v in out.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                n += 1
        return {f"eval/{k}": v / max(n, 1) for k, v in totals.items()}

    def sample(self, state: dict, step: int) -> None:
        if self._sample is None:
            return
        params = state["ema"] if state["ema"] else state["params"]
        with self.setup.context():
            batch = next(iter(self._batches()), None)
            if batch is not None:
                model = self.setup.model(params, state["rest"])
                self._sample(model, batch, state["rng"], self.workdir, step)


def _check_batch(host_batch, spec: dict, process_count: int) -> None:
    """The first batch must match `stage.batch_spec` (per host), or the AOT step cannot run it."""
    for key, s in spec.items():
        if key not in host_batch:
            raise UserError(f"make_data batch has no key {key!r} that batch_spec promises")
        x = np.asarray(host_batch[key])
        want = (s.shape[0] // process_count, *s.shape[1:])
        if x.shape != want or x.dtype != s.dtype:
            raise UserError(
                f"make_data batch[{key!r}] is {x.dtype}{list(x.shape)} but batch_spec says "
                f"{np.dtype(s.dtype)}{list(want)} per host"
            )


def train(
    cfg: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    init_from: str | None = None,
    profile_steps: Sequence[int] | None = None,
) -> dict[str, float]:
    """Trains `cfg.stage` in `workdir` until `cfg.train.steps`, resuming from its last checkpoint.

    Returns the last logged scalars. Stops early (exit 0 from the CLI) after saving on SIGTERM.
    """
    # Installed first so a SIGTERM during start-up is not lost; multi-host leaves it to JAX.
    preempt = _Preemption(install=jax.process_count() == 1)
    try:
        return _train(cfg, pathlib.Path(workdir), init_from, profile_steps, preempt)
    finally:
        preempt.restore()


def _train(cfg, workdir: pathlib.Path, init_from, profile_steps, preempt: _Preemption):
    stage = get_stage(cfg.stage)
    pi, pc, primary = jax.process_index(), jax.process_count(), jax.process_index() == 0
    if cfg.data.batch_size % pc:
        raise UserError(f"config data.batch_size={cfg.data.batch_size} must divide by {pc} hosts")

    # ------------------------------------------------------------------ mesh, model, sharding
    mesh = shd.make_mesh(dict(cfg.mesh))
    setup = build(cfg, stage, mesh)

    # ------------------------------------------------------------------ input
    data_iter = iter(stage.make_data(cfg, "train", pi, pc))

    # ------------------------------------------------------------------ checkpoint / resume
    ckpt = Checkpointer(workdir, cfg)
    start, state = _resume(ckpt, setup, data_iter, init_from, primary)
    if primary:
        write_text(workdir / "config.json", cfg.to_json(indent=2))

    # ------------------------------------------------------------------ observability
    total = int(cfg.train.steps)
    writer = mlib.MetricsWriter(workdir, enabled=primary)
    # Compile once, ahead of time, and run that executable: its HLO also gives the step's FLOPs.
    compiled = setup.lower().compile()
    flops = hlo_stats.analyze(compiled.as_text()).flops or mlib.compiled_flops(compiled)
    meter = mlib.Throughput(int(cfg.data.batch_size), flops, mlib.peak_flops())
    eval_every = int(cfg.train.eval_every)
    sample_every = int(cfg.train.get("sample_every", 0)) or eval_every
    hooks = (stage.make_eval and eval_every) or (stage.make_sample and sample_every)
    evaluate = _Evaluator(setup, cfg, workdir) if hooks else None
    log_every, ckpt_every = max(int(cfg.train.log_every), 1), int(cfg.train.ckpt_every)
    # A tqdm bar on a terminal; in a batch job's log, one line every log_every steps.
    bar = mlib.Progress(total, start, enabled=primary, label=str(cfg.stage), log_every=log_every)
    profile = mlib.ProfileWindow(workdir, tuple(profile_steps) if profile_steps else None)

    # ------------------------------------------------------------------ loop
    last: dict[str, float] = {}
    step = start
    try:
        while step < total:
            profile.before(step)
            host_batch = next(data_iter)
            if step == start:
                _check_batch(host_batch, stage.batch_spec(cfg), pc)
            state, m = compiled(state, shd.put_batch(host_batch, mesh))
            step += 1
            meter.tick()
            profile.after(step, state["step"])
            # One scalar fetch per step keeps the NaN guard exact: nothing after a bad step runs.
            scalars = {k: float(v) for k, v in jax.device_get(m).items()}
            _check_finite(step, scalars, ckpt)
            bar.update(1, loss=scalars["loss"])
            row = {}
            if step % log_every == 0 or step == total:
                row = last = {**scalars, **meter.read()}
            if evaluate is not None and eval_every and step % eval_every == 0:
                evals = evaluate(state, step)
                row, last = {**row, **evals}, {**last, **evals}
            if evaluate is not None and sample_every and step % sample_every == 0:
                evaluate.sample(state, step)
            if row:
                writer.write(step, row)
            stop = preempt.flag if pc == 1 else ckpt.reached_preemption(step)
            if stop or step == total or (ckpt_every and step % ckpt_every == 0):
                ckpt.save(step, state, data_iter, force=stop)
            if stop:
                if primary:
                    print(f"preempted: saved step {step}, exiting", flush=True)
                break
    finally:
        ckpt.close()
        writer.close()
        bar.close()
        if profile.active:
            jax.profiler.stop_trace()
    return last


def _resume(ckpt: Checkpointer, setup: Setup, data_iter, init_from, primary: bool):
    """-> (first step, state): the run's last checkpoint, the data iterator's position restored
    with it; else a fresh init, its params (and EMA) from `init_from` when given."""
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, setup.abstract_state, data_iter)
        print(f"resumed from step {start} in {ckpt.directory}", flush=True) if primary else None
        return start, state
    state = setup.init()
    if init_from:
        src_step, params = load_params(init_from, setup.abstract_state["params"])
        state["params"] = params
        if state["ema"]:
            state["ema"] = jax.tree.map(lambda p: p.copy(), params)
        print(f"params from {init_from} (step {src_step})", flush=True) if primary else None
    return 0, state


def param_values(state: dict) -> dict[str, np.ndarray]:
    """Flat {path: host array} of the params (tests compare runs with it)."""
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {jax.tree_util.keystr(p): np.asarray(jax.device_get(v)) for p, v in flat}
