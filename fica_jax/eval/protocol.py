"""The zero-shot animation protocol's tables (FiCA paper Sec. 4.2-4.4, docs/evaluation.md): the
rows of the main and ablation tables, the metrics and which way each is better. The harness
(`harness.py`) fills these rows, the report (`report.py`) prints them; both read them here."""

# (row key, label): the paper's main table, with the mean texture as the baseline row and
# ground-truth maps through the UPM as the pipeline's upper bound.
MAIN = (("mean", "Mean texture (template geometry)"), ("mesh", "FiCA (Mesh)"),
        ("3dgs", "FiCA (3DGS)"), ("gt_upm", "GT UV maps -> UPM (upper bound)"))  # fmt: skip
# The paper's ablation (Table 3), each row adding one input to the row above.
ABLATION = (("abl_rgb", "Partial RGB only"), ("abl_maps", "+ normal & vertex UV"),
            ("abl_emb", "+ image embedding"), ("3dgs", "+ refiner"))  # fmt: skip
# The exports (`--models DIR/<name>`) the two conditioning ablations sample from.
ABLATION_DIT = {"abl_rgb": "dit-rgb", "abl_maps": "dit-maps"}
# metric -> True where higher is better (PSNR, SSIM, identity cosine), False for LPIPS.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "id_csim": True}
METRICS = tuple(HIGHER_IS_BETTER)
# The renders' background, the same for every row and the ground truth.
BACKGROUND = (0.0, 0.0, 0.0)
