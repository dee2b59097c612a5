"""`fica export`: checkpoints written on the 8-device fake mesh (data=2 x fsdp=4) export in a
1-device process, for every model stage, and reload into the JAX model bit-for-bit (f32)."""

import json
import os
import shutil

import numpy as np
import pytest

from fica_jax.commands.main import main
from fica_jax.errors import UserError
from fica_jax.export.model_export import load_exported, param_names, read_export
from tests.pipeline_fixture import STAGES


@pytest.fixture(scope="module")
def exported(pipeline):
    return pipeline["root"], pipeline["runs"], pipeline["stdout"]


def _flat(pure):
    return {n: leaf for n, _, leaf in param_names(pure)}


@pytest.mark.parametrize("name", STAGES)
def test_export_from_the_8_device_mesh_reloads_bit_for_bit(exported, name):
    root, trained, stdout = exported
    assert f"exported {name} step 3" in stdout
    cfg, model, stats, meta = load_exported(root / f"x_{name}_float32", stage=name)
    from flax import nnx

    got = {n: np.asarray(v) for n, v in _flat(nnx.state(model, nnx.Param).to_pure_dict()).items()}
    want = trained[name][1]
    assert set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and np.array_equal(got[n], want[n]), n
    assert meta["stage"] == name and meta["source"]["step"] == 3
    assert meta["dtypes"]["stored"] == "float32" and meta["fica_jax_version"]
    assert meta["parameters"] == sum(v.size for v in want.values())
    assert meta["architecture"], "the model's config dataclass is recorded"
    if name == "vae":  # positions centred on the training mean shape: the map travels along
        assert stats["position_reference"].shape == (32, 32, 3)
        assert meta["stats"]["map_stats"]["reference_digest"]
    if name == "dit":  # the cache's latent statistics, UV layout and baselines travel along
        assert meta["stats"]["latent_scale"] > 0 and meta["stats"]["grid"] == 4
        assert stats["uv_mask"].shape == (32, 32) and stats["mean_texture"].shape == (32, 32, 3)

    # bf16: the same values rounded to bf16 (stored as BF16 in the file)
    _, arrays = read_export(root / f"x_{name}_bfloat16")
    import ml_dtypes

    for n in list(want)[:20]:
        assert arrays[n].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(arrays[n], want[n].astype(ml_dtypes.bfloat16))


def test_export_bad_inputs_are_one_line(exported, tmp_path, capsys):
    root, trained, _ = exported
    assert main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json" in err[0]
    run = trained["upm"][0]
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "o"), "--step", "9"]) == 2
    assert "holds steps [3]" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "o"), "--ema"]) == 2
    assert "EMA" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*")), "nothing half-written"
    with pytest.raises(UserError, match="stage 'vae', expected 'upm'"):
        load_exported(root / "x_vae_float32", stage="upm")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.json").write_text(json.dumps({"format": "fica-export", "version": 99}))
    with pytest.raises(UserError, match="v99"):
        read_export(bad)


# ----------------------------------------------------------------------------- fica generate
@pytest.fixture(scope="module")
def models_dir(pipeline):
    return pipeline["models"]


@pytest.fixture(scope="module")
def portrait(synth_dir, tmp_path_factory):
    """A held-out identity's portrait as a PNG and its camera/expression as a --pose JSON."""
    from PIL import Image

    from data_pipelines.pipeline import open_source

    rec = open_source(synth_dir, "test")[0]
    d = tmp_path_factory.mktemp("portrait")
    Image.fromarray(np.asarray(rec["view_image"][0])).save(d / "portrait.png")
    pose = {"image_size": list(rec["view_image"].shape[1:3]), "K": rec["view_K"][0].tolist(),
            "viewmat": rec["view_viewmat"][0].tolist(),
            "expression": rec["view_expression"][0].tolist()}  # fmt: skip
    (d / "pose.json").write_text(json.dumps(pose))
    return d / "portrait.png", d / "pose.json"


