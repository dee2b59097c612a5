"""`fica demo`, the README's main job: every stage to a drivable avatar and the eval report.

The default tests cover the demo's own logic (resumable steps, held-out-vs-baseline figures, the
stage configs it builds, bad input); the whole `--quick` run is `slow`."""

import json
import math

import pytest

from data_pipelines.schema import SCHEMA_VERSION
from fica_jax.commands import demo
from fica_jax.commands import demo_steps as ds
from fica_jax.commands.main import main
from fica_jax.config import load_config
from fica_jax.errors import UserError


def test_steps_skip_existing_outputs_and_keep_their_entries(tmp_path):
    calls, saved = [], []

    def make(name):
        def run():
            calls.append(name)
            (tmp_path / name).write_text("x")
            return {"made": name}

        return demo.Step(name, tmp_path / name, run, lambda: {"figure": len(name)})

    steps = [make("a"), make("bb")]
    report = demo.run_steps(steps, {}, lambda r: saved.append(json.dumps(r)))
    assert calls == ["a", "bb"] and len(saved) == 2, "ran in order, report saved after each"
    assert report["steps"]["a"]["made"] == "a" and report["steps"]["bb"]["figure"] == 2
    assert not report["steps"]["a"]["skipped"] and report["steps"]["a"]["seconds"] >= 0
    # a resumed run (the report read back) skips both and keeps what the first run recorded
    again = demo.run_steps(steps, json.loads(saved[-1]), lambda r: None)
    assert calls == ["a", "bb"]
    assert again["steps"]["bb"] == {**report["steps"]["bb"], "skipped": True}
    # a step that claims success without writing its output stops the demo
    lazy = demo.Step("lazy", tmp_path / "never", lambda: {})
    with pytest.raises(RuntimeError, match="did not write"):
        demo.run_steps([lazy], {}, lambda r: None)


def _run(path, stage, *rows):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"stage": stage}))
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_held_out_compares_every_figure_with_its_baseline_in_the_stages_direction(tmp_path):
    vae = _run(tmp_path / "vae", "vae", {"step": 5, "loss": 1.0},
               {"step": 10, "loss": 0.5, "eval/texture_psnr": 21.0, "eval/baseline_texture_psnr": 19.0,
                "eval/geometry_l1_mm": 3.0, "eval/baseline_geometry_l1_mm": 2.0,
                "eval/baseline_mean_shape_geometry_l1_mm": 4.0})  # fmt: skip
    got = ds.held_out(vae)
    assert got["step"] == 10 and got["eval/texture_psnr"] == 21.0
    vs = got["vs_baseline"]
    assert vs["texture_psnr"] == {"value": 21.0, "baseline": 19.0, "better": True}
    assert vs["geometry_l1_mm"] == {"value": 3.0, "baseline": 2.0, "better": False}  # lower wins
    assert vs["mean_shape_geometry_l1_mm"]["better"]
    upm = _run(tmp_path / "upm", "upm",
               {"step": 3, "eval/psnr": 18.0, "eval/baseline_zero_identity_psnr": 17.0,
                "eval/baseline_surfels_psnr": 18.5, "eval/ssim": 0.5,
                "eval/baseline_surfels_ssim": 0.6})  # fmt: skip
    vs = ds.held_out(upm)["vs_baseline"]
    assert vs["zero_identity_psnr"]["better"] and not vs["surfels_psnr"]["better"]
    assert set(vs) == {"zero_identity_psnr", "surfels_psnr", "surfels_ssim"}
    # the dense pose baseline without the pose head's own figure: nothing to compare
    dense = _run(tmp_path / "dense", "dense", {"step": 1, "eval/mask_iou": 0.7,
                                               "eval/baseline_rot_deg": 30.0})  # fmt: skip
    assert ds.held_out(dense)["vs_baseline"] == {}


def test_held_out_refuses_a_baseline_of_an_undeclared_metric(tmp_path):
    run = _run(tmp_path / "run", "vae", {"step": 1, "eval/lpips": 0.3, "eval/baseline_lpips": 0.4})
    with pytest.raises(
        UserError, match="stage 'vae': eval figure 'baseline_lpips' is not declared"
    ):
        ds.held_out(run)


