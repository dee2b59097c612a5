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

The albedo evidence and its shading model are `infer.evidence`'s.

Off with `fica generate --no-transfer`; `fica eval` scores the maps before it as the ablation
row "+ refiner" and after it as FiCA (3DGS).
"""

from __future__ import annotations

import jax
import numpy as np

from fica_jax.infer.evidence import delit_albedo
from fica_jax.infer.refine import render_view, uv_cues

# The correction's Gaussian (a fraction of the map's width: 16 texels at 64), the density of
# evidence at which a texel takes all of its colour band, and the share of the evidence's own
# detail added on top. Chosen on 7 *training* identities of the demo, through the landmark-fitted
# geometry (docs/architecture.md).
SIGMA, REACH, DETAIL = 1.0 / 4, 1.0, 0.5


@jax.jit
def delit(texture, geometry, mask, batch, gain, tolerance: float = 0.01) -> dict:
    """texture, geometry [B, R, R, 3] (neutral), mask [B, R, R]; batch: the portrait's
    `portrait_{image, mask, offset, viewmat, K}` and `landmark_uv` as
    `infer.refine.render_view` reads them; gain [3] (`infer.evidence.exposure_gain`) ->
    {"albedo" [B, R, R, 3]: the portrait's colour at each texel divided by its shading,
    "weight" [B, R, R]: how far to trust it (visible and facing the camera; 0 elsewhere)}."""
    before = render_view(texture, geometry, mask, batch, "portrait")
    cues = uv_cues(geometry, mask, before, batch, tolerance)
    albedo, weight = delit_albedo(texture, geometry, mask, batch, cues, gain)
    return {"albedo": albedo, "weight": weight}


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
