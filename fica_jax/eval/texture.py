"""`fica eval`'s UV texture table: where a completed texture loses the identity (FiCA Sec. 2.2).

Per held-out identity, each row's UV texture (`protocol.UV_TEXTURE`) against the capture's
ground truth on two sets of texels of the atlas (`uv_mask`): those the portrait shows (the
record's ground-truth unwrap of view 0, `partial_uv[..., 3]` > 0.5) and the unseen rest, which
the generator has to invent (`fica_jax.quality.image.visible_unseen_psnr`). Beside them the
mean training texture on the same texels, and the exported VAE's reconstruction of the ground
truth (encoded and decoded as the DiT's latent cache and sampler do: the ceiling of any DiT
sample). The frames and portrait tables are rendered in `harness.py`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fica_jax.eval.protocol import UV_TEXTURE


def vae_maps(rec, models) -> tuple[np.ndarray, np.ndarray]:
    """The record's ground-truth UV texture and geometry through the exported VAE (posterior
    mean, the DiT's latent statistics and packing) -> ([R, R, 3] in [0, 1], [R, R, 3])."""
    from fica_jax.infer.generate import vae_bundle
    from fica_jax.infer.latent_cache import encode_maps
    from fica_jax.infer.sample import decode

    vae = vae_bundle(models)
    keys = ("uv_texture", "uv_geometry", "uv_mask", "partial_uv")
    batch = {k: np.asarray(rec[k])[None] for k in keys}
    z = encode_maps(vae, batch)
    mask = jnp.asarray(batch["uv_mask"], jnp.float32)
    tex, geo = decode(vae.model, vae.stats, vae.unshuffle, z["tex_mean"], z["geo_mean"], mask)
    return np.asarray(tex[0]), np.asarray(geo[0])


def texture_rows(rec, maps: dict[str, dict]) -> list[dict]:
    """One `uv_texture` metrics row per UV_TEXTURE method in `maps` (the VAE ceiling is
    `maps["vae_upm"]`, `vae_maps`):
    {identity, table, method, visible_psnr, unseen_psnr} (NaN where the selection is empty)."""
    from fica_jax.quality.image import visible_unseen_psnr

    gt = np.asarray(rec["uv_texture"], np.float32) / 255.0
    atlas = np.asarray(rec["uv_mask"], np.float32)
    seen = np.asarray(rec["partial_uv"], np.float32)[..., 3]
    tex = {k: maps[k]["texture"] for k, _ in UV_TEXTURE if k in maps}
    tex["vae"] = maps["vae_upm"]["texture"]
    rows = []
    for method, t in tex.items():
        vis, unseen = visible_unseen_psnr(jnp.asarray(t, jnp.float32), gt, atlas, seen)
        rows.append({"identity": str(rec["identity"]), "table": "uv_texture", "method": method,
                     "visible_psnr": float(vis), "unseen_psnr": float(unseen)})  # fmt: skip
    return rows
