"""What the portrait says about the maps' albedo (ours): the portrait's colour at each texel it
shows, divided by the portrait's shading. The visible-texel transfer (`infer.transfer`) pastes
it in after the refiner; the refiner can read it as cues (`RefinerConfig.evidence`).

A portrait is albedo times light; the texture is albedo. The shading is modelled per colour
channel as a linear function of the surface normal, s_c(n) = a_c + b_c . n (first-order
spherical harmonics), fitted by least squares to portrait_c ~ texture_c * s_c(n) over the visible
texels, with the maps' own texture as the albedo estimate. That fit pins the shading's shape
(which side is lit) but not its level: scaling the albedo up and the light down explains the
portrait as well, and fitting the level against a near-mean texture drags every identity's
colours to the mean. So the level is fixed by the data instead: `exposure_gain`, the mean shading
over visible texels of the training portraits (ground-truth unwrap vs ground-truth texture,
the same fit), is stored in the refiner's export, and each portrait's fitted shading is rescaled
so that its mean over the visible texels equals it (`delit_albedo`). On the demo's held-out
identities, with the ground-truth unwrap, de-lit colours pasted texel for texel give 19.75 dB on
the visible texels vs 16.59 dB for the mean texture; the fitted level alone gives 17.4, the raw
portrait colours 17.0.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.render.surfels import normal_maps

MIN_TEXELS = 16  # fewer visible texels than this: the shading fit is not attempted
RIDGE = 1e-3  # Tikhonov weight on the shading fit's normal equations, relative to their trace
FACING = (0.15, 0.5)  # |cos| between normal and view ray: weight 0 below, 1 above (linear)


def _design(normals: jax.Array) -> jax.Array:
    """[..., 3] unit normals -> [..., 4] first-order SH features (1, n)."""
    return jnp.concatenate([jnp.ones_like(normals[..., :1]), normals], -1)


def fit_shading(observed, albedo, normals, weight) -> jax.Array:
    """Per-channel linear shading: argmin_b sum_i w_i (o_ic - a_ic * (1, n_i) . b_c)^2 over
    texels [N] -> coefficients [3, 4]. A small ridge (relative to the normal equations' trace, so
    scaling the albedo by k scales the coefficients by exactly 1/k) keeps it solvable."""
    x = _design(normals)  # [N, 4]
    w = weight[:, None]

    def one(o, a):
        d = x * a[:, None]
        gram = (d * w).T @ d
        lhs = gram + RIDGE * (jnp.trace(gram) / 4 + 1e-12) * jnp.eye(4)
        return jnp.linalg.solve(lhs, (d * w).T @ o)

    return jax.vmap(one, in_axes=(1, 1))(observed, albedo)


def shading(normals, coef) -> jax.Array:
    """[..., 3] normals, [3, 4] coefficients -> shading [..., 3]."""
    return _design(normals) @ coef.T


def exposure_gain(records: Iterable, limit: int = 256) -> np.ndarray:
    """The data's shading level [3]: per record (with `partial_uv` and `uv_texture`), the
    ground-truth unwrap's colours fitted against the ground-truth texture (`fit_shading`), the
    mean fitted shading over its visible texels; the median over the first `limit` records."""
    gains = []
    for rec in records:
        part = jnp.asarray(np.asarray(rec["partial_uv"], np.float32))
        seen = (part[..., 3] > 0.5).reshape(-1)
        if int(seen.sum()) < MIN_TEXELS:
            continue
        tex = jnp.asarray(np.asarray(rec["uv_texture"], np.float32) / 255.0).reshape(-1, 3)
        nrm, rgb = part[..., 4:7].reshape(-1, 3), part[..., :3].reshape(-1, 3)
        coef = fit_shading(rgb, tex, nrm, seen.astype(jnp.float32))
        s = shading(nrm, coef)
        gains.append(np.asarray(jnp.sum(s * seen[:, None], 0) / jnp.sum(seen)))
        if len(gains) >= limit:
            break
    return np.median(np.stack(gains), 0).astype(np.float32) if gains else np.ones(3, np.float32)


@functools.lru_cache(maxsize=4)
def training_gain(data_dir: str) -> tuple[float, float, float]:
    """`exposure_gain` of the training split of the captures in `data_dir`: what the refiner's
    evidence is de-lit to in training, and what its export stores (`stats.transfer_gain`) for
    `fica generate`'s refiner and transfer."""
    from data_pipelines.pipeline import open_source

    src = open_source(data_dir, "train")
    return tuple(float(g) for g in exposure_gain(src[i] for i in range(len(src))))


