"""Stage `upm`: the universal prior model (FiCA Sec. 2.4) on dome frames.

fica data synth --out data/synth_upm --identities 64 --resolution 32 --image-size 64 --frames 4
fica train upm --config configs/upm.py:tiny --workdir runs/upm --config.data.dir=data/synth_upm
# paper: 1024^2 Gaussian maps, 2048x1334 frames (RGCA); set the data dims from your captures
fica train upm --config configs/upm.py:paper --workdir gs://BUCKET/upm --config.data.dir=...
"""

from configs.common import apply_schedule, base_config

VARIANTS = {
    # name: (UPM variant, uv res, image size, cameras, global batch, steps, lr)
    "tiny": ("tiny", 32, 64, 8, 8, 300, 1e-3),
    # RGCA: Adam lr 5e-4, batch 4 per GPU, 800k iterations (goliath config/rgca_example.yml);
    # FiCA trains on 160 calibrated cameras
    "paper": ("paper", 1024, 1024, 160, 128, 800_000, 5e-4),
}


def get_config(arg: str = "tiny"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown upm variant {arg!r}; expected one of {sorted(VARIANTS)}")
    variant, res, size, cameras, batch, steps, lr = VARIANTS[arg]
    c = base_config("upm")
    c.model.variant = variant
    # empty / 0 keep the variant's sizes (fica_jax/models/upm.py VARIANTS)
    c.model.latent_dim = 0
    c.model.hidden = 0
    c.model.seed_resolution = 0
    c.model.seed_channels = 0
    c.model.channels = ()
    c.model.color_channels = ()
    c.model.encoder_channels = ()
    # per-camera colour correction, indexed by frame_view (the synthetic dome's view index)
    c.model.n_cameras = cameras
    # RGCA loss weights (goliath config/rgca_example.yml; docs/architecture.md §5)
    c.model.loss_weights = dict(
        rgb_l1=10.0, rgb_ssim=0.2, geom_l2=0.4, kl=2e-3, negcolor=1e-2, scale_bound=1e-2,
        color_l2=0.1,  # ours: keeps unseen texels' colour at the texture (fica_jax/stages/upm.py)
    )  # fmt: skip
    c.model.geometry_unit = 1e-3  # geom_l2 in mm^2 (RGCA's captures are in millimetres)
    # scale_bound (m): Gaussians larger than ~1 texel spacing are penalised (32^2: ~15 mm)
    c.model.scale_bound = 0.02 if arg == "tiny" else 0.002
    # Gaussian-tile slots of the jitted training render (0: the rasteriser's default 8N + 4096).
    # A 1024 px frame of 1024^2 Gaussians at the scale bound needs ~12M (tests/stages/test_upm.py):
    # 16 per Gaussian. Overflow is counted in the `isect_overflow` metric, never silent.
    c.model.isect_capacity = 0 if arg == "tiny" else 16 * res * res
    # identity-encoder input normalisation (synthetic head extents, as configs/dense.py)
    c.model.position_center = (0.0, -0.025, 0.02)
    c.model.position_extent = (0.19, 0.19, 0.19)
    # explicit eyeballs turned by the gaze: the template of the data's UV layout (its metadata's
    # `template.template`); "" for a layout without eyeballs (gaze then enters the decoder)
    c.model.eye_template = "fica-procedural-head-r48"

    c.data.uv_resolution = res
    c.data.image_size = size
    c.data.expression_dim = 18  # the synthetic template's blendshapes
    c.data.landmarks = 68
    return apply_schedule(c, tiny=arg == "tiny", batch=batch, steps=steps, lr=lr, warmup_cap=500,
                          ckpt_every=(100, 5000))  # fmt: skip
