"""The stage registry: one module is a stage; bad stage / variant names are one-line errors."""

import json
import pathlib

import pytest

from fica_jax.commands.main import main
from fica_jax.train.stage import Stage, get_stage, stage_names

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
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] > 0 for r in rows)
    assert (tmp_path / "checkpoints" / "2").is_dir()


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
