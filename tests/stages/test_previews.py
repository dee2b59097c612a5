"""Each stage's preview hook (`make_sample`) writes its sheet through
`fica_jax.preview.write_step_sheet`: `WORKDIR/samples/step_XXXXXXX.png` and a TensorBoard image.
(The DiT's is in tests/stages/test_dit_cache.py, on a latent cache.)"""

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tb_events import tb_images

from data_pipelines.pipeline import first_batch
from fica_jax.config import load_config
from fica_jax.preview import LABEL_H
from fica_jax.train.stage import get_stage

EXTRA = {"upm": ["--config.data.image_size=32"], "refiner": []}


# upm: ~100 s on 2 busy cores (its three held-out renders compile), so `slow`
@pytest.mark.heavy
@pytest.mark.parametrize("name", [pytest.param("upm", marks=pytest.mark.slow), "refiner"])
def test_preview_sheet_png_and_tensorboard(name, synth_dir, tmp_path):
    cfg = load_config(
        f"configs/{name}.py:tiny",
        [f"--config.data.dir={synth_dir}", "--config.data.batch_size=2", *EXTRA[name]],
    )
    stage = get_stage(name)
    batch = first_batch(stage.make_data(cfg, "eval", 0, 1))
    model = stage.make_model(cfg, nnx.Rngs(0))
    stage.make_sample(cfg)(model, batch, None, tmp_path, 7)
    sheet = np.asarray(Image.open(tmp_path / "samples" / "step_0000007.png"))
    assert sheet.shape == (2 * (128 + LABEL_H), 5 * 128, 3)  # a row per example, 5 tiles
    assert tb_images(tmp_path / "tb") == [(7, "samples", *sheet.shape[:2])]
