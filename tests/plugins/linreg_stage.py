"""A stage written outside the package, plugged in by path: proof that one module (+ its config)
is all a new stage needs. `fica train tests/plugins/linreg_stage.py --config THIS_FILE ...`

Its held-out figure `mae` sits beside a baseline (the best constant, `baseline_mae`) and the
stage declares which way is better (`metrics`), as every stage does."""

import pathlib

import grain
import jax
import jax.numpy as jnp
import numpy as np

from configs.common import base_config
from data_pipelines.pipeline import host_records
from fica_jax.models import layers
from fica_jax.train.stage import Stage


def make_model(cfg, rngs):
    return layers.linear(cfg.model.din, 1, (None, None), rngs=rngs)


def make_loss(cfg):
    def loss_fn(model, batch, rng):
        err = model(batch["x"])[:, 0] - batch["y"]
        return jnp.mean(err**2), {"mae": jnp.mean(jnp.abs(err))}

    return loss_fn


def make_eval(cfg):
    def eval_fn(model, batch, rng):
        y = batch["y"]
        return {
            "mae": jnp.mean(jnp.abs(model(batch["x"])[:, 0] - y)),
            "baseline_mae": jnp.mean(jnp.abs(jnp.median(y) - y)),  # the best constant
        }

    return eval_fn


def make_example(i):  # record index -> {"x": [4], "y": ()}, y = x . (1, 2, 3, 4)
    x = np.random.default_rng(int(i)).standard_normal(4).astype(np.float32)
    return {"x": x, "y": np.float32(x @ np.arange(1.0, 5.0))}


def make_data(cfg, split, pi, pc):
    """Records 0..63 shuffled forever for training, 64..79 once in order for the eval."""
    train = split == "train"
    records = grain.MapDataset.range(0, 64) if train else grain.MapDataset.range(64, 80)
    ds = host_records(records, pi, pc, seed=0 if train else None, num_epochs=None if train else 1)
    return ds.map(make_example).batch(cfg.data.batch_size // pc).to_iter_dataset()


def batch_spec(cfg):
    b, d = cfg.data.batch_size, cfg.model.din
    return {
        "x": jax.ShapeDtypeStruct((b, d), jnp.float32),
        "y": jax.ShapeDtypeStruct((b,), jnp.float32),
    }


STAGE = Stage(
    name="linreg",
    rules="default",
    make_model=make_model,
    make_loss=make_loss,
    make_data=make_data,
    batch_spec=batch_spec,
    make_eval=make_eval,
    metrics={"mae": False},  # lower is better
)


def get_config():
    c = base_config(str(pathlib.Path(__file__).resolve()))
    c.model.din = 4
    c.data.batch_size = 8
    c.optim.lr, c.optim.warmup_steps = 1e-2, 1
    c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 2, 1, 2, 2
    return c
