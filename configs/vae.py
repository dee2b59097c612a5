"""Stage `vae`: the SDXL-architecture autoencoder on UV texture + geometry maps.

fica data synth --out data/synth --identities 64 --resolution 128
fica train vae --config configs/vae.py:tiny --workdir runs/vae --config.data.dir=data/synth
# paper: the pre-trained SDXL VAE, fine-tuned at 512 (load weights with --init_from or
# fica_jax.models.vae_import.from_pretrained)
fica train vae --config configs/vae.py:paper --workdir gs://BUCKET/vae --config.data.dir=...
"""

from configs.common import apply_schedule, base_config

VARIANTS = {
    # name: (vae variant, block widths, layers per block, norm groups, uv res, batch, steps, lr)
    "tiny": ("sdxl", (16, 32, 32, 32), 1, 8, 64, 8, 300, 1e-3),
    "base": ("sdxl", (64, 128, 256, 256), 2, 32, 256, 64, 50_000, 1e-4),
    "paper": ("sdxl", (), 0, 0, 512, 128, 50_000, 1e-5),
}


def get_config(arg: str = "tiny"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown vae variant {arg!r}; expected one of {sorted(VARIANTS)}")
    variant, widths, layers, groups, res, batch, steps, lr = VARIANTS[arg]
    c = base_config("vae")
    c.model.variant = variant
    # Empty / 0 keep the variant's (SDXL) value: the paper config *is* the SDXL VAE.
    c.model.block_out_channels = widths
    c.model.layers_per_block = layers
    c.model.norm_groups = groups
    c.model.latent_channels = 0
    c.model.kl_weight = 1e-6
    # Position-map normalisation (fica_jax/models/uv_latent.py). "train_mean": positions are
    # encoded as the residual from the training split's mean neutral geometry and
    # position_extent is the residual's half-width: synthetic identities differ from the mean
    # shape by 2 mm on average (std 3.2 mm, max 31 mm): 0.015 m clips 0.2% of texels, 0.007
    # mm of error, and gives the residual 2.7x the range of a never-clipping 0.04 (the tiny VAE's
    # held-out geometry error: 1.80 mm at 0.04). Real captures vary more: set it from your
    # data. "" centres on position_center with a box half-width instead (the synthetic head
    # spans x +-0.09, y -0.18..0.13, z -0.10..0.14 m -> 0.19; 4.1 mm held-out error).
    c.model.position_reference = "train_mean"
    c.model.position_center = (0.0, -0.025, 0.02)
    half = 0.015 if arg == "tiny" else 0.06
    c.model.position_extent = (half, half, half)

    # Side of the maps the VAE trains on; larger stored maps are resampled down by nearest texel
    # (data_pipelines/transforms.py resize_uv, the position reference alike), never up.
    c.data.uv_resolution = res
    paper = arg == "paper"
    apply_schedule(c, tiny=arg == "tiny", batch=batch, steps=steps, lr=lr, warmup_cap=100,
                   bf16=paper, remat="full" if paper else "none")  # fmt: skip
    if paper:
        c.mesh.data, c.mesh.fsdp = 8, -1
    return c
