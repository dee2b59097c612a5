"""A stage written outside the package, plugged in by path: proof that one module (+ its config)
is all a new stage needs. `fica train tests/plugins/linreg_stage.py --config THIS_FILE ...`"""

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


def example(i):
    x = np.random.default_rng(int(i)).standard_normal(4).astype(np.float32)
    return {"x": x, "y": np.float32(x @ np.arange(1.0, 5.0))}


def make_data(cfg, split, pi, pc):
    ds = host_records(grain.MapDataset.range(64), pi, pc, seed=0 if split == "train" else None)
    return ds.map(example).batch(cfg.data.batch_size // pc).to_iter_dataset()


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
)


def get_config():
    c = base_config(str(pathlib.Path(__file__).resolve()))
    c.model.din = 4
    c.data.batch_size = 8
    c.optim.lr, c.optim.warmup_steps = 1e-2, 1
    c.train.steps, c.train.log_every, c.train.ckpt_every = 2, 1, 2
    return c