def view_normals(posed, mask, viewmat) -> tuple[jax.Array, jax.Array]:
    """Posed geometry maps [B, R, R, 3] -> (unit normals turned towards the camera of viewmat
    [B, 4, 4], |cos| of their angle with the ray to it [B, R, R])."""
    normals = normal_maps(posed, mask)
    rot, trans = viewmat[:, :3, :3], viewmat[:, :3, 3]
    eye = -jnp.einsum("bji,bj->bi", rot, trans)  # camera centres in the maps' frame
    ray = eye[:, None, None] - posed
    ray = ray / jnp.maximum(jnp.linalg.norm(ray, axis=-1, keepdims=True), 1e-9)
    cos = jnp.sum(normals * ray, -1)
    return normals * jnp.where(cos < 0, -1.0, 1.0)[..., None], jnp.abs(cos)


def seen_weight(cues: jax.Array, cos: jax.Array) -> jax.Array:
    """`uv_cues`' visibility [B, R, R] times a ramp on |cos| (`FACING`): grazing texels, whose
    colour comes from a stretched pixel near the silhouette, count less."""
    lo, hi = FACING
    return cues[..., 6] * jnp.clip((cos - lo) / (hi - lo), 0.0, 1.0)


def fitted_shading(texture, normals, observed, weight) -> jax.Array:
    """Per map [B, R, R, 3]: `fit_shading` of observed ~ texture * shading over the texels'
    weights [B, R, R] -> shading [B, R, R, 3] (1 where fewer than MIN_TEXELS carry weight)."""

    def one(tex, nrm, obs, w):
        flat = lambda a: a.reshape(-1, a.shape[-1])
        s = shading(nrm, fit_shading(flat(obs), flat(tex), flat(nrm), w.reshape(-1)))
        return jnp.where(jnp.sum(w > 0) >= MIN_TEXELS, s, 1.0)

    return jax.vmap(one)(texture, normals, observed, weight)


def portrait_light(texture, geometry, mask, batch, cues) -> tuple[jax.Array, jax.Array]:
    """The portrait's shading [B, R, R, 3] of neutral maps posed by `portrait_offset`, fitted
    (`fitted_shading`) to its colours pulled back through them (`cues`, `infer.refine.uv_cues`)
    against their texture over the texels it shows, and those texels' weights [B, R, R]
    (`seen_weight`; all 0 where fewer than MIN_TEXELS carry weight)."""
    normals, cos = view_normals(
        geometry + batch["portrait_offset"], mask, batch["portrait_viewmat"]
    )
    weight = seen_weight(cues, cos)
    weight = jnp.where(jnp.sum(weight > 0, (1, 2), keepdims=True) >= MIN_TEXELS, weight, 0.0)
    return fitted_shading(texture, normals, cues[..., :3], weight), weight


def delit_albedo(texture, geometry, mask, batch, cues, gain) -> tuple[jax.Array, jax.Array]:
    """Maps [B, R, R, 3] / [B, R, R], the portrait's `portrait_{offset, viewmat}`, its `cues`
    (`infer.refine.uv_cues`) and the data's shading level gain [3] or [B, 3]
    (`exposure_gain`) -> (the portrait's colour at each texel divided by its shading
    rescaled to that level, clipped to [0, 1], [B, R, R, 3]; how far to trust it, [B, R, R]:
    visible and facing the camera, 0 elsewhere). No gradient flows through either."""
    s, weight = portrait_light(texture, geometry, mask, batch, cues)
    seen = jnp.maximum(jnp.sum(weight, (1, 2)), 1e-6)[:, None]
    level = jnp.sum(s * weight[..., None], (1, 2)) / seen
    gain = jnp.asarray(gain, jnp.float32).reshape(-1, 1, 1, 3)
    s = s * gain / jnp.maximum(level, 1e-3)[:, None, None]
    albedo = jnp.clip(cues[..., :3] / jnp.maximum(s, 0.05), 0.0, 1.0)
    return jax.lax.stop_gradient(albedo), jax.lax.stop_gradient(weight)


def evidence_cues(texture, albedo, weight) -> jax.Array:
    """The refiner's evidence cues [B, R, R, `models.refiner.EVIDENCE_CUES`] from
    `delit_albedo`: the albedo where it is trusted (x weight), the weight, and weight x (albedo
    - texture), the update the evidence asks for."""
    w = weight[..., None]
    return jnp.concatenate([albedo * w, w, w * (albedo - texture)], -1)
