"""Stage `dense`: fine-tune the Sapiens-style dense predictor on capture data (FiCA Sec. 2.1).

FiCA fine-tunes Sapiens-1B to predict per-pixel UV coordinates, vertex coordinates and normals
(supplement: L1 for UV and vertices, cosine similarity for normals); we add a foreground-mask head
(BCE) because unwrapping needs to know which pixels are head. The paper's augmentations (random
crop and scale, photometric distortion) are applied by the `dense` data transform.

Per-pixel targets only count inside the ground-truth mask. Vertex positions are compared after
the same centre/extent normalisation the VAE uses for geometry maps, so the loss weights do not
depend on the dataset's length unit.

Our addition, standing in for FiCA's EMOCA/SMIRK: a head-pose / expression regressor on the same
tokens (`models/pose_head.py`), trained here with `rot_l2` (squared Frobenius distance of the
Gram-Schmidt rotation to the viewmat's, = 4 (1 - cos angle)), `cam_l1` (L1 of (u, v, log s),
the head origin's image position and scale, `fica_jax.infer.pose.camera_params` of the crop's K) and
`expr_l2` (mean squared error of the blendshape weights: L1 learnt their median, ~0, and lost to
the mean in MSE). Weights `cfg.model.loss_weights.{rot, cam, expr}`; all three 0 builds no pose
head (and loads dense checkpoints from before it). The eval reports the regressor's rotation /
translation and the expression L1 / MSE against the train split's mean rotation / mean
expression (`baseline_*`); PnP from the predicted vertex map (`fica_jax.infer.pose.pose_from_vertices`)
runs outside the sharded eval step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines import transforms as T
from data_pipelines.shards import read_metadata
from fica_jax import config
from fica_jax.errors import UserError
from fica_jax.geometry.unwrap import unwrap_partial
from fica_jax.infer.pose import camera_params, pose_stats, translation_from_params
from fica_jax.models.pose_head import geodesic_deg, rotation_from_6d
from fica_jax.models.vit import VARIANTS, DensePredictor
from fica_jax.train.stage import Stage


def make_model(cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> DensePredictor:
    # Non-zero `cfg.model.{width,...,final_upsample,pixel_branch}` change the
    # named variant (the CPU demo uses a finer patch grid than Sapiens' 16).
    keys = ("width", "depth", "heads", "patch", "head_channels", "final_upsample", "pixel_branch")
    variant = config.variant(
        VARIANTS,
        cfg.model.variant,
        "model.variant",
        {k: cfg.model[k] for k in keys},
        image_size=(cfg.data.image_size, cfg.data.image_size),
        remat=cfg.train.remat,
        pose_head=_pose_on(cfg),
        expression_dim=int(cfg.data.get("expression_dim", 0)),
        landmarks=int(cfg.data.landmarks) if _landmarks_on(cfg) else 0,
    )
    return DensePredictor(variant, rngs=rngs, dtype=jnp.dtype(cfg.train.compute_dtype))


def _pose_on(cfg: ml_collections.ConfigDict) -> bool:
    w = cfg.model.loss_weights
    return any(float(w.get(k, 0.0)) > 0 for k in POSE_TERMS.values())


def _landmarks_on(cfg: ml_collections.ConfigDict) -> bool:
    return float(cfg.model.loss_weights.get("kpt", 0.0)) > 0


# loss term -> its weight's name in cfg.model.loss_weights
POSE_TERMS = {"rot_l2": "rot", "cam_l1": "cam", "expr_l2": "expr"}


def _masked_mean(x: jax.Array, m: jax.Array) -> jax.Array:
    """Mean of x [B, H, W, C] over pixels where m [B, H, W] is 1 (and over channels)."""
    return jnp.sum(x * m[..., None]) / (jnp.sum(m) * x.shape[-1] + 1e-6)


def dense_losses(
    pred: dict[str, jax.Array], batch, center: jax.Array, extent: jax.Array
) -> dict[str, jax.Array]:
    """Per-term losses. pred: uv [B,H,W,2], vtx [B,H,W,3], nrm [B,H,W,3], mask_logits [B,H,W,1]."""
    m = batch["mask"]
    norm = lambda p: (p - center) / extent
    nrm = pred["nrm"] / jnp.maximum(jnp.linalg.norm(pred["nrm"], axis=-1, keepdims=True), 1e-6)
    cos = jnp.sum(nrm * batch["nrm"], axis=-1, keepdims=True)
    logits = pred["mask_logits"][..., 0]
    bce = jnp.mean(jnp.maximum(logits, 0) - logits * m + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    return {
        "uv_l1": _masked_mean(jnp.abs(pred["uv"] - batch["uv"]), m),
        "vtx_l1": _masked_mean(jnp.abs(norm(pred["vtx"]) - norm(batch["vtx"])), m),
        "nrm_cos": _masked_mean(1.0 - cos, m),
        "mask_bce": bce,
    }


def pose_losses(pred: dict[str, jax.Array], batch) -> dict[str, jax.Array]:
    """pred: rot6d [B, 6], cam [B, 3], expression [B, E]; batch: image, K [B, 3, 3], viewmat
    [B, 4, 4], expression [B, E]."""
    hw = batch["image"].shape[1:3]
    r = rotation_from_6d(pred["rot6d"])
    return {
        "rot_l2": jnp.mean(jnp.sum((r - batch["viewmat"][:, :3, :3]) ** 2, axis=(1, 2))),
        "cam_l1": jnp.mean(jnp.abs(pred["cam"] - camera_params(batch["K"], batch["viewmat"], hw))),
        "expr_l2": jnp.mean((pred["expression"] - batch["expression"]) ** 2),
    }


def landmark_l1(pred: dict[str, jax.Array], batch) -> jax.Array:
    """Mean |predicted - true| landmark coordinate over the visible landmarks, in fractions of
    the image width (so the weight does not depend on the resolution)."""
    vis = batch["kpts_visible"]
    err = jnp.sum(jnp.abs(pred["kpts"] - batch["kpts"]), axis=-1) * vis
    return jnp.sum(err) / (2.0 * jnp.sum(vis) * batch["image"].shape[2] + 1e-6)


def _check_expression(cfg: ml_collections.ConfigDict, batch) -> None:
    got, want = batch["expression"].shape[-1], int(cfg.data.expression_dim)
    if got != want:
        raise UserError(
            f"config data.expression_dim={want} but the data in {cfg.data.dir} has {got} "
            f"expression weights per view; pass --config.data.expression_dim={got}"
        )


def make_loss(cfg: ml_collections.ConfigDict):
    w = cfg.model.loss_weights
    weights = {"uv_l1": w.uv, "vtx_l1": w.vtx, "nrm_cos": w.nrm, "mask_bce": w.mask}
    weights |= {t: float(w.get(k, 0.0)) for t, k in POSE_TERMS.items()} if _pose_on(cfg) else {}
    weights |= {"kpt_l1": float(w.get("kpt", 0.0))} if _landmarks_on(cfg) else {}
    # Zero-weight terms are neither computed nor logged, so XLA drops the heads they alone use
    # (e.g. train only the landmark branch: every other weight 0).
    weights = {k: v for k, v in weights.items() if v}
    center = jnp.asarray(cfg.model.position_center, jnp.float32)
    extent = jnp.asarray(cfg.model.position_extent, jnp.float32)

    def loss_fn(model: DensePredictor, batch, rng: jax.Array):
        del rng
        pred = model(batch["image"])
        terms = dense_losses(pred, batch, center, extent)
        if model.pose is not None:
            _check_expression(cfg, batch)
            terms |= pose_losses(pred, batch)
        if model.landmarks is not None:
            terms["kpt_l1"] = landmark_l1(pred, batch)
        terms = {k: v for k, v in terms.items() if k in weights}
        loss = sum(weights[k] * v for k, v in terms.items())
        return loss, terms

    return loss_fn


def pose_eval(pred: dict[str, jax.Array], batch, mean_expr) -> dict[str, jax.Array]:
    """The regressor's rotation error (deg), translation error (mm, solved for the batch's K) and
    expression L1 / MSE; `baseline_*`: the train split's mean expression."""
    gt_r, e = batch["viewmat"][:, :3, :3], batch["expression"]
    t = translation_from_params(pred["cam"], batch["K"], batch["image"].shape[1:3])
    return {
        "rot_deg": jnp.mean(geodesic_deg(rotation_from_6d(pred["rot6d"]), gt_r)),
        "trans_mm": 1000.0 * jnp.mean(jnp.linalg.norm(t - batch["viewmat"][:, :3, 3], axis=-1)),
        "expr_l1": jnp.mean(jnp.abs(pred["expression"] - e)),
        "baseline_expr_l1": jnp.mean(jnp.abs(mean_expr - e)),
        "expr_mse": jnp.mean((pred["expression"] - e) ** 2),
        "baseline_expr_mse": jnp.mean((mean_expr - e) ** 2),
    }


