"""Worker processes that exit when the process that started them dies, by any signal.

Why: a trainer that is SIGKILLed (preempted, OOM-killed) runs no cleanup, and the workers it
spawned (Grain's `mp_prefetch`, `fica data synth`'s pool) never notice: their queues and stop
events are pipes and shared memory they hold open themselves, so nothing tells them to stop and
they live on under init with their memory (~1 GB each for Grain), leaking it into the next job. Their exit also closes the last pipe to
multiprocessing's resource tracker, which then exits too.

How: `exit_with_parent(parent_pid)` runs first thing in each worker (`grain_worker_init` for
Grain). Both checks below compare `os.getppid()` with the pid the parent passed in, so a parent
that died before the worker got this far (the worker is then already reparented) is caught at
once rather than missed.

- Linux: `prctl(PR_SET_PDEATHSIG)` has the kernel signal the worker the moment its parent dies.
  Caveat: the kernel sends it when the parent *thread* that started the worker exits, not the
  parent process. Grain starts its workers from a thread pool, so asking for SIGKILL would kill
  healthy workers whenever such a thread ends. We ask for a spare real-time signal instead, and
  its handler exits only if the parent process is really gone (the kernel hands the worker to
  another thread of the parent and signals again when that one exits).
- Everywhere (the portable fallback, and the only check off Linux): a daemon thread polls
  `os.getppid()` every `poll_s` seconds.

Both run Python code, so a worker stuck in C code that holds the GIL exits when it lets go.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
# A real-time signal nothing else here uses; its handler is installed before the kernel may send it.
_PDEATH_SIGNAL = signal.SIGRTMIN + 5 if hasattr(signal, "SIGRTMIN") else None


def _exit_if_orphaned(parent_pid: int) -> None:
    if os.getppid() != parent_pid:
        os.write(2, f"worker {os.getpid()}: parent {parent_pid} died, exiting\n".encode())
        os._exit(1)


def _watch(parent_pid: int, poll_s: float) -> None:
    while True:
        _exit_if_orphaned(parent_pid)
        time.sleep(poll_s)


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Makes this (worker) process exit as soon as process `parent_pid`, its parent, dies."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    if sys.platform.startswith("linux") and _PDEATH_SIGNAL is not None and on_main_thread:
        signal.signal(_PDEATH_SIGNAL, lambda *_: _exit_if_orphaned(parent_pid))
        signal.siginterrupt(_PDEATH_SIGNAL, False)  # a false alarm must not fail a system call
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(_PDEATH_SIGNAL), 0, 0, 0) != 0:
            os.write(2, f"prctl(PR_SET_PDEATHSIG): errno {ctypes.get_errno()}\n".encode())
    _exit_if_orphaned(parent_pid)  # the parent may have died before the prctl
    threading.Thread(target=_watch, args=(parent_pid, poll_s), daemon=True).start()


def _grain_init(parent_pid: int, worker_index: int, worker_count: int) -> None:
    del worker_index, worker_count
    exit_with_parent(parent_pid)


def grain_worker_init() -> Callable[[int, int], None]:
    """A `worker_init_fn` for `IterDataset.mp_prefetch` that ties each Grain worker to the
    calling process (Grain's workers are spawned by the process that iterates)."""
    return functools.partial(_grain_init, os.getpid())
