"""Orbax checkpoints: train state + Grain iterator state + config in one step directory.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}` written by an async `CheckpointManager`.
Orbax writes each step into a temporary directory and renames it only once every item is complete,
so a process killed mid-save leaves no half checkpoint that `latest_step()` would pick; the tmp
directory is removed on the next start (`cleanup_tmp_directories`).

Retention: the newest `cfg.train.keep` steps, plus every step divisible by `cfg.train.keep_every`
(when > 0). Restoring takes target shardings from the *current* mesh, so a run saved on
(data=2, fsdp=4) resumes on (data=8) or any other layout.
"""

from __future__ import annotations

import pathlib
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

from fica_jax.errors import UserError


def _options(cfg: ml_collections.ConfigDict, read_only: bool = False):
    keep_every = int(cfg.train.keep_every)
    return ocp.CheckpointManagerOptions(
        max_to_keep=max(int(cfg.train.keep), 1),
        keep_period=keep_every if keep_every > 0 else None,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        read_only=read_only,
    )


class Checkpointer:
    """Saves and restores `(state, data iterator, config)` under `workdir/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, cfg: ml_collections.ConfigDict):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        self.cfg = cfg
        self.manager = ocp.CheckpointManager(self.directory, options=_options(cfg))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, data_iter: Any, force: bool = False) -> bool:
        """Starts an async save; returns once arrays are copied off the devices."""
        items = {
            "state": ocp.args.StandardSave(state),
            "config": ocp.args.JsonSave(self.cfg.to_dict()),
        }
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict, data_iter: Any) -> dict:
        """Restores `state` onto `abstract_state`'s shardings and sets `data_iter` in place."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption notice agreed by all processes (jax's sync point)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_only_manager(root: str | pathlib.Path) -> ocp.CheckpointManager:
    """A `CheckpointManager` that only reads `root`, built with absl's level raised to ERROR:
    Orbax warns that a read-only manager is read-only ("CheckpointManagerOptions.read_only=True,
    setting ...", "Given directory is read only") every time one is made."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        return ocp.CheckpointManager(root, options=options)
    finally:
        absl_logging.set_verbosity(level)


def load_params(
    run_dir: str | pathlib.Path, abstract_params: dict, item: str = "params"
) -> tuple[int, dict]:
    """Params only from another run's latest checkpoint (`--init_from DIR`), on our shardings.

    `run_dir` is that run's workdir (or its `checkpoints/` folder). Optimizer state, step and data
    position are not taken, so fine-tuning starts fresh from the given weights.
    """
    root = pathlib.Path(run_dir).absolute()
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if not root.is_dir():
        raise UserError(f"--init_from {run_dir}: no such directory")
    manager = read_only_manager(root)
    step = manager.latest_step()
    if step is None:
        raise UserError(f"--init_from {run_dir}: no complete checkpoint found in {root}")
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        abstract_params,
    )
    try:
        tree = restore_item(manager, step, item, abstract_params, restore_args)
    except (ValueError, KeyError) as e:
        raise UserError(
            f"--init_from {run_dir}: step {step} params do not match this model ({e})"
        ) from None
    finally:
        manager.close()
    return step, tree


def restore_item(manager: ocp.CheckpointManager, step: int, item: str, target, restore_args):
    """`target`'s leaves (a sub-tree, any subset) of the saved state's `item` at `step`: Orbax's
    partial restore of the loop's `Composite(state=...)` layout. Orbax's errors pass through."""
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item={item: target}, restore_args={item: restore_args}, partial_restore=True
            )
        ),
    )
    return out["state"][item]


def load_run_config(run_dir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run was trained with (`WORKDIR/config.json`, written by the train loop)."""
    import json

    path = pathlib.Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; {run_dir} is not a `fica train` run directory")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None


def load_model(
    cfg: ml_collections.ConfigDict,
    run_dir: str | pathlib.Path,
    *,
    device: jax.Device | None = None,
    ema: bool = False,
) -> tuple[int, Any]:
    """`cfg.stage`'s model with the params of `run_dir`'s latest checkpoint, on one device
    (the first local one by default) for evaluation, sampling and export. -> (step, model).
    `ema=True` takes the EMA of the params when the run keeps one (`optim.ema_decay` > 0)."""
    from flax import nnx

    from fica_jax.train.stage import get_stage

    model = get_stage(cfg.stage).make_model(cfg, nnx.Rngs(cfg.seed))
    dev = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
        nnx.state(model, nnx.Param).to_pure_dict(),
    )
    use_ema = ema and float(cfg.optim.get("ema_decay", 0.0)) > 0
    step, params = load_params(run_dir, abstract, "ema" if use_ema else "params")
    nnx.update(model, params)
    return step, model
