"""Image and identity quality measures with fixed, documented conventions (docs/evaluation.md):
PSNR / SSIM (`image.py`), LPIPS (`lpips.py`), ArcFace identity similarity (`arcface.py`) and the
face region they are taken on (`face.py`). Stage evals and `fica eval` both use them."""
