"""Sampling the completion DiT: 50-step guided Euler, decoding, held-out metrics, previews.

FiCA paper s.2.2: one network generates the UV texture and the UV geometry, switched by the
domain token. `sample_latents` runs both domains of every identity in one batch, from the *same*
starting noise, so an identity's texture and geometry samples differ only by the domain token.
The Euler integration (`fica_jax.flow.euler_sample`, classifier-free guidance in the same batch)
is jitted once per (steps, cfg scale, shift) and deterministic given the key.
The `fica sample` command over these is `fica_jax.commands.sample`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fica_jax import flow
from fica_jax.models import layers, uv_latent
from fica_jax.quality.image import masked_psnr, masked_ssim, visible_unseen_psnr


# ----------------------------------------------------------------------------- generation
def temperatures(value) -> tuple[float, float]:
    """A config's `model.temperature`: one scale for both domains or (texture, geometry)."""
    t = tuple(float(v) for v in np.ravel(value))
    if len(t) not in (1, 2):
        raise ValueError(f"model.temperature {value!r}: expected a number or (texture, geometry)")
    return (t[0], t[-1])


def sample_latents(
    model, control, image_emb, rng, *, steps: int = 50, cfg_scale: float = 1.0, shift: float = 1.0,
    temperature: float | tuple[float, float] = 1.0,
):  # fmt: skip
    """-> (texture, geometry) latent grids [B, G, G, C] for B identities' conditions.

    control [B, G, G, Cc], image_emb [B, E]; rng: one key -> the [B, G, G, C] starting noise,
    shared by the two domains of each identity, x `temperature` (one number, or (texture,
    geometry); < 1 trades the samples' diversity for their distance to the conditional mean: a
    sample's expected squared error is the posterior variance more than the mean's, and a PSNR
    sees that).
    """
    b = control.shape[0]
    c = model.cfg.in_channels
    noise = jax.random.normal(rng, (b, *control.shape[1:3], c), jnp.float32)
    t_tex, t_geo = temperatures(temperature)
    two = lambda a: jnp.concatenate([a, a], axis=0)
    domain = jnp.repeat(jnp.arange(2, dtype=jnp.int32), b)

    # The model is rebuilt inside the Euler loop body from its state, carried by the loop.
    graphdef, state = nnx.split(model)

    def velocity(x, t, drop, st):
        k = x.shape[0] // (2 * b)  # 1, or 2 when guidance doubles the batch
        rep = lambda a: jnp.concatenate([two(a)] * k, axis=0)
        m = nnx.merge(graphdef, st)
        return m(x, t, rep(image_emb), jnp.tile(domain, k), rep(control), drop)

    start = jnp.concatenate([t_tex * noise, t_geo * noise], axis=0)
    x = flow.euler_sample(
        velocity, start, steps=steps, cfg_scale=cfg_scale, shift=shift, state=state
    )
    return x[:b], x[b:]


# Jitted once per (steps, cfg scale, shift); `sample_latents` itself is for callers already
# inside a jit (the stage's eval step).
sample_latents_jit = nnx.jit(
    sample_latents, static_argnames=("steps", "cfg_scale", "shift", "temperature")
)


def _decode(vae, tex, geo, unshuffle):
    z = jnp.concatenate([tex, geo]) / vae.cfg.scaling_factor + vae.cfg.shift_factor
    return vae.decode(layers.pixel_shuffle(z, unshuffle))


_decode_jit = nnx.jit(_decode, static_argnums=(3,))


