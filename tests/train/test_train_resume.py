"""Preemption and resumption: SIGKILL at a random step, SIGTERM, a half-written checkpoint, and
restoring onto another mesh shape. `fica train` runs as a subprocess where a signal is involved."""

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fica_jax  # noqa: F401
from fica_jax import sharding as shd
from fica_jax.config import load_config
from fica_jax.train.checkpoint import Checkpointer
from fica_jax.train.loop import train
from fica_jax.train.metrics import read_metrics
from fica_jax.train.stage import get_stage
from fica_jax.train.step import build

REPO = pathlib.Path(__file__).resolve().parents[2]
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=4"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _start(workdir, *overrides):
    cmd = [sys.executable, "-m", "fica_jax.commands.train", "train", "toy"]
    cmd += ["--config", "configs/toy.py", "--workdir", str(workdir), *MESH, *overrides]
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(proc, workdir, step, timeout=120.0):
    """Polls metrics.jsonl until `step` is logged (the process must still be running)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and any(f'"step": {step},' in line for line in path.open()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise TimeoutError(f"step {step} not reached")


@pytest.mark.multiprocess
def test_sigkill_at_random_step_then_resume_reproduces_the_loss_sequence(tmp_path):
    steps = ["--config.train.steps=30", "--config.train.log_every=1", "--config.train.ckpt_every=5"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    train(load_config("configs/toy.py", [*MESH, *steps]), ref_dir)  # uninterrupted, in-process
    ref = read_metrics(ref_dir)

    kill_at = random.Random().randint(7, 24)
    proc = _start(run_dir, *steps)
    _wait_for_step(proc, run_dir, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_rows_before = len((run_dir / "metrics.jsonl").read_text().splitlines())

    proc = _start(run_dir, *steps)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # The newest *finalised* checkpoint (an async save still in flight at the kill is dropped).
    resumed = int(out.split("resumed from step ")[1].split()[0]) if "resumed from" in out else 0
    assert resumed <= kill_at and resumed % 5 == 0, (resumed, kill_at)
    rows = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()[n_rows_before:]
    ]
    assert [r["step"] for r in rows] == list(range(resumed + 1, 31))
    for r in rows:  # exactly the same numbers: same data position, same RNG, same params
        assert r["loss"] == ref[r["step"]]["loss"], (r["step"], kill_at, resumed)
        assert r["grad_norm"] == ref[r["step"]]["grad_norm"]


@pytest.mark.multiprocess
def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
    proc = _start(tmp_path, "--config.train.steps=100000", "--config.train.log_every=1")
    _wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = int(out.split("preempted: saved step ")[1].split(",")[0])
    cfg = load_config("configs/toy.py", MESH)
    assert Checkpointer(tmp_path, cfg).latest_step() == saved == max(read_metrics(tmp_path))


@pytest.mark.heavy
def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path, capsys):
    cfg = load_config(
        "configs/toy.py", [*MESH, "--config.train.steps=8", "--config.train.ckpt_every=4"]
    )
    train(cfg, tmp_path)
    ckpts = tmp_path / "checkpoints"
    # What a process killed while Orbax was writing step 12 leaves: an unfinalised tmp directory.
    partial = ckpts / "12.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(ckpts / "8", partial)
    (partial / "commit_success.txt").unlink(missing_ok=True)
    (partial / "state" / "_METADATA").unlink(missing_ok=True)
    cfg12 = load_config(
        "configs/toy.py", [*MESH, "--config.train.steps=12", "--config.train.ckpt_every=4"]
    )
    capsys.readouterr()
    train(cfg12, tmp_path)
    assert "resumed from step 8" in capsys.readouterr().out
    assert not partial.exists()  # removed on start (cleanup_tmp_directories)
    assert sorted(p.name for p in ckpts.iterdir()) == ["12", "4", "8"]


def test_restore_onto_a_different_mesh_gives_identical_values(tmp_path):
    cfg = load_config(
        "configs/toy.py", [*MESH, "--config.train.steps=4", "--config.train.ckpt_every=4"]
    )
    train(cfg, tmp_path)
    stage = get_stage("toy")
    saved_on = build(cfg, stage, shd.make_mesh({"data": 2, "fsdp": 4}))
    a = Checkpointer(tmp_path, cfg).restore(4, saved_on.abstract_state, None)
    cfg8 = load_config("configs/toy.py", ["--config.mesh.data=8", "--config.mesh.fsdp=1"])
    mesh8 = shd.make_mesh({"data": 8})
    b = Checkpointer(tmp_path, cfg8).restore(4, build(cfg8, stage, mesh8).abstract_state, None)
    assert a["params"]["inp"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert b["params"]["inp"]["kernel"].sharding.mesh.shape["data"] == 8
    assert len(b["params"]["inp"]["kernel"].addressable_shards[0].data.ravel()) == 16 * 32
    flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for x, y in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
