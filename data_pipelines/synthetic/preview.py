"""Saves a PNG contact sheet of synthetic identities, to check them by eye.

    python -m data_pipelines.synthetic.preview out.png --count 3 --seed 0

One labelled row per identity (`fica_jax.preview`): portrait with landmarks (green visible, red
hidden), the portrait's partial UV RGB, the ground-truth UV texture, then the dome frames.
"""

from __future__ import annotations

import argparse

import numpy as np

from data_pipelines.synthetic.generator import SynthConfig, make_identity
from fica_jax.preview import write_sheet


def contact_rows(records: list[dict[str, np.ndarray]]) -> list[list[tuple[str, np.ndarray]]]:
    """One row of (label, image) per identity (module doc), for `fica_jax.preview`."""
    rows = []
    for r in records:
        size = r["view_image"].shape[1]
        portrait = r["view_image"][0].copy()
        for (x, y), vis in zip(r["view_kpts"][0], r["view_kpts_visible"][0], strict=True):
            xi, yi = int(x), int(y)
            if 0 <= xi < size and 0 <= yi < size:
                portrait[max(yi - 1, 0) : yi + 1, max(xi - 1, 0) : xi + 1] = (
                    [0, 255, 0] if vis else [255, 0, 0]
                )
        partial = np.clip(r["partial_uv"][..., :3].astype(np.float32) * 255, 0, 255)
        row = [("portrait", portrait), ("partial UV", partial.astype(np.uint8)),
               ("UV texture", r["uv_texture"])]  # fmt: skip
        row += [(f"frame {v}", im) for v, im in enumerate(r["view_image"][1:], 1)]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="PNG path to write")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = SynthConfig()
    records = [make_identity(i, cfg, args.seed) for i in range(args.count)]
    write_sheet(contact_rows(records), args.out, records[0]["view_image"].shape[1])


if __name__ == "__main__":
    main()
