"""Untrained but complete model runs of every stage, checkpointed on the 8-device fake mesh
(data=2 x fsdp=4) exactly as the train loop writes them, over one real latent cache: the
fixture of the export and `fica generate` tests (plumbing and exactness, not quality; the demo
trains them for real)."""

import jax

from data_pipelines.latents import cache_metadata
from fica_jax import sharding as shd
from fica_jax.config import load_config
from fica_jax.export.model_export import param_names
from fica_jax.latent_cache import build_cache
from fica_jax.train.checkpoint import Checkpointer
from fica_jax.train.stage import get_stage
from fica_jax.train.step import build

STAGES = ("vae", "dense", "dit", "refiner", "upm")
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]
SIZE = 32  # UV texels and image pixels


def _overrides(name, data_dir, meta=None):
    extra = [f"--config.data.dir={data_dir}", *MESH]
    if name == "dit":
        extra += [f"--config.model.latent_size={meta['grid']}",
                  f"--config.model.latent_channels={meta['token_channels']}",
                  f"--config.model.image_emb_dim={meta['image_emb_dim']}"]  # fmt: skip
    if name in ("vae", "upm", "refiner"):
        extra.append(f"--config.data.uv_resolution={SIZE}")
    if name in ("dense", "refiner", "upm"):
        extra.append(f"--config.data.image_size={SIZE}")
    return extra


def checkpoint(name, cfg, run, *, noise: float = 0.01, step: int = 3) -> dict:
    """Sharded init (+ `noise` so zero-initialised heads are not trivially equal), saved with
    the loop's Checkpointer and state layout -> {dotted name: host array}."""
    mesh = shd.make_mesh(dict(cfg.mesh))
    state = build(cfg, get_stage(name), mesh).init()
    if noise:
        leaves, treedef = jax.tree.flatten(state["params"])
        keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
        noisy = [
            jax.device_put(p + noise * jax.random.normal(k, p.shape, p.dtype), p.sharding)
            for p, k in zip(leaves, keys, strict=True)
        ]
        state["params"] = jax.tree.unflatten(treedef, noisy)
    specs = {str(p.sharding.spec) for p in jax.tree.leaves(state["params"])}
    assert any("fsdp" in s for s in specs), f"{name}: nothing was sharded ({specs})"
    ckpt = Checkpointer(run, cfg)
    ckpt.save(step, state, None)
    ckpt.close()
    (run / "config.json").write_text(cfg.to_json())
    return {n: jax.device_get(v) for n, _, v in param_names(state["params"])}


def pipeline_runs(root, synth_dir) -> tuple[dict, object]:
    """{stage: (run dir, params)} and the latent cache (built from the vae + dense runs)."""
    runs = {}
    for name in ("vae", "dense"):
        cfg = load_config(f"{name}:tiny", _overrides(name, synth_dir))
        # the dense predictor keeps its init (no noise): its mask head then covers the portrait
        runs[name] = (root / name, checkpoint(name, cfg, root / name, noise=0.01 * (name == "vae")))
    cache = build_cache(synth_dir, runs["vae"][0], root / "cache", dense_run=runs["dense"][0],
                        unshuffle=1)  # fmt: skip
    meta = cache_metadata(cache)
    for name in ("dit", "refiner", "upm"):
        data = cache if name == "dit" else synth_dir
        cfg = load_config(f"{name}:tiny", _overrides(name, data, meta))
        runs[name] = (root / name, checkpoint(name, cfg, root / name))
    return runs, cache
