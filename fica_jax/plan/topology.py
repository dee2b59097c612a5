"""A TPU slice that need not exist, for `fica plan --topology`: its chip name and its devices from
libtpu's topology description, so the TPU compiler compiles the step on this CPU host (MaxText's
`train_compile.py` way; `planner.plan`)."""

from __future__ import annotations

import os
import pathlib
import sys

from fica_jax.errors import UserError

# `pip install --target` libtpu here (or name another folder in FICA_LIBTPU / `--libtpu`).
LIBTPU_DIR = pathlib.Path(os.environ.get("FICA_LIBTPU", "~/.cache/fica/libtpu")).expanduser()
TOPOLOGY_CHIPS = {"v5p": "v5p", "v6e": "v6e", "v5e": "v5e", "v5litepod": "v5e"}
TOPOLOGY_ENV = {  # where the environment does not say otherwise
    "JAX_PLATFORMS": "cpu",  # libtpu only compiles; JAX's own backend stays the CPU
    "TPU_SKIP_MDS_QUERY": "1",  # do not look for a TPU VM's metadata server
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # no chip is touched, so plans may run side by side
}


def topology_chip(topology: str) -> str:
    """`v5p:4x4x4` -> "v5p": the `CHIPS` entry whose compiler the plan runs."""
    name, sep, dims = topology.partition(":")
    chip = TOPOLOGY_CHIPS.get(name.lower())
    if not sep or chip is None or not all(d.isdigit() for d in dims.split("x")):
        raise UserError(
            f"--topology {topology!r}: expected CHIP:AxBxC with CHIP one of "
            f"{sorted(TOPOLOGY_CHIPS)}, e.g. v5p:4x4x4 (64 chips) or v6e:8x8"
        )
    return chip


def topology_devices(topology: str, libtpu: str | None = None) -> list:
    """The devices of a TPU slice that need not exist: libtpu's topology description, so
    `compile()` runs the TPU compiler on this (CPU) host (MaxText's `train_compile.py` way).
    libtpu comes from `libtpu` (a folder made by `pip install --target`), `LIBTPU_DIR`, or the
    environment; it never becomes JAX's backend here (the parent sets JAX_PLATFORMS=cpu)."""
    topology_chip(topology)
    for d in (libtpu, LIBTPU_DIR):
        if d and pathlib.Path(d).is_dir() and str(d) not in sys.path:
            sys.path.insert(0, str(d))
    try:
        import libtpu  # noqa: F401
    except ImportError:
        where = libtpu or LIBTPU_DIR
        raise UserError(
            f"--topology needs libtpu (the TPU compiler), not found in {where} or the "
            f"environment: pip install --target {where} 'libtpu==0.0.42.*'"
        ) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu's own message names what it refused
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--topology {topology!r}: libtpu refused it ({msg})") from None
    return list(desc.devices)