def unwrap_eval(images, pred: dict[str, jax.Array], batch, resolution: int) -> dict:
    """The predicted maps' unwrap of each image vs the ground-truth maps' unwrap of the same
    image (`fica_jax.geometry.unwrap`, what the DiT is given vs what it trains on): `coverage`
    = texels both cover / texels the truth covers, `excess` = texels only the prediction covers /
    texels it covers, `rgb_psnr` on the texels both cover."""
    unwrap = jax.vmap(lambda *a: unwrap_partial(*a, resolution))
    nrm = pred["nrm"] / jnp.maximum(jnp.linalg.norm(pred["nrm"], axis=-1, keepdims=True), 1e-6)
    mine = unwrap(images, pred["mask_logits"][..., 0] > 0, jnp.clip(pred["uv"], 0, 1), nrm,
                  pred["vtx"])  # fmt: skip
    truth = unwrap(images, batch["mask"], batch["uv"], batch["nrm"], batch["vtx"])
    got, want = mine[..., 3] > 0, truth[..., 3] > 0
    both = (got & want).astype(jnp.float32)
    err = jnp.sum(jnp.square(mine[..., :3] - truth[..., :3]) * both[..., None])
    mse = err / (3.0 * jnp.sum(both) + 1e-6)
    return {
        "unwrap_coverage": jnp.sum(both) / (jnp.sum(want) + 1e-6),
        "unwrap_excess": jnp.sum(got & ~want) / (jnp.sum(got) + 1e-6),
        "unwrap_rgb_psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10)),
    }


