"""A SIGKILLed `fica train` / `fica data synth` leaves no worker processes behind (Linux /proc).

Each test starts the command with 2 workers, records every process it has started (workers and
multiprocessing's resource tracker) once the workers are at work, SIGKILLs it, and requires
all of them gone (or zombies) within 10 s.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc"),
    pytest.mark.multiprocess,
]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of `pid`, or None if it is gone."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return fields[0], int(fields[1]), int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[1], []).append(int(entry))
            starts[int(entry)] = st[2]
    found, todo = {}, [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            found[pid] = starts[pid]
            todo.append(pid)
    return found


def _workers(root: int) -> list[int]:
    """Descendants started by multiprocessing's spawn (Grain and synth workers)."""
    out = []
    for pid in _descendants(root):
        try:
            cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmd:
            out.append(pid)
    return out


def _alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[2] == start and st[0] not in "ZX"


def _kill_and_check(log: pathlib.Path, busy: pathlib.Path, pattern: str, *args: str) -> None:
    """Runs `fica ARGS` (output to `log`) until it has 2 spawned workers and file `busy` matches
    regex `pattern`, SIGKILLs it, and requires every process it had started to be gone (or a
    zombie) within 10 s."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    with log.open("wb") as out:  # a file, not a pipe nobody reads: the child never blocks on it
        cmd = [sys.executable, "-m", "fica_jax.commands.main", *args]
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        return len(_workers(proc.pid)) >= 2 and bool(
            busy.is_file() and re.search(pattern, busy.read_text())
        )

    deadline = time.monotonic() + 120
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "workers never started"
        time.sleep(0.1)
    procs = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = time.monotonic()
    while time.monotonic() < killed + 10 and any(_alive(p, s) for p, s in procs.items()):
        time.sleep(0.1)
    left = [p for p, s in procs.items() if _alive(p, s)]
    for pid in left:  # so that a failing test does not leak them either
        os.kill(pid, signal.SIGKILL)
    print(f"{len(procs)} processes, {len(left)} alive {time.monotonic() - killed:.1f} s later")
    assert not left, f"{len(left)} of {len(procs)} processes outlived their parent by 10 s"


def test_killed_trainer_leaves_no_grain_workers(synth_dir, tmp_path):
    run = tmp_path / "run"
    _kill_and_check(
        tmp_path / "train.log", run / "metrics.jsonl", '"loss"',  # a step ran on workers' batches
        "train", "vae", "--config", "configs/vae.py:tiny", "--workdir", str(run),
        f"--config.data.dir={synth_dir}", "--config.data.uv_resolution=32",
        "--config.data.batch_size=2", "--config.data.workers=2", "--config.train.steps=100000",
        "--config.train.log_every=1", "--config.model.block_out_channels=(8,8)",
        "--config.model.norm_groups=4",
    )  # fmt: skip


def test_killed_synth_leaves_no_workers(tmp_path):
    log = tmp_path / "synth.log"
    _kill_and_check(
        log, log, r"\| *[1-9]\d*/",  # tqdm: an identity is done
        "data", "synth", "--out", str(tmp_path / "data"), "--identities", "5000",
        "--workers", "2", "--resolution", "32", "--image-size", "32", "--frames", "1",
    )  # fmt: skip
