"""A tiny but real stage for the train-runtime tests: a residual MLP regressing a fixed function.

It exercises every path the big stages use -- logical sharding names on all params, blocks stacked
with `nnx.vmap` and run with `nnx.scan` (so `fica plan` sees a while loop with a trip count), remat
by policy name, the compute dtype from config, and a Grain pipeline whose iterator is saved in the
checkpoint. Examples are a pure function of their record index, so any two runs see the same data.

`cfg.model.nan_at_step = k` (k >= 1) turns the inputs of the batch of step k (the loop's 1-based
step count, i.e. the k-th batch) into NaN: the runtime's NaN guard is tested with it.
"""

from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.pipeline import host_records
from fica_jax import sharding as shd
from fica_jax.models import layers
from fica_jax.models import remat as remat_lib
from fica_jax.train.stage import Stage


# ----------------------------------------------------------------------------- model
class Block(nnx.Module):
    """Pre-norm residual MLP block. x: [B, W] -> [B, W]."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.norm = layers.layer_norm(width, rngs=rngs, param_dtype=param_dtype)
        self.mlp = layers.Mlp(width, 2 * width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm(x).astype(x.dtype)
        return x + shd.constrain(self.mlp(h), shd.BATCH, shd.EMBED)


class ToyNet(nnx.Module):
    """x: [B, din] -> [B, dout] through `depth` scanned residual blocks of width `width`."""

    def __init__(
        self,
        din: int,
        dout: int,
        width: int,
        depth: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: remat_lib.Remat = "none",
    ):
        self.dtype, self.remat = dtype, remat
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.inp = layers.linear(din, width, (None, shd.EMBED), **kw)
        self.out = layers.linear(width, dout, (shd.EMBED, None), **kw)

        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: shd.LAYERS})
        def make_blocks(rngs):
            return Block(width, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        self.blocks = make_blocks(rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = shd.constrain(self.inp(x.astype(self.dtype)), shd.BATCH, shd.EMBED)

        return self.out(layers.scan_blocks(self.blocks, x, self.remat)).astype(jnp.float32)


def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> ToyNet:
    m, t = cfg.model, cfg.train
    dtypes = dict(dtype=jnp.dtype(t.compute_dtype), param_dtype=jnp.dtype(t.param_dtype))
    return ToyNet(m.din, m.dout, m.width, m.depth, rngs=rngs, remat=t.remat, **dtypes)


def loss_fn(model: ToyNet, batch, rng: jax.Array):
    """Mean squared error to the target function; `rng` is unused (no dropout)."""
    del rng
    pred = model(batch["x"])
    loss = jnp.mean(jnp.square(pred - batch["y"]))
    return loss, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}


def eval_fn(model: ToyNet, batch, rng: jax.Array):
    loss, aux = loss_fn(model, batch, rng)
    return {"loss": loss, **aux}


# ----------------------------------------------------------------------------- data
class MakeExample:
    """Record index -> {"x": [din], "y": [dout]}; y = tanh(x @ W) for a fixed random W.

    Top-level and picklable so Grain worker processes can import it. Step `nan_at_step` (counted
    in this host's stream of `per_host_batch` examples, 1-based) gets NaN inputs when it is >= 1.
    """

    def __init__(self, din: int, dout: int, per_host_batch: int, nan_at_step: int):
        self.w = np.random.default_rng(1234).standard_normal((din, dout)).astype(np.float32)
        self.w /= np.sqrt(din)
        self.din, self.per_host_batch, self.nan_at_step = din, per_host_batch, nan_at_step

    def __call__(self, position: int, record: int) -> dict[str, np.ndarray]:
        x = np.random.default_rng(int(record)).standard_normal(self.din).astype(np.float32)
        y = np.tanh(x @ self.w)
        if self.nan_at_step >= 1 and position // self.per_host_batch + 1 == self.nan_at_step:
            x = np.full_like(x, np.nan)
        return {"x": x, "y": y}


def make_data(cfg: ml_collections.ConfigDict, split: str, process_index: int, process_count: int):
    """This host's slice of the record stream, batched to `batch_size / process_count`."""
    per_host = cfg.data.batch_size // process_count
    m = cfg.model
    if split == "train":
        records, seed, epochs, nan_at = (
            (0, m.num_records),
            cfg.data.shuffle_seed,
            None,
            m.nan_at_step,
        )
    else:  # a disjoint, fixed eval set read once
        records, seed, epochs, nan_at = (
            (m.num_records, m.num_records + m.num_eval_records),
            None,
            1,
            -1,
        )
    ds = host_records(
        grain.MapDataset.range(*records), process_index, process_count, seed=seed, num_epochs=epochs
    )
    ds = ds.map_with_index(MakeExample(m.din, m.dout, per_host, nan_at))
    return ds.batch(per_host, drop_remainder=True).to_iter_dataset()


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, m = cfg.data.batch_size, cfg.model
    return {
        "x": jax.ShapeDtypeStruct((b, m.din), jnp.float32),
        "y": jax.ShapeDtypeStruct((b, m.dout), jnp.float32),
    }


STAGE = Stage(
    name="toy",
    rules="default",
    make_model=make_model,
    make_loss=lambda cfg: loss_fn,
    make_data=make_data,
    batch_spec=batch_spec,
    make_eval=lambda cfg: eval_fn,
    metrics={"loss": False, "mae": False},
)
