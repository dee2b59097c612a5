"""Stage `refiner`: the feed-forward UV refiner (FiCA Sec. 2.3) on capture data.

fica data synth --out data/synth_ref --identities 64 --resolution 32 --image-size 32 --frames 1
fica train refiner --config configs/refiner.py:tiny --workdir runs/ref \
    --config.data.dir=data/synth_ref
# on the DiT's samples instead of corrupted ground truth (maps of both splits in one folder),
# their geometry fitted to the portraits' landmarks as `fica generate` fits it:
#   fica sample --run runs/dit --data CACHE --split train --out runs/samples \
#       --fit-shape data/synth_ref  (and --split test)
#   ... --config.model.input_source=samples --config.model.samples_dir=runs/samples/maps
# paper: 512^2 UV maps, 1024 px portraits, 50k steps at batch 128 (supplement)
fica train refiner --config configs/refiner.py:paper --workdir gs://BUCKET/ref \
    --config.data.dir=...
"""

from configs.common import apply_schedule, base_config

VARIANTS = {
    # name: (refiner variant, uv res, image size, global batch, steps, lr)
    "tiny": ("tiny", 32, 32, 8, 300, 1e-3),
    # FiCA supp.: 50k steps, effective batch 128 (32 A100s, ~2 days); the lr is ours
    "paper": ("paper", 512, 1024, 128, 50_000, 1e-4),
}


def get_config(arg: str = "tiny"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown refiner variant {arg!r}; expected one of {sorted(VARIANTS)}")
    variant, res, size, batch, steps, lr = VARIANTS[arg]
    c = base_config("refiner")
    c.model.variant = variant
    # empty / 0 keep the variant's sizes (fica_jax/models/refiner.py VARIANTS)
    c.model.channels = ()
    c.model.attn_levels = 0
    c.model.heads = 0
    c.model.groups = 0
    c.model.vit = ""
    c.model.vit_patch = 0
    # the tiny ViT starts random and must train; the paper's Sapiens backbone is frozen
    c.model.vit_trainable = arg == "tiny"
    # input maps: "corrupt" (ground truth + stages/refiner.py corrupt_maps), "samples" (DiT maps)
    # or "mix" (training: samples with probability sample_prob, else corrupt; held out: samples)
    c.model.input_source = "corrupt"
    c.model.samples_dir = ""
    c.model.sample_prob = 0.5
    # blur: max Gaussian sigma (texels); color: max per-channel gain change (offset half of
    # it); offset: std-dev (m) of the low-frequency geometry offset field; shift (m, per axis)
    # and scale (relative): std-devs of the whole head's misalignment with its portrait (a
    # generator's maps are plausible but not aligned; aligning them is the refiner's job).
    # Measured at 32 px (5 held-out synthetic identities, seed 1): the ground-truth maps' own
    # keypoint error is 0.45 px (landmark UVs found at pixel precision), the offset field alone
    # gives 0.88 px (which 400 steps did not improve: 0.813 vs 0.812 px), with this shift and
    # scale 1.38 px, which the refiner cuts by 15 % (tests/stages/test_refiner.py, held-out test)
    c.model.corruption = dict(blur=1.5, color=0.15, offset=0.01, shift=0.015, scale=0.05)
    # a texel counts as seen in the portrait when its camera depth is within this (m) of the
    # input render's depth (`stages/refiner.py` uv_cues; ~1 texel spacing at 32^2)
    c.model.visibility_tolerance = 0.01 if arg == "tiny" else 0.003
    # the portrait's de-lit colours as 7 more cues, with a zero-initialised path straight to the
    # texture update (models/refiner.py `evidence`, infer/evidence.py). Measured at demo scale
    # (docs/architecture.md "What the refiner learns at this scale"); at paper scale untested.
    c.model.evidence = True
    # `fica generate` fits the DiT's geometry to the portrait's landmarks in the training
    # identities' shape space (fica_jax/geometry/shape_fit.py) and keeps this share of its part
    # outside that space: at demo scale that part is noise (0, measured there); at paper scale
    # the DiT's geometry should carry detail a few components cannot (1, unmeasured)
    c.model.shape_fit_residual = 0.0 if arg == "tiny" else 1.0
    # the photometric loss renders the texture under the portrait's fitted shading
    # (stages/refiner.py portrait_shading): the texture stays albedo
    c.model.shaded_photo = True
    # FiCA supp.: 2.0 photo + 0.5 mask + 0.01 keypoints + 1.0 reg (reg's parts are ours). Both
    # photo and reg_texture are L1 means, over pixels and texels: with ~1 portrait pixel per
    # visible texel (tiny: 32 px, 32^2 UV) a texel's photo gradient is about its texture
    # regulariser's, so L1's kink pins the texture at its input; the paper's 1024 px portraits
    # over 512^2 maps give ~4x more pixels per texel. tiny weights the texture term down by 10,
    # and the keypoint term (pixels) up by the portrait-size ratio 1024 / 32, so a misalignment
    # costs what it costs at the paper's resolution.
    tiny = arg == "tiny"
    c.model.loss_weights = dict(
        photo=2.0, mask=0.5, kpts=0.01 * (1024 / 32 if tiny else 1.0), reg=1.0,
        reg_texture=0.1 if tiny else 1.0, reg_laplacian=1.0, reg_normal=1.0,
    )  # fmt: skip
    # geometry normalisation of the U-Net input (synthetic head extents, as configs/upm.py)
    c.model.position_center = (0.0, -0.025, 0.02)
    c.model.position_extent = (0.19, 0.19, 0.19)

    c.data.uv_resolution = res
    c.data.image_size = size
    c.data.landmarks = 68
    return apply_schedule(c, tiny=tiny, batch=batch, steps=steps, lr=lr, warmup_cap=500,
                          ckpt_every=(100, 5000), eval_every=(100, 5000))  # fmt: skip