def make_eval(cfg: ml_collections.ConfigDict):
    """UV error on held-out identities against the best constant predictor of the same pixels
    (the per-batch mean UV of the foreground), vertex error in mm, normal angle in degrees, and
    mask IoU; the train split's mean-rotation baseline and, with the pose head, `pose_eval` against the train
    split's mean pose; `unwrap_eval` at `model.unwrap_resolution` (0: the captures')."""
    stats = pose_stats(cfg.data.dir, "train")
    unwrap_res = int(cfg.model.get("unwrap_resolution", 0)) or int(
        read_metadata(cfg.data.dir).get("uv_resolution", 0)
    )  # 0 in the config: the captures' own

    def eval_fn(model: DensePredictor, batch, rng: jax.Array):
        del rng
        pred, m = model(batch["image"]), batch["mask"]
        mean_uv = jnp.sum(batch["uv"] * m[..., None], axis=(0, 1, 2)) / (jnp.sum(m) + 1e-6)
        nrm = pred["nrm"] / jnp.maximum(jnp.linalg.norm(pred["nrm"], axis=-1, keepdims=True), 1e-6)
        cos = jnp.clip(jnp.sum(nrm * batch["nrm"], -1, keepdims=True), -1.0, 1.0)
        hit = (pred["mask_logits"][..., 0] > 0).astype(jnp.float32)
        inter, union = jnp.sum(hit * m), jnp.sum(jnp.maximum(hit, m))
        out = {
            "uv_l1": _masked_mean(jnp.abs(pred["uv"] - batch["uv"]), m),
            "baseline_uv_l1": _masked_mean(jnp.abs(mean_uv - batch["uv"]), m),
            "vtx_l1_mm": 1000.0 * _masked_mean(jnp.abs(pred["vtx"] - batch["vtx"]), m),
            "nrm_deg": _masked_mean(jnp.degrees(jnp.arccos(cos)), m),
            "mask_iou": inter / (union + 1e-6),
        }
        # PnP (`pose.pose_from_vertices`) is not solved here: inside this sharded 8-device CPU
        # eval program it hung (a futex deadlock, twice); its figures come from the model offline
        out["baseline_rot_deg"] = jnp.mean(
            geodesic_deg(stats["rotation"], batch["viewmat"][:, :3, :3])
        )
        if unwrap_res:
            out |= unwrap_eval(batch["image"], pred, batch, unwrap_res)
        if model.pose is not None:
            out |= pose_eval(pred, batch, stats["expression"])
        if model.landmarks is not None:  # mean pixel distance over the visible landmarks
            vis = batch["kpts_visible"]
            dist = jnp.linalg.norm(pred["kpts"] - batch["kpts"], axis=-1)
            out["kpt_px"] = jnp.sum(dist * vis) / (jnp.sum(vis) + 1e-6)
        return out

    return eval_fn