def test_identity_summary_reads_the_gap_the_texels_the_budget_and_the_steps():
    row = lambda m, psnr, **kw: {"method": m, "psnr": psnr, "ssim": 0.3, **kw}
    tables = {
        "main": [row("mean", 12.0), row("3dgs", 15.0), row("gt_upm", 18.0)],
        "ablation": [row("abl_emb", 14.2), row("abl_fit", 15.2, psnr_delta=1.0, psnr_delta_se=0.2),
                     row("abl_ref", 15.5, psnr_delta=0.3, psnr_delta_se=0.1),
                     row("3dgs", 15.0, psnr_delta=-0.5, psnr_delta_se=0.25)],
        "uv_texture": [{"method": "mean", "visible_psnr": 16.0, "unseen_psnr": 17.0},
                       {"method": "3dgs", "visible_psnr": 19.0, "unseen_psnr": 17.5},
                       {"method": "vae", "visible_psnr": 21.0, "unseen_psnr": 20.0}],
        "budget": [row("gt_upm", 18.0), row("vae_upm", 16.5), row("gt_tex", 16.0),
                   row("gt_geo", 17.0), row("3dgs", 15.0)],
    }  # fmt: skip
    stages = {"dit": {"vs_baseline": {"texture_psnr": {"value": 16.9, "baseline": 15.0}}}}
    got = ds.identity_summary(tables, stages)
    want = {"gap_closed": 0.5, "visible_texel_psnr_gain_db": 3.0, "unseen_texel_psnr_gain_db": 0.5,
            "visible_texel_psnr_below_vae_ceiling_db": 2.0, "dit_texture_psnr": 16.9,
            "vae_maps_psnr": 16.5, "geometry_cost_db": 2.0, "texture_cost_db": 1.0,
            "shape_fit_step_db": 1.0, "shape_fit_step_in_se": 5.0,
            "refiner_step_db": 0.3, "refiner_step_in_se": 3.0, "transfer_step_in_se": -2.0}  # fmt: skip
    for k, v in want.items():
        assert got[k] == pytest.approx(v), k
    # a report from before the error budget has none of its keys
    old = ds.identity_summary({k: v for k, v in tables.items() if k != "budget"}, stages)
    assert not {"vae_maps_psnr", "geometry_cost_db", "texture_cost_db"} & set(old)


CACHE_META = {"grid": 4, "token_channels": 4, "image_emb_dim": 64}


def _meta(name, sizes):
    """What the demo's captures (`metadata.json` dims) and latent cache say about themselves."""
    if ds.RUNS[name][1] == "cache":
        return {**CACHE_META, "uv_resolution": sizes["uv"]}
    return {"uv_resolution": sizes["uv"], "image_size": [sizes["image"]] * 2,
            "n_views": sizes["frames"] + 1, "expression_dim": 18, "landmark_dim": 68,
            "template": {"key": "fica-procedural-head-r48", "has_eyes": True}}  # fmt: skip


def test_capture_metadata_reads_as_the_test_writes_it(synth_dir):
    # synth_dir: 32^2 UV maps, 32 px images, one dome frame
    meta = ds.data_meta(synth_dir)
    sizes = {"uv": 32, "image": 32, "frames": 1}
    want = _meta("vae", sizes)
    assert {k: meta[k] for k in want if k != "template"} == {
        k: v for k, v in want.items() if k != "template"
    }
    assert {k: meta["template"][k] for k in want["template"]} == want["template"]


# Each run's config overrides beside the common ones: what `fit_data` takes from the data
# (CACHE_META for the DiTs) and the demo's own (`SIZES[...]["config"]`), written out here so a
# change to either shows up as a change to this table.
_DIT = {"model.latent_size": 4, "model.latent_channels": 4, "model.image_emb_dim": 64}
_REFINER = {"data.image_size": 32, "model.input_source": "mix"}
EXPECTED = {
    "default": {
        "vae": {"data.uv_resolution": 64},
        "dense": {"data.image_size": 64, "model.unwrap_resolution": 64},
        **{n: {**_DIT, "model.uv_resolution": 64, "model.patch": 2, "model.eval_steps": 50}
           for n in demo._DITS},
        "refiner": {"data.uv_resolution": 64, **_REFINER},
        "upm": {"data.uv_resolution": 64, "data.image_size": 64, "model.n_cameras": 4},
    },
    "quick": {
        "vae": {"data.uv_resolution": 32},
        "dense": {"data.image_size": 64, "model.unwrap_resolution": 32},
        **{n: {**_DIT, "model.uv_resolution": 32, "model.patch": 1, "model.eval_steps": 4}
           for n in demo._DITS},
        "refiner": {"data.uv_resolution": 32, **_REFINER},
        "upm": {"data.uv_resolution": 32, "data.image_size": 64, "model.n_cameras": 2},
    },
}  # fmt: skip


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


