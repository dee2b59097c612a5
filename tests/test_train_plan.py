"""`fica plan` (AOT compile for a virtual mesh), HLO FLOP/collective counting, golden shardings.

Regenerate a golden file after an intended layout change (and review the diff):
  python -m fica_jax.train.plan --golden configs/dit.py:paper --mesh data=8,fsdp=8 \
      --out tests/golden/sharding_dit_paper.json
  python -m fica_jax.train.plan --golden configs/toy.py:wide --mesh data=8,fsdp=8 \
      --out tests/golden/sharding_toy_wide.json
"""

import json
import pathlib

import pytest

import fica_jax  # noqa: F401
from fica_jax import sharding as shd
from fica_jax.config import load_config
from fica_jax.errors import UserError
from fica_jax.train import cli, plan
from fica_jax.train.hlo_stats import analyze
from fica_jax.train.stage import get_stage
from fica_jax.train.step import build

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = {  # name: (config, golden file); a config not yet in the repo is skipped
    "toy_wide": ("configs/toy.py:wide", "sharding_toy_wide.json"),
    "dit_paper": ("configs/dit.py:paper", "sharding_dit_paper.json"),
}


def _toy_dot_flops_per_example(din=16, width=32, depth=2, dout=8) -> int:
    """Forward + weight grads + input grads (none for the data input), no remat."""
    fwd = 2 * (din * width + depth * 2 * (width * 2 * width) + width * dout)
    return 3 * fwd - 2 * din * width


def test_fica_plan_toy_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--config", "configs/toy.py", "--mesh", "data=2,fsdp=4", "--out", str(out)]
    assert cli.main(argv) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["devices"] == 8 and report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert report["param_count"] == 9320
    b = report["per_device_bytes"]
    assert 0 < b["params"] < 4 * 9320  # sharded: less than the full f32 params on each device
    assert b["optimizer_state"] >= 2 * b["params"]  # Adam's mu and nu mirror the params
    assert b["temp_activations"] > 0
    f = report["flops"]
    assert f["while_trip_counts"] == [2, 2]  # scanned blocks forward and backward
    assert f["per_device_per_step"] == _toy_dot_flops_per_example() * 16 / 8
    assert report["collective_bytes_per_device"]["total"] > 0
    assert set(report["roofline"]) == {"v5p", "v6e", "a100", "h100"}
    assert 0 < report["roofline"]["v5p"]["mfu"] <= 1


def test_plan_rejects_bad_mesh_and_chips():
    with pytest.raises(UserError, match="--mesh 'data=8,pipe=2'"):
        plan.parse_mesh("data=8,pipe=2")
    with pytest.raises(UserError, match="unknown \\['tpu9'\\]"):
        plan.parse_chips("v5p,tpu9")


def test_hlo_flops_count_scan_trip_counts():
    """The HLO counter multiplies scanned bodies; XLA's cost analysis would count them once."""
    mesh = shd.make_mesh({"data": 8})
    counts = {}
    for depth in (2, 4):
        cfg = load_config("configs/toy.py", [f"--config.model.depth={depth}"])
        stats = analyze(build(cfg, get_stage("toy"), mesh).lower().compile().as_text())
        assert stats.while_trip_counts == [depth, depth]
        counts[depth] = stats.flops
        assert stats.flops == _toy_dot_flops_per_example(depth=depth) * 16 / 8
    assert counts[4] > counts[2]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_param_shardings_match_golden(name):
    config, golden = GOLDEN[name]
    path = REPO / "tests" / "golden" / golden
    assert path.exists(), f"missing {path}; regenerate it as in this module's docstring"
    table = plan.sharding_table(load_config(config), {"data": 8, "fsdp": 8})
    assert table == json.loads(path.read_text())


@pytest.mark.slow
def test_fica_plan_dit_tiny(tmp_path):
    """The DiT's scanned blocks show up as a while loop with the config's depth as trip count."""
    report = plan.plan_in_subprocess("configs/dit.py:tiny", "data=2,fsdp=4", "v5p")
    from fica_jax.models.dit import VARIANTS

    depth = load_config("configs/dit.py:tiny").model.depth or VARIANTS["tiny"].depth
    assert report["flops"]["while_trip_counts"].count(depth) == 2  # forward and backward scans
    assert report["flops"]["per_device_per_step"] > 0
    assert report["per_device_bytes"]["params"] < 4 * report["param_count"]
