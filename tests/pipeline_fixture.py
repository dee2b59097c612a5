"""Untrained but complete model runs of every stage, checkpointed on the 8-device fake mesh
(data=2 x fsdp=4) exactly as the train loop writes them, over one real latent cache: the
fixture of the export and `fica generate` tests (plumbing and exactness, not quality; the demo
trains them for real)."""

import os
import pathlib
import subprocess
import sys

import jax

from data_pipelines.latents import cache_metadata
from fica_jax import sharding as shd
from fica_jax.config import load_config
from fica_jax.export.model_export import param_names
from fica_jax.infer.latent_cache import build_cache
from fica_jax.train.checkpoint import Checkpointer
from fica_jax.train.stage import get_stage
from fica_jax.train.step import build

STAGES = ("vae", "dense", "dit", "refiner", "upm")
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]
SIZE = 32  # UV texels and image pixels
REPO = pathlib.Path(__file__).resolve().parents[1]


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
    """{stage: (run dir, params)} and the latent cache (built from the vae + dense runs); also
    `dit-rgb`, the "partial RGB only" ablation (configs/dit.py ABLATIONS)."""
    runs = {}
    for name in ("vae", "dense"):
        cfg = load_config(f"{name}:tiny", _overrides(name, synth_dir))
        # the dense predictor keeps its init (no noise): its mask head then covers the portrait
        runs[name] = (root / name, checkpoint(name, cfg, root / name, noise=0.01 * (name == "vae")))
    cache = build_cache(synth_dir, runs["vae"][0], root / "cache", dense_run=runs["dense"][0],
                        unshuffle=1)  # fmt: skip
    meta = cache_metadata(cache)
    for name in ("dit", "refiner", "upm", "dit-rgb"):
        stage = name.split("-")[0]
        data = cache if stage == "dit" else synth_dir
        spec = f"dit:tiny-{name[4:]}" if name.startswith("dit-") else f"{name}:tiny"
        cfg = load_config(spec, _overrides(stage, data, meta))
        runs[name] = (root / name, checkpoint(stage, cfg, root / name))
    return runs, cache


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def export_all(root, runs) -> str:
    """Every run exported by ONE 1-device process (`fica export`; f32, and bf16 for the five
    stages) into root/x_NAME_DTYPE; root/models/NAME links the f32 ones. -> its stdout."""
    script = "import sys; from fica_jax.commands.main import main\n"
    for name, (run, _) in runs.items():
        for dt in ("float32", "bfloat16") if name in STAGES else ("float32",):
            args = [
                "export",
                "--run",
                str(run),
                "--out",
                str(root / f"x_{name}_{dt}"),
                "--dtype",
                dt,
            ]
            script += f"assert main({args!r}) == 0\n"
    script += "import jax; assert jax.device_count() == 1, jax.devices()\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], env=_env(1), cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "models").mkdir()
    for name in runs:
        os.symlink(root / f"x_{name}_float32", root / "models" / name)
    return proc.stdout
