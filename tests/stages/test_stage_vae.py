"""Stage `vae`: the autoencoder trains on UV maps through the shared loop; eval vs baseline."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.pipeline import first_batch, mean_maps
from data_pipelines.source import CaptureSource
from fica_jax.commands.main import main
from fica_jax.config import load_config
from fica_jax.errors import UserError
from fica_jax.models.uv_latent import MapStats
from fica_jax.stages import vae as vae_stage
from fica_jax.train import loop
from fica_jax.train.stage import get_stage


def _cfg(synth_dir, *extra):
    return load_config(
        "configs/vae.py:tiny",
        [
            f"--config.data.dir={synth_dir}",
            "--config.data.uv_resolution=32",
            "--config.mesh.data=2",
            "--config.mesh.fsdp=4",
            *extra,
        ],
    )


def test_downsample_upsample_keeps_constants_and_loses_detail():
    x = jnp.ones((1, 16, 16, 3)) * 0.3
    np.testing.assert_allclose(vae_stage.downsample_upsample(x, 8), x, atol=1e-6)
    checker = jnp.indices((16, 16)).sum(0) % 2 * 2.0 - 1.0
    y = vae_stage.downsample_upsample(checker[None, ..., None], 8)
    assert float(jnp.abs(y).max()) < 1e-6  # a 1-texel pattern averages away


def test_model_inputs_normalise_both_domains(synth_dir):
    cfg = _cfg(synth_dir, "--config.data.batch_size=2")
    batch = first_batch(get_stage("vae").make_data(cfg, "train", 0, 1))
    x, m = vae_stage.model_inputs(
        {k: jnp.asarray(v) for k, v in batch.items()}, vae_stage.map_stats(cfg)
    )
    assert x.shape == (4, 32, 32, 3) and m.shape == (4, 32, 32, 1)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    inside = np.asarray(m[..., 0]) > 0.5
    # geometry rows are the residual from the training mean shape over the configured extent;
    # the tiny extent clips the rarest texels only
    ref = mean_maps(synth_dir, "train")["mean_geometry"]
    want = np.clip((batch["uv_geometry"] - ref) / cfg.model.position_extent[0], -1, 1)
    geo = np.asarray(x[2:])[inside[2:]]
    np.testing.assert_allclose(geo, want[inside[2:]], atol=1e-5)
    assert (np.abs(geo) >= 1.0).mean() < 0.02
    # without a reference the configured box centres them and has margin: nothing is clipped
    box = MapStats(tuple(cfg.model.position_center), (0.19, 0.19, 0.19))
    x, _ = vae_stage.model_inputs({k: jnp.asarray(v) for k, v in batch.items()}, box)
    assert np.abs(np.asarray(x[2:])[inside[2:]]).max() < 0.95


@pytest.mark.heavy
def test_mean_shape_baseline_is_the_templates_error_against_the_clipped_ground_truth(synth_dir):
    from flax import nnx

    cfg = _cfg(synth_dir, "--config.data.batch_size=2")
    batch = first_batch(get_stage("vae").make_data(cfg, "eval", 0, 1))
    model = vae_stage.make_model(cfg, nnx.Rngs(0))
    out = vae_stage.make_eval(cfg)(model, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    # by hand: the training mean geometry against each map clipped to the residual's extent, in mm
    ref = mean_maps(synth_dir, "train")["mean_geometry"]
    half = cfg.model.position_extent[0]
    gt = ref + np.clip(batch["uv_geometry"] - ref, -half, half)
    m = np.asarray(batch["uv_mask"])[..., None]
    want = 1000.0 * np.sum(np.abs(ref - gt) * m) / (3 * m.sum())
    np.testing.assert_allclose(float(out["baseline_mean_shape_geometry_l1_mm"]), want, rtol=1e-4)
    assert want > 0.5  # identities do differ from the template by millimetres
    # every figure is a declared metric or a baseline of one, and every declared one is there
    assert {vae_stage.STAGE.metric_of(k) for k in out} == set(vae_stage.STAGE.metrics)


@pytest.mark.heavy
def test_vae_stage_trains_through_the_shared_loop(synth_dir, tmp_path):
    cfg = _cfg(
        synth_dir,
        "--config.train.steps=6",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=6",
        "--config.train.eval_every=6",
        "--config.optim.warmup_steps=1",
    )
    loop.train(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    evals = [r for r in rows if "eval/texture_psnr" in r]
    assert evals and "eval/baseline_texture_psnr" in evals[-1]
    assert (tmp_path / "checkpoints" / "6").is_dir()


def _train_cli(synth_dir, workdir, *extra):
    argv = ["train", "vae", "--config", "vae:tiny", "--workdir", str(workdir)]
    return main([*argv, f"--config.data.dir={synth_dir}", "--config.data.batch_size=8", *extra])


def test_a_uv_resolution_the_vae_or_the_data_cannot_give_is_refused_in_one_line(
    synth_dir, tmp_path, capsys
):
    """Before anything compiles: larger than the stored 32-texel maps, or not a multiple of the
    tiny VAE's downsampling factor 8."""
    for r, says in ((64, "larger than the 32x32 UV maps"), (20, "positive multiple of 8")):
        assert _train_cli(synth_dir, tmp_path / str(r), f"--config.data.uv_resolution={r}") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"data.uv_resolution={r}" in err and says in err


