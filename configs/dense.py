"""Stage `dense`: the Sapiens-style dense predictor (UV coords, vertex positions, normals, mask).

fica data synth --out data/synth --identities 64 --resolution 64 --image-size 128
fica train dense --config configs/dense.py:tiny --workdir runs/dense --config.data.dir=data/synth
# paper: Sapiens-1B at 1024x768, initialised from the public checkpoint
#   (fica_jax.models.vit.load_sapiens(model, path, head=...) / --init_from a converted run)
fica train dense --config configs/dense.py:paper --workdir gs://BUCKET/dense --config.data.dir=...
"""

from configs.common import apply_schedule, base_config

VARIANTS = {
    # name: (ViT variant, image size, global batch, steps, lr)
    "tiny": ("tiny", 128, 8, 400, 1e-3),
    "base": ("0.3b", 512, 64, 50_000, 1e-4),
    "paper": ("1b", 1024, 512, 50_000, 5e-5),
}


def get_config(arg: str = "tiny"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown dense variant {arg!r}; expected one of {sorted(VARIANTS)}")
    vit, size, batch, steps, lr = VARIANTS[arg]
    c = base_config("dense")
    c.model.variant = vit
    # 0 keeps the variant's value; the CPU demo widens the 'tiny' ViT a little.
    c.model.width, c.model.depth, c.model.heads = (64, 4, 4) if arg == "tiny" else (0, 0, 0)
    c.model.head_channels = 32 if arg == "tiny" else 0
    # Patch 8 + no final upsample: the x8 deconv heads then land exactly at full resolution.
    c.model.patch, c.model.final_upsample = (8, 1) if arg == "tiny" else (0, 0)
    # A full-resolution conv branch beside the tokens (models/dense_heads.py PixelBranch); the
    # Sapiens variants have none (their checkpoints import as they are). Demo data (21 training
    # identities, 64 px), held-out UV L1 vs 0.202 for the mean map: ViT alone 0.190 after 300
    # steps, 0.182 at lr 3e-3; + 3-conv branch 0.177; + this U-Net branch 0.194 after 300 steps,
    # 0.165 after 900 (mask IoU 0.63 -> 0.70).
    c.model.pixel_branch = 16 if arg == "tiny" else 0
    # rot / cam / expr: the head-pose / expression regressor (models/pose_head.py); all three 0
    # builds no pose head. kpt > 0 adds the landmark branch (models/landmarks.py), which then
    # gives the expression; it generalises only with many identities (thousands).
    c.model.loss_weights = dict(
        uv=1.0, vtx=1.0, nrm=1.0, mask=0.5, rot=1.0, cam=1.0, expr=1.0, kpt=0.0
    )
    # Same head-space normalisation as configs/vae.py (synthetic template extents).
    c.model.position_center = (0.0, -0.025, 0.02)
    c.model.position_extent = (0.19, 0.19, 0.19)

    # UV resolution the eval unwraps at (predicted vs true maps); 0: the captures' own
    c.model.unwrap_resolution = 0
    c.data.image_size = size  # square crops; the Sapiens paper size is 1024x768
    c.data.landmarks = 68
    c.data.expression_dim = 18  # the synthetic template's blendshapes (metadata expression_dims)
    c.optim.weight_decay = 0.05 if arg != "tiny" else 1e-4
    tiny = arg == "tiny"
    return apply_schedule(c, tiny=tiny, batch=batch, steps=steps, lr=lr, warmup_cap=500,
                          remat="none" if tiny else "full")  # fmt: skip
