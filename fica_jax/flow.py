"""Rectified flow matching, SD3/Flux convention (docs/architecture.md §3; FiCA paper s.2.2, L_diffusion).

Flow time s in [0, 1]: s = 0 is data, s = 1 is noise.

  x_s = (1 - s) x0 + s eps,   target velocity v = dx_s/ds = eps - x0,   loss = mean (v_hat - v)^2
  s ~ logit-normal: s = sigmoid(u), u ~ N(mean, std), optionally shifted
      s' = shift s / (1 + (shift - 1) s)   (shift > 1 puts more steps at high noise)
  network time t = 1000 s
  Euler sampling from s = 1 to s = 0 in K steps: x <- x + (s_next - s) v_hat(x, s)

FiCA trains texture and geometry with one network switched by a domain input:
`L = L(texture, d_T) + L(geometry, d_G)` (`two_domain_loss`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

TIME_SCALE = 1000.0  # network timestep = s * TIME_SCALE

# velocity_fn(x_s [B, ...], t [B] network time, drop [B] bool) -> v_hat [B, ...]
VelocityFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def interpolate(x0: jax.Array, eps: jax.Array, s: jax.Array) -> jax.Array:
    """x_s = (1 - s) x0 + s eps. x0, eps: [B, ...]; s: [B] -> [B, ...]."""
    s = s.reshape(s.shape + (1,) * (x0.ndim - s.ndim)).astype(x0.dtype)
    return (1.0 - s) * x0 + s * eps


def velocity_target(x0: jax.Array, eps: jax.Array) -> jax.Array:
    """v = eps - x0 (the time derivative of `interpolate`)."""
    return eps - x0


def shift_time(s: jax.Array, shift: float) -> jax.Array:
    """SD3's resolution shift s' = shift s / (1 + (shift - 1) s); identity for shift = 1."""
    return shift * s / (1.0 + (shift - 1.0) * s)


def sample_time(
    rng: jax.Array, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, shift: float = 1.0
) -> jax.Array:
    """Logit-normal flow times in (0, 1): sigmoid(N(mean, std)), then `shift_time`. -> shape f32.

    The median is shift_time(sigmoid(mean), shift).
    """
    u = mean + std * jax.random.normal(rng, shape, jnp.float32)
    return shift_time(jax.nn.sigmoid(u), shift)


def network_time(s: jax.Array) -> jax.Array:
    """The DiT's timestep input: t = 1000 s."""
    return s * TIME_SCALE


def flow_loss(
    velocity_fn: VelocityFn, x0: jax.Array, rng: jax.Array, drop: jax.Array, **time_kw
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """mean (v_hat(x_s, 1000 s) - (eps - x0))^2 with s logit-normal (`time_kw`: mean, std, shift).

    x0: [B, ...] clean latents; drop: [B] bool CFG mask passed to `velocity_fn`.
    """
    k_s, k_eps = jax.random.split(rng)
    s = sample_time(k_s, x0.shape[:1], **time_kw)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    x_s = interpolate(x0.astype(jnp.float32), eps, s)
    err = velocity_fn(x_s, network_time(s), drop).astype(jnp.float32) - velocity_target(x0, eps)
    per_example = jnp.mean(jnp.square(err).reshape(x0.shape[0], -1), axis=1)
    return jnp.mean(per_example), {"s_mean": jnp.mean(s)}


def two_domain_loss(
    velocity_fn: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array],
    texture: jax.Array,
    geometry: jax.Array,
    rng: jax.Array,
    drop: jax.Array,
    **time_kw,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """FiCA's L = L(texture, d_T) + L(geometry, d_G), both domains in one network call.

    velocity_fn(x_s [2B, ...], t [2B], domain [2B] int, drop [2B]) -> v_hat; rows 0..B-1 are
    texture (domain 0), rows B..2B-1 geometry (domain 1). Each domain draws its own s and noise;
    `drop` [B] is shared by the two rows of an example (same portrait, same conditions).
    texture, geometry: [B, ...] clean latents. -> (loss, {loss_texture, loss_geometry, s_mean}).
    """
    b = texture.shape[0]
    x0 = jnp.concatenate([texture, geometry], axis=0).astype(jnp.float32)
    domain = jnp.repeat(jnp.arange(2, dtype=jnp.int32), b)
    k_s, k_eps = jax.random.split(rng)
    s = sample_time(k_s, (2 * b,), **time_kw)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    x_s = interpolate(x0, eps, s)
    v_hat = velocity_fn(x_s, network_time(s), domain, jnp.concatenate([drop, drop]))
    err = jnp.square(v_hat.astype(jnp.float32) - velocity_target(x0, eps))
    per_example = jnp.mean(err.reshape(2 * b, -1), axis=1)
    loss_t, loss_g = jnp.mean(per_example[:b]), jnp.mean(per_example[b:])
    return loss_t + loss_g, {"loss_texture": loss_t, "loss_geometry": loss_g, "s_mean": s.mean()}


def guided(velocity_fn, scale: float):
    """Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond), one batched call.

    scale = 1 is the plain conditional model (one call, nothing dropped). Extra arguments
    (`*state`) pass through to `velocity_fn`.
    """

    def fn(x: jax.Array, t: jax.Array, *state) -> jax.Array:
        b = x.shape[0]
        if scale == 1.0:
            return velocity_fn(x, t, jnp.zeros((b,), bool), *state)
        drop = jnp.concatenate([jnp.zeros((b,), bool), jnp.ones((b,), bool)])
        v = velocity_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), drop, *state)
        v_cond, v_uncond = v[:b], v[b:]
        return v_uncond + scale * (v_cond - v_uncond)

    return fn


def time_grid(steps: int, shift: float = 1.0) -> jax.Array:
    """[steps + 1] flow times from 1 to 0 (uniform, then `shift_time`)."""
    return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def euler_sample(
    velocity_fn,
    noise: jax.Array,
    steps: int = 50,
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    state=None,
) -> jax.Array:
    """Integrates dx/ds = v_hat from s = 1 (x = noise) to s = 0 in `steps` Euler steps.

    noise: [B, ...] -> sample [B, ...]. With cfg_scale != 1 every step evaluates the
    conditional and the unconditional (drop = True) velocity in one batch of 2B. `state` (a
    pytree, e.g. a model's pure NNX state) rides in the loop carry and reaches
    `velocity_fn(x, t, drop, state)`: a model rebuilt from it inside the loop body lives at the
    loop's trace level, which NNX's lifted transforms (the DiT's scanned blocks) require.
    """
    fn = guided(velocity_fn, cfg_scale)
    grid = time_grid(steps, shift)
    extra = () if state is None else (state,)

    def body(i, carry):
        x, *st = carry
        s, s_next = grid[i], grid[i + 1]
        t = jnp.full((x.shape[0],), network_time(s), jnp.float32)
        return (x + (s_next - s) * fn(x, t, *st).astype(x.dtype), *st)

    return jax.lax.fori_loop(0, steps, body, (noise.astype(jnp.float32), *extra))[0]
