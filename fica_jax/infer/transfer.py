"""Visible-texel transfer: the portrait's own colours, de-lit, on the texels it shows (ours).

The DiT completes the UV maps from partial evidence and the refiner reconciles them with the
portrait, but neither copies what the portrait shows: at the demo's scale (21 training
identities) the DiT's texture on the texels the portrait shows stays 3.5 dB under the VAE's
reconstruction of the truth (17.5 vs 21.0 dB), and the refiner barely moves it. This step does
what texture back-projection does in mesh-based avatar pipelines (`delit`): each texel of the
final (refined) maps is posed by the portrait's expression and projected into the portrait
through its camera; where it is the visible surface (depth test against a surfel render of the
same maps, `infer.refine.uv_cues`) and faces the camera, the portrait's colour divided by the
portrait's shading is evidence of its albedo.

That evidence is not pasted texel for texel (`correction`): it lands through the generated
geometry, which is off by millimetres, so a pasted eye or brow lands beside the texture's own.
It is split into two bands. The colour band, the difference between the evidence and the
texture spread by a Gaussian normalised convolution (sigma 1/4 of the map, 16 texels at 64), is
added with a share that follows the local density of evidence: most where the portrait shows
the surface, fading over a few sigma into the unseen texels around it (the hair the portrait
shows reaches the hair beside it and behind), none beyond. The detail band, what the colour
band leaves of the difference (a brow, a fringe, an eye), is added at half strength on the
texels it comes from: whole, a misplaced feature costs more than it gives; without it the
avatar loses the features that make it look like its portrait. On the demo's 7 held-out
identities (one DiT sample each) visible / unseen texel PSNR, dome-frame PSNR and the portrait's
own view: paste 18.48 / 17.28 / 15.05 / 20.04 dB; colour band only 19.17 / 18.27 / 15.22 /
18.47; both bands 19.38 / 18.10 / 15.23 / 19.44; the refined maps without either 17.45 / 18.00
/ 15.34 (with sigma 1/16 and full share at density 0.6, the settings before the landmark shape
fit; with the fitted geometry, the wider band below scores better on the training identities).

A portrait is albedo times light; the texture is albedo. The shading is modelled per colour
channel as a linear function of the surface normal, s_c(n) = a_c + b_c . n (first-order
spherical harmonics), fitted by least squares to portrait_c ~ texture_c * s_c(n) over the visible
texels, with the maps' own texture as the albedo estimate. That fit pins the shading's shape
(which side is lit) but not its level: scaling the albedo up and the light down explains the
portrait as well, and fitting the level against a near-mean texture drags every identity's
colours to the mean. So the level is fixed by the data instead: `exposure_gain`, the mean shading
over visible texels of the training portraits (ground-truth unwrap vs ground-truth texture,
the same fit), is stored in the refiner's export, and each portrait's fitted shading is rescaled
so that its mean over the visible texels equals it. On the demo's held-out identities, with the
ground-truth unwrap, de-lit colours pasted texel for texel give 19.75 dB on the visible texels
vs 16.59 dB for the mean texture; the fitted level alone gives 17.4, the raw portrait colours
17.0.

Off with `fica generate --no-transfer`; `fica eval` scores the maps before it as the ablation
row "+ refiner" and after it as FiCA (3DGS).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.infer.refine import render_view, uv_cues
from fica_jax.render.surfels import normal_maps

MIN_TEXELS = 16  # fewer visible texels than this: the shading fit is not attempted
RIDGE = 1e-3  # Tikhonov weight on the shading fit's normal equations, relative to their trace
FACING = (0.15, 0.5)  # |cos| between normal and view ray: weight 0 below, 1 above (linear)
# The correction's Gaussian (a fraction of the map's width: 16 texels at 64), the density of
# evidence at which a texel takes all of its colour band, and the share of the evidence's own
# detail added on top. Chosen on 7 *training* identities of the demo, through the landmark-fitted
# geometry (docs/architecture.md).
SIGMA, REACH, DETAIL = 1.0 / 4, 1.0, 0.5


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


@jax.jit
def delit(texture, geometry, mask, batch, gain, tolerance: float = 0.01) -> dict:
    """texture, geometry [B, R, R, 3] (neutral), mask [B, R, R]; batch: the portrait's
    `portrait_{image, mask, offset, viewmat, K}` and `landmark_uv` as `infer.refine.render_view`
    reads them; gain [3] (`exposure_gain`) -> {"albedo" [B, R, R, 3]: the portrait's colour at
    each texel divided by its shading, "weight" [B, R, R]: how far to trust it (visible and
    facing the camera; 0 elsewhere)}."""
    before = render_view(texture, geometry, mask, batch, "portrait")
    cues = uv_cues(geometry, mask, before, batch, tolerance)
    s, weight = portrait_light(texture, geometry, mask, batch, cues)
    level = (
        jnp.sum(s * weight[..., None], (1, 2)) / jnp.maximum(jnp.sum(weight, (1, 2)), 1e-6)[:, None]
    )
    s = s * gain / jnp.maximum(level, 1e-3)[:, None, None]
    return {"albedo": jnp.clip(cues[..., :3] / jnp.maximum(s, 0.05), 0.0, 1.0), "weight": weight}


def correction(texture, albedo, weight, mask, sigma: float = SIGMA, reach: float = REACH,
               detail: float = DETAIL) -> dict:  # fmt: skip
    """One map each [R, R, 3] / [R, R]: the texture moved towards the de-lit evidence in two
    bands. Colour: the normalised convolution (`uvmaps.normalized_convolution`, sigma = `sigma`
    x the map's width) of the evidence minus that of the texture, added with a share that
    follows the local density of evidence (/ `reach`, clipped to 1; 0 beyond the filter's
    reach: untouched). Detail: `detail` x what the colour band leaves of the difference, on
    the texels the evidence comes from (x `weight`); where both are whole the result is the
    colour-corrected texture and the evidence blended at `detail`. Evidence that differs from
    the texture by a constant has no detail band -> {"texture", "weight": each texel's share of
    the colour band}."""
    from fica_jax.geometry.uvmaps import normalized_convolution

    texture, albedo, weight = (np.asarray(a, np.float32) for a in (texture, albedo, weight))
    s = sigma * texture.shape[0]
    field, density = normalized_convolution(albedo - texture, weight, s)
    share = np.clip(density / reach, 0.0, 1.0) * (np.asarray(mask) > 0.5)
    moved = share[..., None] * field + detail * weight[..., None] * (albedo - texture - field)
    out = np.where(share[..., None] > 0, np.clip(texture + moved, 0, 1), texture)
    return {"texture": out.astype(np.float32), "weight": share.astype(np.float32)}


def transfer(texture, geometry, mask, batch, gain, tolerance: float = 0.01, **bands) -> dict:
    """`delit`, then `correction` per map (`bands`: its sigma / reach / detail): the same
    arguments -> {"texture" [B, R, R, 3], "weight" [B, R, R]} (numpy)."""
    d = delit(texture, geometry, mask, batch, gain, tolerance)
    outs = [correction(*a, **bands)
            for a in zip(texture, d["albedo"], d["weight"], mask, strict=True)]  # fmt: skip
    return {k: np.stack([o[k] for o in outs]) for k in ("texture", "weight")}
