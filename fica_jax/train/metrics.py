"""Observability: JSONL + TensorBoard scalars, throughput and MFU, progress bar, profiler window.

`WORKDIR/metrics.jsonl` gets one JSON object per logged step (`{"step": ..., "loss": ...}`), the
same scalars go to TensorBoard event files in `WORKDIR/tb`. MFU = (matmul FLOPs of one compiled
step per device, counted from its HLO with scan trip counts, `hlo_stats`) x steps/s / peak dense
bf16 FLOP/s of the chip (docs/architecture.md §9). Remat recomputation is included, so with remat on
this is hardware-FLOPs utilisation, an upper bound on model-FLOPs MFU. Left out on chips without a
known peak (CPU).
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Mapping

import jax

from fica_jax.perf.chips import chip_of


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of the device's chip (`fica_jax.perf.chips`); None if unknown."""
    chip = chip_of(device)
    return chip.peak_flops if chip else None


def compiled_flops(compiled) -> float | None:
    """XLA's FLOPs of one call of a compiled (SPMD-partitioned, so per-device) computation.

    XLA counts a while-loop body once, so this under-counts scanned models; it is the fallback
    when the HLO text cannot be read (`hlo_stats.analyze` is preferred).
    """
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


class MetricsWriter:
    """Writes scalars to metrics.jsonl and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> dict[int, dict]:
    """step -> last row written for it (a resumed run rewrites the steps it repeats)."""
    out: dict[int, dict] = {}
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["step"]] = row
    return out


class Throughput:
    """Steps/s, examples/s and MFU over the interval since the last call."""

    def __init__(self, global_batch: int, flops_per_step: float | None, peak: float | None):
        self.global_batch, self.flops, self.peak = global_batch, flops_per_step, peak
        self._t, self._steps = time.perf_counter(), 0

    def tick(self) -> None:
        self._steps += 1

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        dt, n = max(now - self._t, 1e-9), self._steps
        self._t, self._steps = now, 0
        out = {"steps_per_s": n / dt, "examples_per_s": n * self.global_batch / dt}
        if self.flops and self.peak:
            out["mfu"] = self.flops * n / dt / self.peak
        return out


class Progress:
    """A tqdm bar on an interactive terminal (process 0); otherwise, with `log_every`, one
    `label: n/total` line every `log_every` items (so a batch job's log shows progress)."""

    def __init__(
        self, total: int, initial: int, enabled: bool, label: str = "", log_every: int = 0
    ):
        self._bar, self._n, self.total = None, initial, total
        self.label, self.log_every = label, log_every if enabled else 0
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc=label or None)
            self.log_every = 0

    def update(self, n: int = 1, **postfix) -> None:
        self._n += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()})
        elif self.log_every and (self._n % self.log_every < n or self._n == self.total):
            extra = " ".join(f"{k}={v:.4g}" for k, v in postfix.items())
            print(f"{self.label}: {self._n}/{self.total} {extra}".rstrip(), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class ProfileWindow:
    """Starts a JAX profiler trace before step `start` and stops it after step `stop`."""

    def __init__(self, workdir: str | pathlib.Path, steps: tuple[int, int] | None):
        self.dir = str(pathlib.Path(workdir) / "profile")
        self.steps, self.active = steps, False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0] and not self.active:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, sync) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(sync)
            jax.profiler.stop_trace()
            self.active = False
