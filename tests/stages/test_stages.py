"""The stage registry and contract: one module is a stage, declaring its examples, its held-out
metrics with their directions and what its data fix; bad stage / variant names are one-line
errors."""

import json
import pathlib

import pytest

from data_pipelines.pipeline import CaptureData
from fica_jax.commands.main import main
from fica_jax.errors import UserError
from fica_jax.train.stage import Stage, get_stage, stage_names, vs_baselines

PLUGIN = pathlib.Path(__file__).parents[1] / "plugins" / "linreg_stage.py"


def test_registry_is_the_stages_package():
    assert {"toy", "vae", "dense", "dit"} <= set(stage_names())
    for name in stage_names():
        stage = get_stage(name)
        assert isinstance(stage, Stage) and stage.name == name


def test_a_stage_from_one_module_outside_the_package_trains_through_fica_train(tmp_path):
    """tests/plugins/linreg_stage.py is the whole stage (model, loss, data, config); nothing
    else in the repository names it."""
    argv = ["train", str(PLUGIN), "--config", str(PLUGIN), "--workdir", str(tmp_path)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] > 0 for r in steps)
    assert (tmp_path / "checkpoints" / "2").is_dir()
    # its held-out figure against its baseline, in the direction it declares (lower mae wins)
    evals = {k[5:]: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    (fig,) = vs_baselines(get_stage(str(PLUGIN)), evals).values()
    assert fig == {"value": evals["mae"], "baseline": evals["baseline_mae"],
                   "better": evals["mae"] < evals["baseline_mae"]}  # fmt: skip


def test_every_stage_declares_its_examples_metrics_and_data_fit():
    for name in stage_names():
        stage = get_stage(name)
        assert stage.metrics and all(isinstance(up, bool) for up in stage.metrics.values()), name
        assert not [m for m in stage.metrics if m.startswith("baseline_")], name
        if stage.example is not None:  # a module-level function Grain workers can import
            assert "." not in stage.example.__qualname__, name
    # capture-shard stages leave make_data to CaptureData(example)
    vae = get_stage("vae")
    assert vae.make_data == CaptureData(vae.example)
    assert vae.example.__module__ == "fica_jax.stages.vae"
    # what the data fix, from their metadata.json: one colour correction per camera
    fit = get_stage("upm").fit_data({"uv_resolution": 32, "image_size": [64, 64], "n_views": 4})
    assert fit == {"data.uv_resolution": 32, "data.image_size": 64, "model.n_cameras": 4}
    # and where the metadata says them, the code and landmark sizes and the template's eyes
    said = {"expression_dim": 4, "landmark_dim": 0, "template": {"key": "t@1", "has_eyes": False}}
    fit = get_stage("upm").fit_data({"uv_resolution": 32, "image_size": [64, 64], "n_views": 4,
                                     **said})  # fmt: skip
    assert (fit["data.expression_dim"], fit["data.landmarks"], fit["model.eye_template"]) == (
        4, 0, "")  # fmt: skip


def test_figures_resolve_to_declared_metrics_and_an_undeclared_one_is_an_error():
    stage = Stage(name="s", rules="default", make_model=None, make_loss=None, make_data=list,
                  batch_spec=None, metrics={"psnr": True, "texture_psnr": True, "l1_mm": False})  # fmt: skip
    assert stage.metric_of("psnr") == stage.metric_of("baseline_psnr") == "psnr"
    assert stage.metric_of("baseline_mean_texture_psnr") == "texture_psnr"  # the longest
    assert stage.metric_of("baseline_zero_identity_psnr") == "psnr"
    for undeclared in ("ssim", "baseline_ssim", "baseline_mean_ssim", "zero_psnr"):
        with pytest.raises(
            UserError, match=f"stage 's': eval figure '{undeclared}' is not declared"
        ):
            stage.metric_of(undeclared)
    figs = {"psnr": 20.0, "baseline_mean_psnr": 21.0, "l1_mm": 2.0, "baseline_l1_mm": 3.0,
            "baseline_texture_psnr": 9.0}  # texture_psnr itself not logged: skipped  # fmt: skip
    assert vs_baselines(stage, figs) == {
        "mean_psnr": {"value": 20.0, "baseline": 21.0, "better": False},
        "l1_mm": {"value": 2.0, "baseline": 3.0, "better": True},
    }
    with pytest.raises(UserError, match=r"give Stage\(example=\.\.\.\) or make_data"):
        Stage(name="s", rules="default", make_model=None, make_loss=None, batch_spec=None)


def test_unknown_stage_lists_the_stages(tmp_path, capsys):
    assert main(["train", "nosuch", "--config", "toy", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown stage 'nosuch'" in err and "'dit'" in err


@pytest.mark.parametrize(
    "stage, variants",
    [
        ("dit", ["B", "XL", "paper", "tiny"]),
        ("dense", ["0.3b", "0.6b", "1b", "2b", "tiny"]),
        ("vae", ["sdxl", "tiny"]),
    ],
)
def test_unknown_model_variant_is_one_line_naming_the_valid_ones(tmp_path, capsys, stage, variants):
    argv = ["train", stage, "--config", f"{stage}:tiny", "--workdir", str(tmp_path)]
    argv += ["--config.model.variant=huge", "--config.data.dir=/nonexistent"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.variant='huge' is unknown; expected one of" in err
    for v in variants:
        assert repr(v) in err
    assert not list(tmp_path.iterdir())  # nothing written
