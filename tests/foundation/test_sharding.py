"""Mesh construction, rule resolution and batch placement on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import fica_jax  # noqa: F401  (turns off eager sharding)
from fica_jax import sharding as shd
from fica_jax.errors import UserError


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = shd.make_mesh({"data": 2, "fsdp": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("shape", [{"data": 3}, {"data": -1, "fsdp": -1}, {"pipeline": 2}])
def test_make_mesh_rejects_bad_shapes(shape):
    with pytest.raises(UserError):
        shd.make_mesh(shape)


def test_put_batch_on_data2_fsdp4_mesh():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    batch = {"image": np.zeros((16, 8, 8, 3), np.float32), "label": np.arange(16)}
    out = shd.put_batch(batch, mesh)
    assert out["image"].sharding.spec == P(("data", "fsdp"), None, None, None)
    assert out["label"].sharding.spec == P(("data", "fsdp"))
    assert len(out["image"].addressable_shards) == 8
    assert out["image"].addressable_shards[0].data.shape == (2, 8, 8, 3)
    np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(16))


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
    assert shd.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
    assert shd.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")


def test_fit_spec_drops_axes_that_do_not_divide():
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    assert shd.fit_spec(P("fsdp", None), (3, 8), mesh) == P(None, None)
    assert shd.fit_spec(
        P(
            ("data", "fsdp"),
        ),
        (8,),
        mesh,
    ) == P(("data", "fsdp"))
    assert shd.fit_spec(
        P(
            ("data", "fsdp"),
        ),
        (6,),
        mesh,
    ) == P("data")


class _MLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            16,
            32,
            kernel_init=nnx.with_partitioning(init, (shd.EMBED, shd.MLP)),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, (shd.MLP,)),
            rngs=rngs,
        )


def test_sharded_init_follows_rules():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = shd.sharded_init(lambda: _MLP(nnx.Rngs(0)), mesh, shd.rules_for("dit"))
    assert model.up.kernel.value.sharding.spec == P("fsdp", "tensor")
    assert model.up.bias.value.sharding.spec == P("tensor")
    assert shd.unannotated_params(model) == []
    x = jnp.ones((4, 16))
    assert model.up(x).shape == (4, 32)
