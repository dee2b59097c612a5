"""The zero-shot animation protocol's tables (FiCA paper Sec. 4.2-4.4, docs/evaluation.md): the
rows of the main, ablation, portrait, UV texture and error-budget tables, the metrics and which
way each is better. The harness (`harness.py`, `texture.py`) fills these rows, the report
(`report.py`) prints them; both read them here."""

# (row key, label): the paper's main table, with the mean texture as the baseline row and
# ground-truth maps through the UPM as the pipeline's upper bound. The portrait table has the
# same rows, rendered from the portrait's own camera (view 0) instead of the dome frames.
MAIN = (("mean", "Mean texture (template geometry)"), ("mesh", "FiCA (Mesh)"),
        ("3dgs", "FiCA (3DGS)"), ("gt_upm", "GT UV maps -> UPM (upper bound)"))  # fmt: skip
# The paper's ablation (Table 3), each row adding one input to the row above; the shape fit
# (`geometry/shape_fit.py`: the DiT's geometry moved onto the portrait's landmarks) and the last
# row (`infer/transfer.py`: the portrait's de-lit colours on the texels it shows) are ours.
ABLATION = (("abl_rgb", "Partial RGB only"), ("abl_maps", "+ normal & vertex UV"),
            ("abl_emb", "+ image embedding"), ("abl_fit", "+ landmark shape fit"),
            ("abl_ref", "+ refiner"), ("3dgs", "+ visible-texel transfer"))  # fmt: skip
# The exports (`--models DIR/<name>`) the two conditioning ablations sample from.
ABLATION_DIT = {"abl_rgb": "dit-rgb", "abl_maps": "dit-maps"}
# The completed UV textures against the capture's, on the texels the portrait shows and on the
# unseen rest: every row whose maps are a texture (the mesh row shares 3dgs's maps, the ground
# truth is the reference), and the VAE's reconstruction of the ground truth, the DiT's ceiling.
UV_TEXTURE = (("mean", "Mean texture (baseline)"), ("abl_rgb", "DiT: partial RGB only"),
              ("abl_maps", "DiT: + normal & vertex UV"),
              ("abl_emb", "DiT: + image embedding (unrefined)"),
              ("abl_ref", "FiCA: DiT + refiner"),
              ("3dgs", "FiCA: + visible-texel transfer (final maps)"),
              ("vae", "GT maps through the VAE (ceiling)"))  # fmt: skip
# Where FiCA (3DGS) loses to the bound, on the dome frames, each row paired with the bound: the
# ground-truth maps through the VAE (the ceiling of any latent sample the DiT can draw), and the
# ground truth with one of FiCA's two maps in place of its own (what FiCA's geometry costs
# alone, and what its texture costs alone).
BUDGET = (("gt_upm", "GT UV maps -> UPM (upper bound)"),
          ("vae_upm", "GT maps through the VAE -> UPM (latent ceiling)"),
          ("gt_tex", "GT texture on FiCA's geometry (geometry's cost)"),
          ("gt_geo", "FiCA's texture on GT geometry (texture's cost)"),
          ("3dgs", "FiCA (3DGS)"))  # fmt: skip
# metric -> True where higher is better (PSNR, SSIM, identity cosine), False for LPIPS.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "id_csim": True,
                    "visible_psnr": True, "unseen_psnr": True}  # fmt: skip
METRICS = ("psnr", "ssim", "lpips", "id_csim")  # per rendered frame (dome frames, portrait)
UV_METRICS = ("visible_psnr", "unseen_psnr")  # per UV texture
# The renders' background, the same for every row and the ground truth.
BACKGROUND = (0.0, 0.0, 0.0)