@pytest.fixture(scope="module")
def bundle(models_dir, portrait, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "avatar"
    argv = ["generate", "--image", str(portrait[0]), "--models", str(models_dir),
            "--out", str(out), "--steps", "2", "--pose", str(portrait[1])]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.mark.heavy
def test_generate_writes_a_complete_bundle_whose_ply_reloads(bundle):
    from fica_jax.avatar.bundle import GAUSSIAN_KEYS, Avatar
    from fica_jax.render.ply import load_ply

    for f in ("avatar.safetensors", "avatar.json", "avatar.ply", "preview.png", "maps.npz"):
        assert (bundle / f).is_file(), f
    info = json.loads((bundle / "avatar.json").read_text())["info"]
    assert info["refined"] and {"conditioning", "dit", "refiner", "upm"} <= set(info["seconds"])
    # the refiner export carries the training portraits' shading level: the transfer ran
    assert info["transferred"] and "transfer" in info["seconds"]
    maps = np.load(bundle / "maps.npz")
    assert not np.allclose(maps["texture"], maps["dit_texture"]), "the refiner ran"
    moved = maps["transfer_weight"] > 0
    assert moved.any() and not moved.all()
    np.testing.assert_array_equal(maps["texture"][~moved], maps["refined_texture"][~moved])
    av = Avatar.load(bundle)
    g = {k: np.asarray(v) for k, v in av.drive().items()}
    keep = np.asarray(av.mask).reshape(-1) > 0.5
    ply = load_ply(bundle / "avatar.ply")
    assert len(ply["means"]) == keep.sum()
    for k in GAUSSIAN_KEYS:
        np.testing.assert_allclose(ply[k], g[k][keep], atol=2e-5, rtol=1e-5, err_msg=k)


def test_generate_then_render_turntable_gif(bundle, tmp_path):
    from PIL import Image

    gif = tmp_path / "turn.gif"
    assert main(["render", "--avatar", str(bundle), "--out", str(gif), "--turntable",
                 "--size", "32"]) == 0  # fmt: skip
    with Image.open(gif) as im:
        assert im.n_frames == 36


def test_generate_shape_fit_keeps_the_share_the_refiner_config_names(models_dir, synth_dir):
    """`fica generate`'s landmark fit replaces the DiT geometry's coordinates in the exported
    shape space and keeps `model.shape_fit_residual` of the rest: 0 (the tiny config) gives a
    shape inside the space, 1 keeps the input's part outside it whole."""
    import copy
    import dataclasses

    from data_pipelines.pipeline import open_source
    from fica_jax.geometry.shape_fit import coordinates
    from fica_jax.infer import generate as G

    models = G.load_models(models_dir)
    ref = models["refiner"]
    assert ref.cfg.model.shape_fit_residual == 0.0
    rec = open_source(synth_dir, "test")[0]
    size = rec["view_image"].shape[1]
    pose = {"K": rec["view_K"][0], "viewmat": rec["view_viewmat"][0],
            "expression": rec["view_expression"][0], "landmarks": rec["view_kpts"][0],
            "landmarks_visible": rec["view_kpts_visible"][0] > 0, "image_size": (size, size)}  # fmt: skip
    cam = G._pose(models, None, pose, size)
    space = {k: np.asarray(ref.stats[f"shape_{k}"], np.float32) for k in ("mean", "basis", "sd")}
    mask = (np.abs(space["mean"]).sum(-1) > 0).astype(np.float32)
    noise = np.random.default_rng(0).normal(size=space["mean"].shape) * 0.003 * mask[..., None]
    geometry = (space["mean"] + noise).astype(np.float32)
    outside = lambda g: g - space["mean"] - np.einsum(
        "k,krsc->rsc", coordinates(space, g), space["basis"])  # fmt: skip
    got = {}
    for keep in (0.0, 1.0):
        cfg = copy.deepcopy(ref.cfg)
        cfg.model.shape_fit_residual = keep
        m = models | {"refiner": dataclasses.replace(ref, cfg=cfg)}
        got[keep], info = G._fit_shape(m, geometry, mask, cam, size)
        assert info["landmarks"] >= 8, info
    np.testing.assert_allclose(outside(got[0.0]) * mask[..., None], 0.0, atol=1e-6)
    np.testing.assert_allclose(outside(got[1.0]), outside(geometry), atol=1e-6)
    np.testing.assert_allclose(
        coordinates(space, got[0.0]), coordinates(space, got[1.0]), atol=1e-5
    )
    assert np.abs(outside(geometry)).max() > 1e-3  # the input had a part outside to keep


@pytest.mark.heavy
def test_generate_bad_inputs_are_one_line(models_dir, portrait, tmp_path, capsys, monkeypatch):
    from fica_jax.infer import generate

    text = tmp_path / "notes.png"
    text.write_text("not an image")
    out = tmp_path / "av"
    base = ["--models", str(models_dir), "--out", str(out), "--steps", "1"]
    cases = [
        (["--image", str(text), *base], "not a readable image"),
        (["--image", str(tmp_path / "none.png"), *base], "no such file"),
        (["--image", str(portrait[0]), "--models", str(tmp_path), "--out", str(out)], "no dense/"),
    ]
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for name in STAGES:  # the vae export where the dit should be
        os.symlink(models_dir / ("vae" if name == "dit" else name), wrong / name)
    cases.append((["--image", str(portrait[0]), "--models", str(wrong), "--out", str(out)],
                  "stage 'vae', expected 'dit'"))  # fmt: skip
    no_gain = tmp_path / "no_gain"  # an evidence refiner exported without its shading level
    shutil.copytree(models_dir, no_gain)
    meta = json.loads((no_gain / "refiner" / "model.json").read_text())
    assert meta["run_config"]["model"]["evidence"] and meta["stats"].pop("transfer_gain")
    (no_gain / "refiner" / "model.json").write_text(json.dumps(meta))
    cases.append((["--image", str(portrait[0]), "--models", str(no_gain), "--out", str(out)],
                  "refiner: the refiner reads the portrait's de-lit colours"))  # fmt: skip
    for argv, msg in cases:
        assert main(["generate", *argv]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    monkeypatch.setattr(generate, "MIN_HEAD", 1.01)
    assert main(["generate", "--image", str(portrait[0]), *base]) == 2
    assert "no head found" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".av*")), "nothing half-written"


@pytest.mark.heavy
def test_torch_and_jax_backends_render_the_bundle_alike(bundle, tmp_path, capsys):
    import torch

    from fica_jax.avatar.drive import load_for_backend, render_frames

    frames = [{"yaw": 30.0, "expression": np.linspace(0, 1, 18, dtype=np.float32)}]
    imgs = {}
    for backend in ("jax", "torch"):
        av, kw = load_for_backend(bundle, backend, "cpu")
        imgs[backend] = render_frames(av, frames, 64, progress=False, **kw)[0] / 255.0
    mse = np.mean((imgs["jax"] - imgs["torch"]) ** 2)
    assert 10 * np.log10(1 / max(mse, 1e-12)) > 40
    mp4 = tmp_path / "t.mp4"
    argv = ["render", "--avatar", str(bundle), "--out", str(mp4), "--turntable", "--size", "32"]
    assert main([*argv, "--backend", "torch"]) == 0 and mp4.stat().st_size > 1000
    import imageio.v3 as iio

    assert sum(1 for _ in iio.imiter(mp4)) == 36
    if not torch.cuda.is_available():
        assert main([*argv, "--backend", "torch", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
