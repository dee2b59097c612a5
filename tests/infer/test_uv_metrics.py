"""`uv_metrics` (fica_jax/infer/sample.py): the visible / unseen texture PSNR of generated maps
and of the mean-texture baseline, on a hand-made batch, inside jit as the DiT stage calls it."""

import jax
import numpy as np
import pytest

from fica_jax.infer.sample import uv_metrics

R = 8


def _batch():
    gt = np.full((2, R, R, 3), 0.5, np.float32)
    mask = np.zeros((2, R, R), np.float32)
    mask[:, :, :6] = 1
    partial = np.zeros((2, R, R, 10), np.float32)
    partial[0, :4, :, 3] = 1  # identity 0: the portrait shows rows 0..3
    partial[1, :, :3, 3] = 1  # identity 1: columns 0..2
    geo = np.zeros((2, R, R, 3), np.float32)
    batch = {"uv_texture": gt, "uv_geometry": geo, "uv_mask": mask, "partial_uv": partial}
    return batch, partial[..., 3] > 0.5


def test_visible_and_unseen_keys_for_samples_and_the_mean_texture():
    batch, seen = _batch()
    off = np.where(seen[..., None], 0.0, np.array([0.1, 0.01])[:, None, None, None])
    texture = (batch["uv_texture"] + off).astype(np.float32)  # exact where seen
    base = {"mean_texture": np.full((R, R, 3), 0.4, np.float32),  # 0.1 off everywhere: 20 dB
            "mean_geometry": np.zeros((R, R, 3), np.float32)}  # fmt: skip
    out = jax.jit(lambda t, g, b: uv_metrics(t, g, b, base))(texture, batch["uv_geometry"], batch)
    assert float(out["texture_psnr_visible"]) == pytest.approx(120.0)
    # identity 0: 20 dB, identity 1: 40 dB -> their mean (not the pooled MSE's 23 dB)
    assert float(out["texture_psnr_unseen"]) == pytest.approx(30.0, abs=1e-3)
    assert float(out["baseline_texture_psnr_visible"]) == pytest.approx(20.0, abs=1e-3)
    assert float(out["baseline_texture_psnr_unseen"]) == pytest.approx(20.0, abs=1e-3)
    # an identity whose portrait shows the whole atlas has no unseen figure: left out of the mean
    batch["partial_uv"][1, ..., 3] = 1
    out = uv_metrics(texture, batch["uv_geometry"], batch, base)
    assert float(out["texture_psnr_unseen"]) == pytest.approx(20.0, abs=1e-3)
    del batch["partial_uv"]
    assert "texture_psnr_visible" not in uv_metrics(texture, batch["uv_geometry"], batch, base)
