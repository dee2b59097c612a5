"""Multi-controller start-up: `jax.distributed.initialize()` from the environment, before any JAX
computation, when the process is one of several.

Sources, first match wins:
  FICA_COORDINATOR=host:port, FICA_NUM_PROCESSES=N, FICA_PROCESS_ID=i  -- explicit (local tests,
      bare-metal clusters without a scheduler JAX knows);
  FICA_DISTRIBUTED=auto -- force JAX's own cluster detection (set by the launch/ scripts: a TPU
      VM's worker list comes from the metadata server, not always from the environment);
  SLURM (srun with more than one task), TPU pod slices / GKE (xpk), Open MPI -- JAX's own cluster
      detection fills in coordinator, count and id (`jax.distributed.initialize()` with no args).
Nothing is done for a single process. See launch/README.md for the launch commands.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax

from fica_jax.errors import UserError

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = (
    "FICA_COORDINATOR",
    "FICA_NUM_PROCESSES",
    "FICA_PROCESS_ID",
)


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise UserError(
            f"environment variable {key}={env.get(key)!r}: expected an integer"
        ) from None


def cluster_kind(env: Mapping[str, str] | None = None) -> str | None:
    """Which multi-process environment this is ("fica", "auto", "slurm", "tpu", "mpi") or None."""
    env = os.environ if env is None else env
    if ENV_COORDINATOR in env:
        return "fica"
    if env.get("FICA_DISTRIBUTED", "") == "auto":
        return "auto"
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def initialize_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Initialises `jax.distributed` when several processes are launched; True if it did."""
    env = os.environ if env is None else env
    kind = cluster_kind(env)
    if kind is None or jax.distributed.is_initialized():
        return False
    # CPU processes need a collectives library to run cross-process computations (tests, CI).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kind == "fica":
        for key in (ENV_NUM_PROCESSES, ENV_PROCESS_ID):
            if key not in env:
                raise UserError(f"{ENV_COORDINATOR} is set but {key} is not; set all three")
        jax.distributed.initialize(
            coordinator_address=env[ENV_COORDINATOR],
            num_processes=_int(env, ENV_NUM_PROCESSES),
            process_id=_int(env, ENV_PROCESS_ID),
        )
    else:
        jax.distributed.initialize()
    return True