@pytest.mark.parametrize("size", ["default", "quick"])
def test_stage_configs_are_the_ones_the_demo_always_trained(tmp_path, size):
    sizes = demo.SIZES[size]
    for name, (spec, _) in ds.RUNS.items():
        steps = sizes["steps"][name]
        common = [f"--config.data.dir={tmp_path}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                  f"--config.train.steps={steps}", f"--config.optim.warmup_steps={max(1, steps // 10)}",
                  f"--config.train.eval_every={steps}", f"--config.train.ckpt_every={steps}"]  # fmt: skip
        extra = [f"--config.{k}={v}" for k, v in EXPECTED[size][name].items()]
        got = ds.stage_cfg(name, tmp_path, steps, sizes, _meta(name, sizes))
        assert _flat(got.to_dict()) == _flat(load_config(spec, common + extra).to_dict()), name


@pytest.mark.parametrize("size", ["default", "quick"])
def test_stage_configs_use_the_demo_sizes(tmp_path, size):
    sizes = demo.SIZES[size]
    cfgs = {
        n: ds.stage_cfg(n, tmp_path, sizes["steps"][n], sizes, _meta(n, sizes)) for n in ds.RUNS
    }
    for name, cfg in cfgs.items():
        assert cfg.train.steps == cfg.train.eval_every == sizes["steps"][name], name
        assert cfg.data.dir == str(tmp_path) and cfg.data.batch_size % 8 == 0
    for name in ("vae", "refiner", "upm"):  # one UV layout from the VAE to the avatar
        assert cfgs[name].data.uv_resolution == sizes["uv"]
    assert cfgs["dense"].data.image_size == cfgs["upm"].data.image_size == sizes["image"]
    assert cfgs["upm"].model.n_cameras == sizes["frames"] + 1
    assert list(cfgs["dit-rgb"].model.control_maps) == ["rgb", "mask"]
    assert not cfgs["dit-maps"].model.use_image_emb and cfgs["dit"].model.use_image_emb
    assert cfgs["dit"].model.latent_size == 4 and cfgs["dit"].optim.ema_decay > 0
    # the --quick run keeps every stage and output, at a handful of steps
    if size == "quick":
        assert sizes["identities"] == 9 and max(sizes["steps"].values()) <= 10
    assert set(sizes["steps"]) == set(ds.RUNS)
    # every model builds at these sizes (the full default's 64^2 UV once broke the upm stage
    # only when the demo reached it, 9 minutes in)
    from flax import nnx

    from fica_jax.train.stage import get_stage

    for cfg in cfgs.values():
        stage = get_stage(cfg.stage)
        assert nnx.eval_shape(lambda c=cfg, s=stage: s.make_model(c, nnx.Rngs(0))) is not None


def test_demo_bad_input_is_one_line(tmp_path, capsys):
    cases = [
        (["--identities", "3"], "--identities must be >= 5"),
        (["--steps", "0"], "--steps 0"),
    ]
    for extra, msg in cases:
        assert main(["demo", "--out", str(tmp_path / "d"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    afile = tmp_path / "file"
    afile.write_text("x")
    assert main(["demo", "--out", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err
    # resuming a folder whose captures were made with other settings is refused, untouched
    data = tmp_path / "old" / "data"
    data.mkdir(parents=True)
    gen = {"identities": 12, "seed": 0, "config": {"uv_resolution": 32, "image_size": 64}}
    meta = {"schema_version": SCHEMA_VERSION, "uv_resolution": 32, "image_size": 64,
            "n_views": 2, "splits": {}, "generator": gen}  # fmt: skip
    (data / "metadata.json").write_text(json.dumps(meta))
    assert main(["demo", "--out", str(tmp_path / "old"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "identities 12, this demo run needs 9" in err
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["data"]


@pytest.mark.slow
def test_quick_demo_runs_every_stage_to_avatar_gifs_and_eval(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert not [n for n, s in report["steps"].items() if s["skipped"]]  # a fresh run ran them all
    assert set(report["stages"]) == set(ds.RUNS)
    for name, st in report["stages"].items():
        assert st["step"] == demo.SIZES["quick"]["steps"][name], name
        assert st["vs_baseline"], f"{name} logged no held-out figure with a baseline"
        for fig in st["vs_baseline"].values():
            assert math.isfinite(fig["value"]) and math.isfinite(fig["baseline"]), (name, fig)
    for name in ds.RUNS:
        assert (out / "models" / name / "model.safetensors").stat().st_size > 1000, name
    (ident,) = [p for p in (out / "avatars").iterdir() if p.is_dir()]
    for f in ("avatar.safetensors", "avatar.json", "avatar.ply", "preview.png", "maps.npz"):
        assert (ident / f).is_file(), f
    assert json.loads((ident / "avatar.json").read_text())["info"]["refined"]
    with Image.open(out / "avatars" / f"{ident.name}_turntable.gif") as im:
        assert im.n_frames == 36
    with Image.open(out / "avatars" / f"{ident.name}_sweep.gif") as im:
        assert im.n_frames > 36
    for f in ("report.md", "metrics.csv", "report.json"):
        assert (out / "eval" / f).stat().st_size > 100, f
    assert report["steps"]["evaluate"]["tables"]
    assert str(out / "eval" / "report.md") in printed and str(ident / "avatar.ply") in printed
    # re-running resumes: every step's output exists, nothing is trained or generated again
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    again = json.loads((out / "report.json").read_text())
    assert all(s["skipped"] for s in again["steps"].values())
    assert again["seconds_this_run"] < report["seconds_this_run"] / 3
