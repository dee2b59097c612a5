"""The one table of accelerator figures used by MFU logging (`metrics`) and `fica plan`.

Peak dense bf16 FLOP/s, HBM bytes and per-chip interconnect bytes/s, from the vendors' published
specifications (docs/architecture.md §9); interconnect figures are upper bounds.
A100/H100 are the 80 GB SXM parts. `kinds` are substrings of `jax.Device.device_kind`.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Chip:
    peak_flops: float
    hbm_bytes: float
    link_bytes_per_s: float
    kinds: tuple[str, ...]


CHIPS: dict[str, Chip] = {
    "v5p": Chip(459e12, 95e9, 1200e9, ("v5p",)),
    "v6e": Chip(918e12, 32e9, 800e9, ("v6e", "v6 lite")),
    "v5e": Chip(197e12, 16e9, 400e9, ("v5e", "v5 lite")),
    "a100": Chip(312e12, 80e9, 600e9, ("a100",)),
    "h100": Chip(989e12, 80e9, 900e9, ("h100",)),
    "h200": Chip(989e12, 141e9, 900e9, ("h200",)),
}


def chip_of(device: jax.Device | None = None) -> Chip | None:
    """The table entry for a device (the first local one by default); None for CPUs etc."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for chip in CHIPS.values():
        if any(k in kind for k in chip.kinds):
            return chip
    return None