@pytest.mark.heavy
def test_loss_eval_and_cache_encoding_below_the_stored_resolution(synth_dir):
    """data.uv_resolution=16 over maps stored at 32 (the crash: a 32x32 position reference
    against 16x16 maps): maps and reference are resampled alike, so loss, eval and export agree;
    the latent cache's encoder, fed the records as stored, refuses that VAE in one line."""
    from flax import nnx

    from fica_jax.infer.latent_cache import encode_maps
    from fica_jax.infer.latents import VAEBundle

    cfg = _cfg(synth_dir, "--config.data.uv_resolution=16", "--config.data.batch_size=2")
    batch = first_batch(get_stage("vae").make_data(cfg, "eval", 0, 1))
    assert batch["uv_geometry"].shape == (2, 16, 16, 3)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    model = vae_stage.make_model(cfg, nnx.Rngs(0))
    loss, _ = vae_stage.make_loss(cfg)(model, batch, jax.random.key(0))
    out = vae_stage.make_eval(cfg)(model, batch, None)
    assert all(np.isfinite(float(v)) for v in (loss, *out.values()))
    _, arrays = vae_stage.export_stats(cfg)
    want = mean_maps(synth_dir, "train", resolution=16)["mean_geometry"]
    np.testing.assert_array_equal(arrays["stats.position_reference"], want)
    rec = CaptureSource(synth_dir, "train")[0]
    stored = {
        k: np.asarray(rec[k])[None] for k in ("uv_texture", "uv_geometry", "uv_mask", "partial_uv")
    }
    with pytest.raises(UserError, match=r"32x32 texels.*data.uv_resolution=16"):
        encode_maps(VAEBundle(model, vae_stage.map_stats(cfg), 1, {}), stored)


@pytest.mark.slow
def test_cli_trains_below_the_stored_resolution_and_the_cache_refuses_it(
    synth_dir, tmp_path, capsys
):
    """~2 min on 2 cores. The issue's commands at 16 over 32: `fica train vae` (2 steps, eval)
    exits 0; `fica data cache` (records as stored) exits 2 with one line."""
    run = tmp_path / "vae"
    extra = ["--config.train.steps=2", "--config.train.eval_every=2", "--config.train.ckpt_every=2"]
    assert _train_cli(synth_dir, run, "--config.data.uv_resolution=16", *extra) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert np.isfinite(rows[-1]["eval/baseline_mean_shape_geometry_l1_mm"])
    capsys.readouterr()
    cache = ["data", "cache", "--data", str(synth_dir), "--vae", str(run), "--out"]
    assert main([*cache, str(tmp_path / "cache"), "--unshuffle", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "32x32 texels" in err and "data.uv_resolution=16" in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_trained_vae_beats_the_downsample_on_texture_and_the_mean_shape_on_geometry(tmp_path):
    """~6 min on 2 cores: 64-texel maps, 24 identities, 400 steps; eval on held-out identities."""
    from data_pipelines.synth import synthesize
    from data_pipelines.synthetic.generator import SynthConfig

    data = tmp_path / "data"
    synthesize(
        data,
        24,
        SynthConfig(uv_resolution=64, image_size=64, n_frames=1),
        workers=2,
        progress=False,
    )
    cfg = load_config(
        "configs/vae.py:tiny",
        [
            f"--config.data.dir={data}",
            "--config.train.steps=400",
            "--config.train.eval_every=400",
            "--config.mesh.fsdp=-1",
        ],
    )
    last = loop.train(cfg, tmp_path / "run")
    # Observed with the demo's 300 steps at 64 texels (geometry as the residual from the training
    # mean shape): texture 20.01 dB vs 19.09 dB for the 8x downsample; geometry 1.55 mm vs 1.96 mm
    # for the mean shape. The 8x downsample of the (smooth) residual keeps 0.67 mm: the tiny VAE
    # does not beat that in 300-400 steps (stated in the demo report, not asserted).
    assert last["eval/texture_psnr"] > last["eval/baseline_texture_psnr"] + 0.5
    assert last["eval/geometry_l1_mm"] < 0.9 * last["eval/baseline_mean_shape_geometry_l1_mm"]
