"""Reading a latent cache back for `fica sample`: every held-out identity once, in order."""

import numpy as np
from latent_fixture import write_synthetic_cache

from configs import dit as dit_configs
from fica_jax.infer.latents import held_out_batches


def test_held_out_batches_cover_the_split_once_and_leave_the_config_alone(tmp_path):
    cache = write_synthetic_cache(tmp_path / "cache", n_train=4, n_test=6)
    cfg = dit_configs.get_config("tiny")
    with cfg.unlocked():
        cfg.data.dir, cfg.data.batch_size = str(cache), 4
    cfg.lock()
    before = cfg.to_dict()
    batches = list(held_out_batches(cfg, "test"))
    # 6 identities in batches of 3, the largest divisor of 6 up to the config's 4
    assert [len(b["tex_latent"]) for b in batches] == [3, 3]
    assert np.isfinite(np.concatenate([b["tex_latent"] for b in batches])).all()
    assert cfg.to_dict() == before and cfg.data.batch_size == 4
