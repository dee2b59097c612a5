"""Stage `dit`: FiCA's DiT + ControlMLP texture/geometry completion model (flow matching).

NOTE: the stage's data is a synthetic latent stand-in until the DiT data issue (see
fica_jax/stages/dit.py), so these commands exercise the runtime, not FiCA training.

fica train dit --config configs/dit.py:tiny --workdir runs/dit_tiny
fica plan --config configs/dit.py:paper --mesh data=8,fsdp=8          # AOT plan, 64 chips
# paper (supplement: 28 DiT+ControlMLP blocks, ~2B params, 32x32x16 latents, patch 2, batch 128,
# 50k steps on 64 A100s): the documented default mesh is data=8 x fsdp=8 on 64 chips
fica train dit --config configs/dit.py:paper --workdir gs://BUCKET/dit
"""

from configs.common import base_config

VARIANTS = {
    # name: (model variant, latent side, control channels, CLIP dim, batch, steps, lr)
    "tiny": ("tiny", 8, 8, 32, 8, 200, 1e-3),
    "base": ("B", 32, 64, 768, 64, 50_000, 1e-4),
    "paper": ("paper", 32, 64, 768, 128, 50_000, 1e-4),
}


def get_config(arg: str = "tiny"):
    if arg not in VARIANTS:
        raise ValueError(f"unknown dit variant {arg!r}; expected one of {sorted(VARIANTS)}")
    variant, size, control, emb, batch, steps, lr = VARIANTS[arg]
    c = base_config("dit")
    m = c.model
    m.variant = variant  # fica_jax/models/dit.py VARIANTS
    m.width = m.depth = m.heads = 0  # 0: the variant's value
    m.patch = 2
    m.qk_norm = True
    m.latent_size = size  # h = w of the latent grid (512 UV -> 64x64x4 -> unshuffle 2 -> 32x32x16)
    m.latent_channels = 16
    # [I] the partial UV maps [RGB, mask, normal, vertex], each as a 3-channel image through the
    # VAE (32x32x16 per map) -> 4 x 16 channels at latent resolution.
    m.control_channels = control
    m.image_emb_dim = emb  # CLIP ViT-L/14 projected embedding
    m.p_uncond = 0.1  # condition dropout for classifier-free guidance
    m.t_mean, m.t_std, m.t_shift = 0.0, 1.0, 1.0  # logit-normal flow times (SD3)
    m.num_records = 4096  # synthetic stand-in stream (fica_jax/stages/dit.py)
    m.num_eval_records = 64

    c.data.batch_size = batch
    c.optim.lr = lr
    c.optim.schedule = "constant"  # DiT: AdamW, constant lr 1e-4, no weight decay
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = min(1000, steps // 10)
    c.train.steps = steps
    c.train.log_every = 20 if arg == "tiny" else 100
    c.train.ckpt_every = 100 if arg == "tiny" else 1000
    if arg != "tiny":
        c.optim.ema_decay = 0.9999
        c.train.compute_dtype = "bfloat16"
        c.train.remat = "full"
    if arg == "paper":
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 8, 8, 1
    return c
