"""Flow matching (fica_jax/flow.py): formulas, time sampling, Euler sampler, CFG, two-domain loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax import flow


def test_interpolation_and_target_are_the_formulas():
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = jax.random.normal(k0, (3, 4, 4, 2))
    eps = jax.random.normal(k1, (3, 4, 4, 2))
    s = jax.random.uniform(k2, (3,))
    sn = np.asarray(s)[:, None, None, None]
    np.testing.assert_allclose(
        flow.interpolate(x0, eps, s), (1 - sn) * np.asarray(x0) + sn * np.asarray(eps), atol=1e-6
    )
    np.testing.assert_array_equal(flow.velocity_target(x0, eps), eps - x0)
    # The target is the time derivative of the path.
    _, dxds = jax.jvp(lambda s_: flow.interpolate(x0, eps, s_), (s,), (jnp.ones_like(s),))
    np.testing.assert_allclose(dxds, flow.velocity_target(x0, eps), atol=1e-6)
    # Ends: data at s = 0, noise at s = 1.
    np.testing.assert_array_equal(flow.interpolate(x0, eps, jnp.zeros(3)), x0)
    np.testing.assert_array_equal(flow.interpolate(x0, eps, jnp.ones(3)), eps)
    np.testing.assert_array_equal(flow.network_time(jnp.array([0.0, 0.25, 1.0])), [0, 250, 1000])


def test_shift_time():
    s = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(flow.shift_time(s, 1.0), s, atol=1e-7)
    shifted = flow.shift_time(s, 3.0)
    np.testing.assert_allclose(np.asarray(shifted)[[0, 5, 10]], [0.0, 0.75, 1.0], atol=1e-6)
    assert np.all(np.diff(shifted) > 0) and np.all(shifted >= s)


@pytest.mark.parametrize(("mean", "shift"), [(0.0, 1.0), (0.0, 3.0), (1.0, 1.0)])
def test_logit_normal_times(mean, shift):
    s = np.asarray(flow.sample_time(jax.random.PRNGKey(1), (20000,), mean=mean, shift=shift))
    assert s.dtype == np.float32 and np.all((s > 0) & (s < 1))
    m = 1 / (1 + np.exp(-mean))
    expected = shift * m / (1 + (shift - 1) * m)
    assert abs(np.median(s) - expected) < 0.01
    # logit(s) is normal with std 1 (shift = 1 only; the shift bends it)
    if shift == 1.0:
        assert abs(np.std(np.log(s / (1 - s))) - 1.0) < 0.03


def _oracle(x0):
    """The exact velocity of the straight path to the single data point x0: (x_s - x0) / s."""
    return lambda x, t, drop: (x - x0) / (t / flow.TIME_SCALE)[:, None, None, None]


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (5, 1.0), (50, 3.0)])
def test_euler_with_perfect_velocity_reaches_the_data(steps, shift):
    x0 = jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3))
    noise = jax.random.normal(jax.random.PRNGKey(3), x0.shape)
    out = flow.euler_sample(_oracle(x0), noise, steps=steps, shift=shift)
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_euler_cfg_extrapolates_between_conditional_and_unconditional():
    """Conditional field -> x0, unconditional -> x1: guided velocity with scale w is the exact
    field towards x1 + w (x0 - x1), so the guided sample lands there."""
    x0 = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 3))
    x1 = jax.random.normal(jax.random.PRNGKey(5), x0.shape)
    calls = []

    def velocity(x, t, drop):
        calls.append(x.shape[0])
        reps = (x.shape[0] // x0.shape[0], 1, 1, 1)
        target = jnp.where(drop[:, None, None, None], jnp.tile(x1, reps), jnp.tile(x0, reps))
        return (x - target) / (t / flow.TIME_SCALE)[:, None, None, None]

    noise = jax.random.normal(jax.random.PRNGKey(6), x0.shape)
    out = flow.euler_sample(velocity, noise, steps=4, cfg_scale=2.5)
    np.testing.assert_allclose(out, x1 + 2.5 * (x0 - x1), atol=1e-4)
    assert calls == [4]  # one traced call on the doubled batch (fori_loop traces once)
    plain = flow.euler_sample(velocity, noise, steps=4, cfg_scale=1.0)
    np.testing.assert_allclose(plain, x0, atol=1e-5)


def test_flow_loss_of_zero_velocity_is_the_target_energy():
    x0 = jnp.full((64, 4, 4, 2), 2.0)
    loss, _ = flow.flow_loss(
        lambda x, t, d: jnp.zeros_like(x), x0, jax.random.PRNGKey(7), jnp.zeros(64, bool)
    )
    assert abs(float(loss) - 5.0) < 0.1  # E (eps - 2)^2 = 1 + 4


def test_two_domain_loss_routes_domains_and_sums():
    b = 6
    tex, geo = jnp.zeros((b, 4, 4, 2)), jnp.full((b, 4, 4, 2), 3.0)
    drop = jnp.array([True, False] * 3)
    seen = {}

    def oracle(x, t, domain, drop2):
        seen.update(domain=domain, drop=drop2, t=t)
        x0 = jnp.where(domain[:, None, None, None] == 0, 0.0, 3.0)
        return (x - x0) / (t / flow.TIME_SCALE)[:, None, None, None]

    loss, m = flow.two_domain_loss(oracle, tex, geo, jax.random.PRNGKey(8), drop)
    assert float(loss) < 1e-6 and float(m["loss_texture"]) < 1e-6
    np.testing.assert_array_equal(seen["domain"], [0] * b + [1] * b)
    np.testing.assert_array_equal(seen["drop"], jnp.concatenate([drop, drop]))
    t = np.asarray(seen["t"])
    assert np.all((t > 0) & (t < 1000)) and not np.allclose(t[:b], t[b:])

    zero = lambda x, t, domain, drop2: jnp.zeros_like(x)
    loss, m = flow.two_domain_loss(zero, tex, geo, jax.random.PRNGKey(9), drop)
    # E eps^2 = 1 for texture, E (eps - 3)^2 = 10 for geometry; the total is their sum.
    assert abs(float(m["loss_texture"]) - 1.0) < 0.15
    assert abs(float(m["loss_geometry"]) - 10.0) < 0.5
    np.testing.assert_allclose(loss, m["loss_texture"] + m["loss_geometry"], rtol=1e-6)