def decode(
    vae, stats: uv_latent.MapStats, unshuffle: int, tex, geo, mask, *, jit: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Latent grids -> (texture [B, R, R, 3] in [0, 1], geometry [B, R, R, 3] in data units),
    zero outside the UV layout `mask` [B, R, R]. `jit=False` from inside another jit."""
    y = (_decode_jit if jit else _decode)(vae, tex, geo, unshuffle)
    b = tex.shape[0]
    texture = uv_latent.denormalize_map("texture", y[:b], stats, mask)
    geometry = uv_latent.denormalize_map("position", y[b:], stats, mask)
    return texture, geometry


def sample_maps(
    model,
    vae,
    stats,
    unshuffle: int,
    batch,
    rng,
    *,
    steps: int,
    cfg_scale: float,
    shift: float,
    temperature: float | tuple[float, float] = 1.0,
    jit: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Generated (texture, geometry) maps for a batch's conditions: `sample_latents` + `decode`.
    `jit=False` from inside another jit (the stage's eval step)."""
    gen = sample_latents_jit if jit else sample_latents
    kw = dict(steps=steps, cfg_scale=cfg_scale, shift=shift, temperature=temperature)
    tex, geo = gen(model, batch["control"], batch["image_emb"], rng, **kw)
    return decode(vae, stats, unshuffle, tex, geo, batch["uv_mask"], jit=jit)


# ----------------------------------------------------------------------------- metrics
def uv_metrics(
    texture, geometry, batch, baselines: dict[str, Any], unit_mm: float = 1000.0
) -> dict[str, jax.Array]:
    """Held-out figures of generated maps vs the ground truth, beside the baselines: texture
    PSNR / SSIM on the UV mask vs the mean training texture, geometry L1 (mm) vs the mean
    training neutral geometry (the mean-shape template). With the batch's `partial_uv`, also
    the texture PSNR on the texels the portrait shows (`partial_uv[..., 3]` > 0.5) and on the
    unseen rest (`*_psnr_visible` / `*_psnr_unseen`): the mean over identities of each one's
    PSNR (`visible_unseen_psnr`), identities with no such texel left out."""
    m = batch["uv_mask"]
    gt_tex, gt_geo = batch["uv_texture"], batch["uv_geometry"]
    mean_tex = jnp.broadcast_to(jnp.asarray(baselines["mean_texture"]), gt_tex.shape)
    mean_geo = jnp.broadcast_to(jnp.asarray(baselines["mean_geometry"]), gt_geo.shape)
    l1 = lambda a: unit_mm * jnp.sum(jnp.abs(a - gt_geo) * m[..., None]) / (3 * jnp.sum(m) + 1e-6)
    out = {
        "texture_psnr": masked_psnr(texture, gt_tex, m),
        "baseline_texture_psnr": masked_psnr(mean_tex, gt_tex, m),
        "texture_ssim": masked_ssim(texture, gt_tex, m),
        "baseline_texture_ssim": masked_ssim(mean_tex, gt_tex, m),
        "geometry_l1_mm": l1(geometry),
        "baseline_geometry_l1_mm": l1(mean_geo),
    }
    if "partial_uv" in batch:
        seen = batch["partial_uv"][..., 3]
        for prefix, tex in (("", texture), ("baseline_", mean_tex)):
            vis, unseen = visible_unseen_psnr(tex, gt_tex, m, seen)
            out[f"{prefix}texture_psnr_visible"] = jnp.nanmean(vis)
            out[f"{prefix}texture_psnr_unseen"] = jnp.nanmean(unseen)
    return out


# ----------------------------------------------------------------------------- previews
def geometry_normals(geo: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A position map [R, R, 3] shown as its surface normals (finite differences) in [0, 1]."""
    du = np.gradient(geo, axis=1)
    dv = np.gradient(geo, axis=0)
    n = np.cross(dv, du)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
    return np.where(mask[..., None] > 0.5, (n + 1) * 0.5, 1.0)


def preview_rows(batch: dict, texture, geometry, n: int = 4) -> list[list[tuple[str, np.ndarray]]]:
    """Per identity: partial input | generated texture | GT texture | generated geometry as
    normals | GT geometry as normals."""
    rows = []
    for i in range(min(n, texture.shape[0])):
        m = np.asarray(batch["uv_mask"][i])
        rows.append(
            [
                ("partial input", np.asarray(batch["partial_uv"][i])[..., :3]),
                ("generated texture", np.asarray(texture[i])),
                ("GT texture", np.asarray(batch["uv_texture"][i])),
                ("generated geometry", geometry_normals(np.asarray(geometry[i]), m)),
                ("GT geometry", geometry_normals(np.asarray(batch["uv_geometry"][i]), m)),
            ]
        )
    return rows
