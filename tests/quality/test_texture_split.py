"""`visible_unseen_psnr` (fica_jax/quality/image.py) on hand-made UV maps with known answers:
which texels each figure reads, how it pools (per example, over texels and channels), the
120 dB cap of an exact match, NaN for an empty selection, and the batched form."""

import jax.numpy as jnp
import numpy as np
import pytest

from fica_jax.quality.image import visible_unseen_psnr

R = 8


def _maps():
    """Atlas: columns 0..5; visible: rows 0..3 (and a visible strip outside the atlas, which must
    not count). The prediction is exact on atlas & visible, 0.1 off on atlas & ~visible, and
    0.9 off outside the atlas."""
    gt = np.full((R, R, 3), 0.05, np.float32)
    atlas = np.zeros((R, R), np.uint8)
    atlas[:, :6] = 1
    visible = np.zeros((R, R), np.float32)
    visible[:4] = 1.0
    pred = gt + 0.1 * (atlas[..., None] == 1) * (visible[..., None] < 0.5)
    pred = np.where(atlas[..., None] == 1, pred, gt + 0.9).astype(np.float32)
    return pred, gt, atlas, visible


def test_known_values_and_masks_respected():
    pred, gt, atlas, visible = _maps()
    vis, unseen = visible_unseen_psnr(*(jnp.asarray(x) for x in (pred, gt, atlas, visible)))
    assert vis.shape == () and unseen.shape == ()
    assert float(vis) == pytest.approx(120.0)  # exact: the MSE floor 1e-12
    assert float(unseen) == pytest.approx(20.0, abs=1e-4)  # 10 log10(1 / 0.1^2)
    # the error on one channel of half the unseen texels: MSE over texels *and* channels
    p = gt.copy()
    p[4:6, :6, 0] += 0.2  # 12 of the 24 unseen texels, channel 0
    _, unseen = visible_unseen_psnr(jnp.asarray(p), gt, atlas, visible)
    assert float(unseen) == pytest.approx(10 * np.log10(1 / (0.04 * 12 / 72)), abs=1e-4)
    # an error on visible texels moves only the visible figure
    p = gt.copy()
    p[:4, :6] += 0.01
    vis, unseen = visible_unseen_psnr(jnp.asarray(p), gt, atlas, visible)
    assert float(vis) == pytest.approx(40.0, abs=1e-3) and float(unseen) == pytest.approx(120.0)


def test_batched_per_example_and_empty_selection_is_nan():
    pred, gt, atlas, visible = _maps()
    pred2 = gt + 0.01 * (atlas[..., None] == 1)  # 40 dB on every atlas texel
    preds = jnp.asarray(np.stack([pred, pred2]))
    gts = jnp.asarray(np.stack([gt, gt]))
    # 2-D masks broadcast over the batch; per example, not pooled
    vis, unseen = visible_unseen_psnr(preds, gts, atlas, visible)
    np.testing.assert_allclose(np.asarray(vis), [120.0, 40.0], atol=1e-3)
    np.testing.assert_allclose(np.asarray(unseen), [20.0, 40.0], atol=1e-3)
    # batched masks: the second example's portrait shows nothing -> visible NaN, unseen = atlas
    vis_b = np.stack([visible, np.zeros_like(visible)])
    vis, unseen = visible_unseen_psnr(preds, gts, np.stack([atlas, atlas]), vis_b)
    assert float(vis[0]) == pytest.approx(120.0) and np.isnan(float(vis[1]))
    np.testing.assert_allclose(np.asarray(unseen), [20.0, 40.0], atol=1e-3)
    # everything visible: the unseen figure is NaN, not inf and not an error
    _, unseen = visible_unseen_psnr(preds, gts, atlas, np.ones((R, R)))
    assert np.isnan(np.asarray(unseen)).all()
