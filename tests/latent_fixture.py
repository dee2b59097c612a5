"""A synthetic latent cache for DiT stage tests that need no VAE: records in the real cache
format (`data_pipelines/latents.py`) whose conditions predict their targets, so a few steps of
training visibly learn. Not a FiCA result; `tests/stages/test_dit_cache.py` covers the real path."""

import numpy as np

from data_pipelines import latents as L
from data_pipelines.shards import DatasetWriter


def write_synthetic_cache(out, *, n_train=32, n_test=4, grid=8, channels=4, emb=64, uv=16):
    fixed = np.random.default_rng(1234)
    mix = fixed.standard_normal((channels, channels)) / np.sqrt(channels)
    proj = fixed.standard_normal((channels, emb)) / np.sqrt(channels)
    info = {
        "vae": {"path": "", "step": 0, "fingerprint": "synthetic"},
        "dense": None,
        "control_source": "synthetic",
        "embedding": "synthetic",
        "control_groups": list(L.CONTROL_GROUPS),
        "latent_scale": 1.0,
        "map_stats": {},
        "unshuffle": 1,
    }
    dims = {"grid": grid, "token_channels": channels, "image_emb_dim": emb, "uv_resolution": uv}
    with DatasetWriter(out, kind=L.FORMAT, version=L.VERSION, info=info) as w:
        for i in range(n_train + n_test):
            rng = np.random.default_rng(i)
            low = rng.standard_normal((grid // 4, grid // 4, channels))
            tex = np.kron(low, np.ones((4, 4, 1))) + 0.1 * rng.standard_normal(
                (grid, grid, channels)
            )
            geo = 0.7 * tex @ mix + 0.3 * rng.standard_normal((grid, grid, channels))
            mask = (rng.uniform(size=(grid, grid, 1)) > 0.4).astype(np.float64)
            control = np.concatenate(
                [tex * mask, np.repeat(mask, channels, -1), geo * mask, geo], -1
            )
            split = "train" if i < n_train else "test"
            rec = {
                "identity": np.asarray(f"syn-{i:04d}"),
                "split": np.asarray(split),
                "view": np.int32(0),
                "tex_mean": tex,
                "tex_std": np.full_like(tex, 0.05),
                "geo_mean": geo,
                "geo_std": np.full_like(geo, 0.05),
                "control": control,
                "image_emb": np.tanh(tex.mean((0, 1)) @ proj),
                "uv_texture": np.zeros((uv, uv, 3), np.uint8),
                "uv_geometry": np.zeros((uv, uv, 3), np.float32),
                "uv_mask": np.ones((uv, uv), np.uint8),
                "partial_uv": np.zeros((uv, uv, 10), np.float16),
                # the control at UV resolution: the latent-grid control upsampled (groups rgb 3,
                # mask 1, nrm 3, vtx 3 from the first channels of each latent group)
                "control_maps": np.kron(
                    np.concatenate(
                        [
                            control[..., :3],
                            control[..., channels : channels + 1],
                            control[..., 2 * channels : 2 * channels + 3],
                            control[..., 3 * channels : 3 * channels + 3],
                        ],
                        -1,
                    ),
                    np.ones((uv // grid, uv // grid, 1)),
                ).astype(np.float16),  # fmt: skip
            }
            w.add_encoded(split, dims, L.encode(rec), f"syn-{i:04d}", f"synthetic {i}")
        w.write_file(L.BASELINES_FILE, b"")
    return out