def batch_spec(cfg: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    b, s, n_kpts = cfg.data.batch_size, cfg.data.image_size, cfg.data.landmarks
    e = cfg.data.get("expression_dim", 0)
    f32 = jnp.float32
    return {
        "image": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "mask": jax.ShapeDtypeStruct((b, s, s), f32),
        "uv": jax.ShapeDtypeStruct((b, s, s, 2), f32),
        "vtx": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "nrm": jax.ShapeDtypeStruct((b, s, s, 3), f32),
        "kpts": jax.ShapeDtypeStruct((b, n_kpts, 2), f32),
        "kpts_visible": jax.ShapeDtypeStruct((b, n_kpts), f32),
        "view": jax.ShapeDtypeStruct((b,), jnp.int32),
        "K": jax.ShapeDtypeStruct((b, 3, 3), f32),
        "viewmat": jax.ShapeDtypeStruct((b, 4, 4), f32),
        "expression": jax.ShapeDtypeStruct((b, e), f32),
    }


BACKGROUND_P = 0.5  # share of training examples shown on a random background


def example(record: T.Record, rng: np.random.Generator, opts: T.TransformOptions) -> T.Example:
    """One random view of a capture record with its per-pixel targets and the pose regressor's:
    the crop's K (the crop changes K, never the camera's rotation or position), the view's
    viewmat and expression code. Crop / scale, a random background (`BACKGROUND_P`) and
    photometric distortion when augmenting."""
    v = int(rng.integers(record["view_image"].shape[0]))
    ex, aff = T.warp_view(record, v, rng, opts, geometric=True)
    hw = ex["mask"].shape
    for key in ("uv", "vtx", "nrm"):
        ex[key] = T.float32(T.warp_nearest(record[f"view_{key}"][v], aff, hw))
    ex["K"] = T.warp_intrinsics(T.float32(record["view_K"][v]), aff)
    ex["viewmat"] = T.float32(record["view_viewmat"][v])
    ex["expression"] = T.float32(record["view_expression"][v])
    if opts.augment:
        if rng.random() < BACKGROUND_P:
            ex["image"] = T.random_background(ex["image"], ex["mask"], rng)
        ex["image"] = T.photometric(ex["image"], rng, opts.aug)
    ex["view"] = np.int32(v)
    return ex


def fit_data(meta) -> dict:
    """Train at the captures' image size; score the unwrap at their UV resolution."""
    return {"data.image_size": int(np.ravel(meta["image_size"])[0]),
            "model.unwrap_resolution": int(meta["uv_resolution"])}  # fmt: skip


# name, sharding rule table, model, loss, data, batch spec (see fica_jax/train/stage.py).
STAGE = Stage(
    name="dense",
    rules="vit",
    make_model=make_model,
    make_loss=make_loss,
    example=example,  # over capture shards (make_data: CaptureData(example))
    batch_spec=batch_spec,
    make_eval=make_eval,
    metrics={
        "uv_l1": False,
        "vtx_l1_mm": False,
        "nrm_deg": False,
        "mask_iou": True,
        "rot_deg": False,
        "trans_mm": False,
        "expr_l1": False,
        "expr_mse": False,
        "kpt_px": False,
        "unwrap_coverage": True,
        "unwrap_excess": False,
        "unwrap_rgb_psnr": True,
    },
    fit_data=fit_data,
)
