"""The persistent XLA compilation cache every `fica` command uses (`fica_jax.commands.main.use_compilation_cache`)."""

import os
import subprocess
import sys
import textwrap

import pytest

from fica_jax.commands import main as cli
from fica_jax.plan import planner as plan

_CACHE_VARS = ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE",
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "FICA_XLA_CACHE")  # fmt: skip


def _clean_env(monkeypatch):
    """A private copy of the environment without the cache variables: what
    `use_compilation_cache` writes must not reach the session's later tests (monkeypatch.delenv
    does not restore a key that was absent, so a written JAX_ENABLE_COMPILATION_CACHE=false
    would turn the cache off for every subprocess after this test)."""
    monkeypatch.setattr(
        os, "environ", {k: v for k, v in os.environ.items() if k not in _CACHE_VARS}
    )


@pytest.mark.multiprocess
def test_default_folder_override_and_off(monkeypatch, tmp_path):
    _clean_env(monkeypatch)
    assert cli.use_compilation_cache(str(tmp_path / "a")) == str(tmp_path / "a")
    assert os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == cli.CACHE_MIN_COMPILE_SECONDS
    _clean_env(monkeypatch)
    os.environ["FICA_XLA_CACHE"] = str(tmp_path / "b")
    assert cli.use_compilation_cache(str(tmp_path / "a")) == str(tmp_path / "b")
    _clean_env(monkeypatch)
    os.environ["FICA_XLA_CACHE"] = "off"
    assert cli.use_compilation_cache(str(tmp_path / "a")) is None
    assert os.environ["JAX_ENABLE_COMPILATION_CACHE"] == "false"
    assert "JAX_COMPILATION_CACHE_DIR" not in os.environ
    # a folder the user already gave JAX wins
    _clean_env(monkeypatch)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "mine")
    assert cli.use_compilation_cache(str(tmp_path / "a")) == str(tmp_path / "mine")


@pytest.mark.multiprocess
def test_a_second_process_loads_the_first_ones_program(tmp_path):
    """Same program in two fresh processes: the first writes an entry, the second reads it (JAX
    logs the hit) and gets the same numbers; with the cache off nothing is written."""
    code = textwrap.dedent(
        """
        import logging, sys
        from fica_jax.commands.main import use_compilation_cache
        print(use_compilation_cache(sys.argv[1]))
        import jax, jax.numpy as jnp
        logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
        logging.basicConfig(level=logging.WARNING)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() + jax.grad(lambda y: jnp.sin(y @ y).sum())(x).sum())
        print(repr(float(f(jnp.arange(256.0).reshape(16, 16) / 256))))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARS}
    run = lambda folder, **extra: subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
        env=env | extra, check=True,
    )  # fmt: skip
    first = run(tmp_path / "xla")
    entries = sorted(p.name for p in (tmp_path / "xla").iterdir())
    assert any(name.startswith("jit__lambda") for name in entries), entries
    second = run(tmp_path / "xla")
    assert second.stdout == first.stdout
    assert "cache hit" in second.stderr.lower(), second.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "xla").iterdir()) == entries
    off = run(tmp_path / "never", FICA_XLA_CACHE="off")
    assert off.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
    assert not (tmp_path / "never").exists()


@pytest.mark.multiprocess
def test_plans_compile_for_real(monkeypatch, tmp_path):
    """A plan reads the compiler's own output (SPMD dumps, HLO): a cache hit would skip the
    compile and lose the collectives. The planning subprocess writes no cache entry, and a
    second plan of the same step reports what the first did."""
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    a, b = (plan.plan_in_subprocess("configs/toy.py", "data=2,fsdp=4", "v5p") for _ in range(2))
    assert not (tmp_path / "xla").exists() or not any((tmp_path / "xla").iterdir())
    assert a["collective_bytes_per_device"]["total"] > 0
    assert b["collective_bytes_per_device"] == a["collective_bytes_per_device"]
    assert b["flops"] == a["flops"]
