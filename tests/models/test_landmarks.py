"""The landmark branch (models/landmarks.py): soft-argmax, the readout's invariances, which loss
trains what, and the dense predictor with the branch sharded on the fake mesh."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fica_jax import sharding as shd
from fica_jax.models import landmarks as lm
from fica_jax.models import vit


def test_soft_argmax_lands_on_a_peak_and_between_two():
    h = w = 8
    logits = np.full((1, h, w, 2), -1e4, np.float32)
    logits[0, 2, 5, 0] = 0.0  # one cell: its centre, scaled to the 32 x 64 image
    logits[0, 6, 1, 1] = logits[0, 6, 2, 1] = 0.0  # two equal cells: halfway
    k = np.asarray(lm.soft_argmax(jnp.asarray(logits), (32, 64)))
    np.testing.assert_allclose(k[0, 0], [(5 + 0.5) * 8, (2 + 0.5) * 4], atol=1e-4)
    np.testing.assert_allclose(k[0, 1], [2.0 * 8, (6 + 0.5) * 4], atol=1e-4)


def test_landmark_features_ignore_shift_and_zoom_but_not_shape():
    k = jnp.asarray(np.random.default_rng(0).uniform(0, 64, (3, 68, 2)).astype(np.float32))
    f = lm.normalize_landmarks(k)
    np.testing.assert_allclose(lm.normalize_landmarks(1.7 * k + 5.0), f, atol=1e-5)
    opened = k.at[:, 8, 1].add(4.0)  # chin down: a different expression
    assert float(jnp.abs(lm.normalize_landmarks(opened) - f).max()) > 1e-2


@pytest.mark.heavy
def test_the_readout_starts_neutral_and_each_loss_trains_only_its_part():
    """kpt loss -> U-Net, not the readout; expression loss -> readout only (gradient stop)."""
    net = lm.LandmarkNet(68, 18, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32))
    out = net(x)
    assert out["kpts"].shape == (2, 68, 2) and float(jnp.abs(out["expression"]).max()) == 0.0
    target_k, target_e = jnp.full((2, 68, 2), 10.0), jnp.full((2, 18), 0.5)

    def grads(loss):
        g = nnx.grad(loss)(net)
        norm = lambda t: float(sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(t)))
        return norm(g["readout"]), norm({k: v for k, v in g.items() if k != "readout"})

    readout, rest = grads(lambda m: jnp.mean(jnp.abs(m(x)["kpts"] - target_k)))
    assert readout == 0.0 and rest > 0.0
    readout, rest = grads(lambda m: jnp.mean((m(x)["expression"] - target_e) ** 2))
    assert readout > 0.0 and rest == 0.0


@pytest.mark.heavy
def test_dense_predictor_with_landmarks_sharded_equals_unsharded():
    cfg = dataclasses.replace(
        vit.VARIANTS["tiny"], patch=8, image_size=(32, 32), final_upsample=1,
        pose_head=True, expression_dim=18, landmarks=68,
    )  # fmt: skip
    abstract = nnx.eval_shape(lambda: vit.DensePredictor(cfg, rngs=nnx.Rngs(3)))
    assert shd.unannotated_params(abstract) == []
    assert abstract.pose.expression_dim == 0  # the expression comes from the landmarks
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    rules = shd.rules_for("vit")
    model = shd.sharded_init(lambda: vit.DensePredictor(cfg, rngs=nnx.Rngs(3)), mesh, rules)
    # a trained-looking readout, so that the expression is not 0 on both sides
    readout = model.landmarks.readout.kernel
    readout[...] = jax.device_put(
        0.1 * jax.random.normal(jax.random.key(0), readout[...].shape), readout[...].sharding
    )
    x = np.random.default_rng(2).uniform(size=(8, 32, 32, 3)).astype(np.float32)

    @nnx.jit
    def forward(m, x):
        with shd.axis_rules(rules):
            out = m(shd.constrain(x, shd.BATCH, shd.HEIGHT, shd.WIDTH, shd.CHANNELS))
            return out["kpts"], out["expression"]

    with jax.set_mesh(mesh):
        kpts, expr = forward(model, shd.put_batch({"x": x}, mesh)["x"])
    assert kpts.sharding.spec[0] == ("data", "fsdp")
    ref = vit.DensePredictor(cfg, rngs=nnx.Rngs(3))
    ref.landmarks.readout.kernel[...] = np.asarray(readout[...])
    out = ref(jnp.asarray(x))
    np.testing.assert_allclose(kpts, out["kpts"], atol=1e-4)
    np.testing.assert_allclose(expr, out["expression"], rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(out["expression"]).max()) > 1e-3
