"""Stage `dit`: FiCA's DiT + ControlMLP texture/geometry completion model (flow matching).

fica data cache --data data/synth --vae runs/vae --dense runs/dense --out data/latents
fica train dit --config configs/dit.py:tiny --workdir runs/dit_tiny --config.data.dir=data/latents
fica sample --run runs/dit_tiny --data data/latents --out samples/
fica plan --config configs/dit.py:paper --mesh data=2,fsdp=32 --topology v5p:4x4x4   # 64 chips
# paper (supplement: 28 DiT+ControlMLP blocks, ~2B params, 32x32x16 latents, patch 2, batch 128,
# 50k steps on 64 A100s): the default mesh is data=2 x fsdp=32 on 64 chips (docs/architecture.md
# §9: the best of 8x8, 4x16, 2x32 and 1x64 in the TPU-compiled plan)
fica train dit --config configs/dit.py:paper --workdir gs://BUCKET/dit
"""

from configs.common import apply_schedule, base_config

VARIANTS = {
    # name: (model variant, latent grid side G, latent channels C, embedding dim, batch, steps, lr)
    "tiny": ("tiny", 8, 4, 64, 8, 300, 1e-3),
    "base": ("B", 32, 16, 768, 64, 50_000, 1e-4),
    "paper": ("paper", 32, 16, 768, 128, 50_000, 1e-4),
    # 1024 tokens: 512x512 UV maps -> 64x64x4 latents *without* the unshuffle, patch 2 -> 32x32
    # tokens (a latent cache built with unshuffle 1); control = 4 maps x 4 channels at 64x64.
    "paper1024": ("paper", 64, 4, 768, 128, 50_000, 1e-4),
}


# Paper Table 2's conditioning ablations, as `VARIANT-ABLATION` (e.g. `dit:tiny-rgb`); `fica
# generate` / `fica eval` look for their exports beside the full model as `dit-rgb/`, `dit-maps/`.
ABLATIONS = {
    "rgb": (("rgb", "mask"), False),  # partial RGB only
    "maps": (("rgb", "mask", "nrm", "vtx"), False),  # + normal & vertex UV maps
    # the full model (+ image embedding) is the plain variant; + refiner is a separate stage
}


