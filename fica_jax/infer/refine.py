"""Running the UV refiner (FiCA Sec. 2.3) on a batch: the input maps rendered from the
portrait's camera as surfels (`render_view`), both images pulled back into UV through the input
geometry (`uv_cues`), and the refiner conditioned on them (`refine`). The `refiner` stage trains
through these, and `fica generate` runs them on the DiT's maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fica_jax import sharding as shd
from fica_jax.geometry.uvmaps import sample_uv_map
from fica_jax.infer.evidence import delit_albedo, evidence_cues
from fica_jax.models.refiner import Refiner
from fica_jax.render.surfels import project_keypoints, render_surfels


def render_view(texture, geometry, mask, batch, view: str, landmarks: bool = False):
    """Neutral maps [B, R, R, 3] posed by `{view}_offset` and rendered as surfels from the
    view's camera over its background -> image [B, S, S, 3], alpha [B, S, S] (and keypoints
    [B, L, 2] with `landmarks`)."""
    img, vmask = batch[f"{view}_image"], batch[f"{view}_mask"]
    bg = img * (1.0 - vmask[..., None])
    size = img.shape[1]

    def one(tex, geo, m, off, viewmat, K, luv):
        r = render_surfels(
            tex, geo + off, viewmat[None], K[None], size, size, mask=m,
            landmark_uvs=luv if landmarks else None,
        )  # fmt: skip
        kpts = r["keypoints"][0] if landmarks else luv
        return r["image"][0], r["alpha"][0], r["depth"][0], kpts

    keys = (f"{view}_offset", f"{view}_viewmat", f"{view}_K", "landmark_uv")
    # per device's examples: the renderer's kernels are not partitioned by XLA
    render = shd.per_batch_shard(jax.vmap(one))
    image, alpha, depth, kpts = render(texture, geometry, mask, *(batch[k] for k in keys))
    out = {"image": image + (1.0 - alpha[..., None]) * bg, "alpha": alpha, "depth": depth}
    return out | ({"keypoints": kpts} if landmarks else {})


def uv_cues(geometry, mask, render, batch, tolerance: float) -> jax.Array:
    """The portrait and the input render pulled back into UV through the input geometry: each
    texel's posed position projected into the portrait camera, both images sampled there, kept
    where the texel is the visible surface (its camera depth within `tolerance` m of the
    render's expected depth) -> [B, R, R, 7] = portrait rgb, render rgb, visibility (0
    elsewhere). Gives the U-Net pixel-aligned evidence beside the cross-attention's coarse
    tokens (our addition: the paper conditions through the ViT features only)."""
    size = batch["portrait_image"].shape[1]

    def one(geo, m, off, viewmat, K, portrait, image, depth):
        posed = (geo + off).reshape(-1, 3)
        z = posed @ viewmat[2, :3] + viewmat[2, 3]
        px = project_keypoints(posed, viewmat[None], K[None])[0]
        uv = px / size  # sample_uv_map's pixel-centre convention: pixel centres at +0.5
        at = lambda img: sample_uv_map(img, uv)
        inside = jnp.all((px >= 0) & (px < size), axis=-1) & (z > 0)
        seen = inside & (jnp.abs(z - at(depth[..., None])[:, 0]) < tolerance)
        vis = (seen & (m.reshape(-1) > 0)).astype(jnp.float32)[:, None]
        cues = jnp.concatenate([at(portrait) * vis, at(image) * vis, vis], -1)
        return cues.reshape(*geo.shape[:2], 7)

    keys = ("portrait_offset", "portrait_viewmat", "portrait_K", "portrait_image")
    args = (geometry, mask, *(batch[k] for k in keys), render["image"], render["depth"])
    return jax.lax.stop_gradient(jax.vmap(one)(*args))


def refine(model: Refiner, batch, tolerance: float = 0.01) -> dict[str, jax.Array]:
    """The refiner on the batch's input maps, conditioned on the portrait, a render of the
    input maps from its camera and both pulled back into UV (`uv_cues`; with the model's
    `evidence`, then the portrait's de-lit colours, `infer.evidence.evidence_cues`, at the
    batch's `exposure_gain` [B, 3], the training portraits' shading level) -> refined texture,
    geometry [B, R, R, 3], the input render and the cues."""
    tex, geo, m = batch["input_texture"], batch["input_geometry"], batch["uv_mask"]
    before = render_view(tex, geo, m, batch, "portrait")
    cues = uv_cues(geo, m, before, batch, tolerance)
    if model.cfg.evidence:
        if "exposure_gain" not in batch:
            raise ValueError("a refiner with evidence cues needs the batch's exposure_gain")
        albedo, weight = delit_albedo(tex, geo, m, batch, cues, batch["exposure_gain"])
        cues = jnp.concatenate([cues, evidence_cues(tex, albedo, weight)], -1)
    texture, geometry = model(tex, geo, m, batch["portrait_image"], before["image"], cues)
    return {"texture": texture, "geometry": geometry, "before": before["image"], "cues": cues}
