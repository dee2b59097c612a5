"""The shared train loop on the toy stage, in-process on 8 fake CPU devices (data=2, fsdp=4)."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import fica_jax  # noqa: F401
from fica_jax import sharding as shd
from fica_jax.commands import train as cli
from fica_jax.config import load_config
from fica_jax.errors import UserError
from fica_jax.models.remat import policy as remat_policy
from fica_jax.train.checkpoint import Checkpointer
from fica_jax.train.loop import train
from fica_jax.train.metrics import read_metrics
from fica_jax.train.stage import get_stage
from fica_jax.train.step import build

MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]


def toy_cfg(*overrides):
    return load_config("configs/toy.py", [*MESH, *overrides])


@pytest.mark.heavy
def test_loss_decreases_metrics_profile_and_eval(tmp_path):
    cfg = toy_cfg(
        "--config.train.steps=40",
        "--config.train.log_every=5",
        "--config.train.ckpt_every=20",
        "--config.train.eval_every=20",
    )
    last = train(cfg, tmp_path, profile_steps=(2, 4))
    rows = read_metrics(tmp_path)
    assert sorted(rows) == [5, 10, 15, 20, 25, 30, 35, 40]
    assert rows[40]["loss"] < 0.5 * rows[5]["loss"], (rows[5]["loss"], rows[40]["loss"])
    for key in ("grad_norm", "param_norm", "update_norm", "learning_rate", "steps_per_s"):
        assert np.isfinite(rows[40][key]) and rows[40][key] > 0, key
    assert rows[40]["examples_per_s"] == pytest.approx(16 * rows[40]["steps_per_s"])
    assert last["loss"] == rows[40]["loss"]
    assert "eval/loss" in rows[20] and "eval/loss" in rows[40]  # eval rows merge into the step
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert list((tmp_path / "profile").rglob("*.xplane.pb")), "profiler trace missing"
    assert json.loads((tmp_path / "config.json").read_text())["stage"] == "toy"


def test_params_and_optimizer_state_sharded_by_the_rules():
    cfg = toy_cfg()
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    setup = build(cfg, get_stage("toy"), mesh)
    state = setup.init()
    p = state["params"]
    # default rules: embed -> fsdp, mlp -> tensor (size 1 here), layers/norm replicated.
    assert p["inp"]["kernel"].sharding.spec == P(None, "fsdp")
    assert p["blocks"]["mlp"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert p["blocks"]["mlp"]["fc2"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert p["out"]["kernel"].sharding.spec == P("fsdp", None)
    assert p["inp"]["kernel"].addressable_shards[0].data.shape == (16, 8)  # 32 / fsdp 4
    mu = state["opt"][1][0].mu  # chain(clip, adamw): adam's first moment mirrors the params
    assert mu["inp"]["kernel"].sharding.spec == P(None, "fsdp")
    assert state["step"].sharding.spec == P()
    model = setup.model(state["params"], state["rest"])
    assert shd.unannotated_params(model) == []


@pytest.mark.heavy
def test_grad_accumulation_matches_the_full_batch_step():
    cfg1, cfg2 = toy_cfg(), toy_cfg("--config.train.grad_accum=4")
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    stage = get_stage("toy")
    batch = next(iter(stage.make_data(cfg1, "train", 0, 1)))
    outs = []
    for cfg in (cfg1, cfg2):
        setup = build(cfg, stage, mesh)
        state, m = setup.train_step(setup.init(), shd.put_batch(batch, mesh))
        state, m = setup.train_step(state, shd.put_batch(batch, mesh))
        outs.append((jax.device_get(state["params"]), jax.device_get(m)))
    (p1, m1), (p2, m2) = outs
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p2)


@pytest.mark.heavy
def test_keep_and_keep_every_retention(tmp_path):
    cfg = toy_cfg(
        "--config.train.steps=12",
        "--config.train.ckpt_every=2",
        "--config.train.keep=2",
        "--config.train.keep_every=4",
    )
    train(cfg, tmp_path)
    assert Checkpointer(tmp_path, cfg).all_steps() == [4, 8, 10, 12]


@pytest.mark.heavy
def test_init_from_takes_params_only(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    train(toy_cfg("--config.train.steps=6", "--config.train.ckpt_every=6"), src)
    # lr 0 keeps the loaded params; the EMA starts from them, so it equals them too.
    cfg = toy_cfg(
        "--config.train.steps=1",
        "--config.train.ckpt_every=1",
        "--config.optim.lr=0.0",
        "--config.optim.ema_decay=0.9",
    )
    train(cfg, dst, init_from=str(src))
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    setup = build(cfg, get_stage("toy"), mesh)
    a = Checkpointer(src, toy_cfg()).restore(
        6, build(toy_cfg(), get_stage("toy"), mesh).abstract_state, None
    )
    b = Checkpointer(dst, cfg).restore(1, setup.abstract_state, None)
    assert int(b["step"]) == 1  # optimizer step count starts fresh
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["ema"])
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(cfg, tmp_path / "x", init_from=str(tmp_path / "dst" / "tb"))


@pytest.mark.heavy
def test_nan_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, capsys):
    argv = ["train", "toy", "--config", "configs/toy.py", "--workdir", str(tmp_path)]
    argv += [*MESH, "--config.train.steps=20", "--config.train.ckpt_every=4"]
    argv += ["--config.model.nan_at_step=6"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: step 6: loss is nan"), err
    assert "last good checkpoint is step 4" in err[0]
    cfg = toy_cfg()
    ckpt = Checkpointer(tmp_path, cfg)
    assert ckpt.all_steps() == [4]
    setup = build(cfg, get_stage("toy"), shd.make_mesh({"data": 2, "fsdp": 4}))
    state = ckpt.restore(4, setup.abstract_state, None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_cli_rejects_wrong_stage_and_bad_profile_steps(tmp_path, capsys):
    base = ["--config", "configs/toy.py", "--workdir", str(tmp_path)]
    assert cli.main(["train", "toy", *base, "--config.stage=vae"]) == 2
    assert "is for stage 'vae', not 'toy'" in capsys.readouterr().err
    assert cli.main(["train", "nosuch", *base]) == 2
    assert "unknown stage 'nosuch'" in capsys.readouterr().err
    assert cli.main(["train", "toy", *base, "--profile_steps", "5"]) == 2
    assert "--profile_steps '5'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["none", "full", "dots_saveable"])
def test_remat_policies_by_name(name):
    assert (remat_policy(name) is None) == (name == "none")
    cfg = toy_cfg(f"--config.train.remat={name}")
    setup = build(cfg, get_stage("toy"), shd.make_mesh({"data": 2, "fsdp": 4}))
    assert setup.lower().compile() is not None
    with pytest.raises(UserError, match="train.remat"):
        remat_policy("sometimes")


def test_first_batch_is_checked_against_batch_spec():
    from fica_jax.train.loop import _check_batch

    cfg = toy_cfg()
    spec = get_stage("toy").batch_spec(cfg)
    good = {"x": np.zeros((8, 16), np.float32), "y": np.zeros((8, 8), np.float32)}
    _check_batch(good, spec, process_count=2)  # per-host half of the global batch of 16
    with pytest.raises(UserError, match=r"batch\['x'\] is float64\[8, 16\]"):
        _check_batch({**good, "x": good["x"].astype(np.float64)}, spec, process_count=2)
    with pytest.raises(UserError, match="no key 'y'"):
        _check_batch({"x": good["x"]}, spec, process_count=2)


@pytest.mark.heavy
def test_bfloat16_compute_keeps_float32_params():
    cfg = toy_cfg("--config.train.compute_dtype=bfloat16")
    mesh = shd.make_mesh({"data": 2, "fsdp": 4})
    stage = get_stage("toy")
    setup = build(cfg, stage, mesh)
    batch = shd.put_batch(next(iter(stage.make_data(cfg, "train", 0, 1))), mesh)
    state, m = setup.train_step(setup.init(), batch)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
    assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0
    assert "bf16" in setup.lower().as_text()  # the matmuls really run in bfloat16


def test_peak_flops_table_and_mfu():
    from types import SimpleNamespace

    from fica_jax.train.metrics import Throughput, peak_flops

    kind = lambda k: SimpleNamespace(device_kind=k)
    assert peak_flops(kind("TPU v5p")) == 459e12
    assert peak_flops(kind("TPU v6 lite")) == 918e12  # how a v6e chip names itself
    assert peak_flops(kind("NVIDIA H100 80GB HBM3")) == 989e12
    assert peak_flops(kind("NVIDIA A100-SXM4-80GB")) == 312e12
    assert peak_flops(kind("cpu")) is None
    meter = Throughput(global_batch=128, flops_per_step=1e12, peak=1e13)
    for _ in range(4):
        meter.tick()
    out = meter.read()
    assert out["examples_per_s"] == pytest.approx(128 * out["steps_per_s"])
    assert out["mfu"] == pytest.approx(1e12 * out["steps_per_s"] / 1e13)
    assert "mfu" not in Throughput(8, 1e9, None).read()  # unknown chip: no MFU claimed