def get_config(arg: str = "tiny"):
    arg, _, ablation = arg.partition("-")
    if arg not in VARIANTS:
        raise ValueError(f"unknown dit variant {arg!r}; expected one of {sorted(VARIANTS)}")
    if ablation and ablation not in ABLATIONS:
        raise ValueError(f"unknown dit ablation {ablation!r}; expected one of {sorted(ABLATIONS)}")
    variant, size, channels, emb, batch, steps, lr = VARIANTS[arg]
    c = base_config("dit")
    m = c.model
    m.variant = variant  # fica_jax/models/dit.py VARIANTS
    m.width = m.depth = m.heads = 0  # 0: the variant's value
    m.patch = 2
    m.qk_norm = True
    m.latent_size = size  # h = w of the latent grid (512 UV -> 64x64x4 -> unshuffle 2 -> 32x32x16)
    m.latent_channels = channels  # C of the cache's packed latents (tiny: 64 UV -> 8x8x4)
    # [I] the partial UV maps [rgb, mask, nrm, vtx], each as a 3-channel image through the VAE
    # (C channels per map at latent resolution). Ablations (paper Table 2): ("rgb", "mask") is
    # "partial RGB only"; all four adds normal + vertex; use_image_emb adds the embedding.
    m.control_maps = ("rgb", "mask", "nrm", "vtx")
    # How they reach the model: "latents" = each map through the VAE (C channels per map at
    # latent resolution); "pixels" = the normalised maps space-to-depth onto the latent grid
    # ((R / G)^2 x 10 channels: every seen texel intact); "pooled" = each latent cell's mean over
    # the texels the portrait saw (10 channels). Demo data, ground-truth unwrap, 21 training
    # identities, 600 steps, held-out texture PSNR (mean texture 15.05 dB; visible texels 16.41):
    # latents 14.18 (visible 13.70), pixels 14.62 (14.52), pixels concatenated 13.92 (it
    # memorises), pooled concatenated 15.21 (16.07); 1500 steps 15.20 (overfits: eval loss 1.5).
    m.control_input = "pooled" if arg == "tiny" else "latents"
    m.uv_resolution = 0  # the cache's (fit_data); needed by "pixels"
    # the control also concatenated to the noisy latent (models/dit.py DiTConfig.control_concat)
    m.control_concat = arg == "tiny"
    m.use_image_emb = True
    m.image_emb_dim = emb  # CLIP ViT-L/14 projected embedding (tiny: the dense ViT's pooled 64)
    m.p_uncond = 0.1  # condition dropout for classifier-free guidance
    # Conditioning augmentation: training-time Gaussian noise on the image embedding, x its RMS.
    # tiny: its embedding (the dense ViT's pooled features of a few dozen training identities)
    # names the identity, and the DiT memorises through it (the previous 24-identity demo, 3
    # held out x 4 samples: the "+ image embedding" row 13.58 dB at 0, 14.07 at 0.5, vs 14.63
    # without the embedding; higher noise only drowns it).
    m.emb_noise = 0.5 if arg == "tiny" else 0.0
    m.t_mean, m.t_std, m.t_shift = 0.0, 1.0, 1.0  # logit-normal flow times (SD3)
    # Held-out sampling (eval + previews): the cache's VAE run decodes; "" = the one the cache
    # names. eval_steps Euler steps with guidance cfg_scale (1 = unguided).
    m.vae = ""
    m.eval_steps = 50
    m.cfg_scale = 1.0
    # Starting-noise scale of those samples (infer/sample.py), (texture, geometry). 1 draws
    # from the model's distribution; lower moves a sample towards the conditional mean, which
    # a PSNR rewards. Demo DiT (21 training identities, 600 steps), its 7 held-out identities,
    # texture PSNR on visible / unseen texels (mean texture 16.59 / 17.31) and geometry L1 (mean
    # geometry 2.20 mm): T=1 13.97 / 14.77, 2.89 mm; 0.75 15.21 / 16.01, 2.78; 0.5 16.22 / 17.02,
    # 2.77; 0.25 16.95 / 17.69, 2.96; 0.1 17.29 / 17.92, 3.47; 0 17.47 / 18.01, 3.49 mm.
    m.temperature = (0.0, 0.5) if arg == "tiny" else (1.0, 1.0)

    if ablation:
        m.control_maps, m.use_image_emb = ABLATIONS[ablation]

    c.optim.schedule = "constant"  # DiT: AdamW, constant lr 1e-4, no weight decay
    c.optim.weight_decay = 0.0
    c.optim.ema_decay = 0.99 if arg == "tiny" else 0.9999
    # Chosen by `fica plan`'s memory and hardware/model FLOP figures (docs/architecture.md §9,
    # benchmarks/results/plan_dit_paper*.json): paper keeps every matmul output (no recompute,
    # 3.7 GB/chip on v5p-64 at 2x32 in the TPU compiler's memory analysis); paper1024's
    # attention logits are 16x larger, so it keeps the weight matmuls' outputs and recomputes
    # attention.
    remat = {"tiny": "none", "paper": "dots_saveable",
             "paper1024": "dots_with_no_batch_dims_saveable"}.get(arg, "full")  # fmt: skip
    apply_schedule(c, tiny=arg == "tiny", batch=batch, steps=steps, lr=lr, warmup_cap=1000,
                   log_every=(20, 100), remat=remat)  # fmt: skip
    if arg == "paper":  # optimizer + EMA sharded 32 ways; fsdp=64 doubles the collective bytes
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 32, 1
    if arg == "paper1024":  # 16 chips; two microbatches of 64 keep activations < 28 GB/chip
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 1
        c.train.grad_accum = 2
    return c
