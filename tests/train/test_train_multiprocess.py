"""The multi-host code path: two `jax.distributed` CPU processes on loopback, one device each."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from fica_jax.train import distributed
from fica_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, *overrides):
    """Starts `fica train toy` as processes 0 and 1 of a 2-process jax.distributed job."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=1",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            FICA_COORDINATOR=f"127.0.0.1:{port}",
            FICA_NUM_PROCESSES="2",
            FICA_PROCESS_ID=str(pid),
        )
        cmd = [sys.executable, "-m", "fica_jax.commands.train", "train", "toy"]
        cmd += ["--config", "configs/toy.py", "--workdir", str(tmp_path)]
        cmd += ["--config.train.log_every=1", *overrides]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    return procs


@pytest.mark.multiprocess
def test_two_process_run_trains_and_checkpoints(tmp_path):
    procs = _launch(tmp_path, "--config.train.steps=6", "--config.train.ckpt_every=3")
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["3", "6"]
    # Each host saved its own Grain iterator position into the same step directory.
    data_files = sorted(p.name for p in (ckpt / "6" / "data").glob("process_*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    rows = read_metrics(tmp_path)  # only process 0 writes metrics
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert rows[6]["loss"] < rows[1]["loss"]


def test_cluster_detection_from_environment():
    assert distributed.cluster_kind({}) is None
    assert distributed.cluster_kind({"FICA_COORDINATOR": "h:1"}) == "fica"
    assert distributed.cluster_kind({"FICA_DISTRIBUTED": "auto"}) == "auto"
    assert distributed.cluster_kind({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "slurm"
    assert distributed.cluster_kind({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.cluster_kind({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
    assert distributed.cluster_kind({"OMPI_COMM_WORLD_SIZE": "4"}) == "mpi"
    assert distributed.initialize_from_env({}) is False  # single process: nothing to do


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_sigterm_agrees_on_a_step_saves_and_exits_zero(tmp_path):
    """JAX's coordination service catches SIGTERM; both hosts stop at the same sync-point step."""
    procs = _launch(tmp_path, "--config.train.steps=100000")
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 5):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    saved = int(outs[0].split("preempted: saved step ")[1].split(",")[0])
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [str(saved)]
