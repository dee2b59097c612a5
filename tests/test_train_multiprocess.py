"""The multi-host code path: two `jax.distributed` CPU processes on loopback, one device each."""

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from fica_jax.train import distributed
from fica_jax.train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_process_run_trains_and_checkpoints(tmp_path):
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
        cmd = [sys.executable, "-m", "fica_jax.train.cli", "train", "toy"]
        cmd += ["--config", "configs/toy.py", "--workdir", str(tmp_path)]
        cmd += [
            "--config.train.steps=6",
            "--config.train.ckpt_every=3",
            "--config.train.log_every=1",
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
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
