"""`benchmarks/fidelity.py`'s trend line and plot from hand-made rows (the runs themselves take
~2 hours on 2 cores: `python benchmarks/fidelity.py --out DIR`), and the committed record has both
sizes."""

from __future__ import annotations

import json
import pathlib

from PIL import Image

from benchmarks import fidelity

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _row(n, fica, mean, bound, se, costs=None):
    main = [{"method": "mean", "psnr": mean, "psnr_se": se},
            {"method": "3dgs", "psnr": fica, "psnr_se": se},
            {"method": "gt_upm", "psnr": bound, "psnr_se": se}]  # fmt: skip
    ident = {"gap_closed": (fica - mean) / (bound - mean), "gt_maps_bound_psnr": bound,
             "dit_texture_psnr": 17.0, "dit_mean_texture_psnr": 15.0}  # fmt: skip
    if costs:
        ident |= {"vae_maps_psnr": bound - costs[0], "geometry_cost_db": costs[1],
                  "texture_cost_db": costs[2]}  # fmt: skip
    dense = {"eval/uv_l1": 0.1, "eval/baseline_uv_l1": 0.2}
    return {"identities": n, "tables": {"main": main}, "identity": ident, "dense": dense}


def test_trend_says_which_way_it_goes_with_the_stages_and_the_budget():
    up = fidelity.trend([_row(28, 14.0, 12.0, 18.0, 0.3), _row(112, 16.0, 12.0, 18.0, 0.3)])
    assert "it rises" in up and "33% -> 67%" in up and "Dense UV L1 0.100 (mean map 0.200)" in up
    assert "cost vs the bound" not in up  # rows from before the error budget
    flat = fidelity.trend([_row(28, 14.0, 12.0, 18.0, 1.0, (1.4, 1.8, 1.5)),
                           _row(112, 13.5, 12.0, 18.0, 1.0, (0.8, 1.5, 1.6))])  # fmt: skip
    assert "does not change resolvably" in flat and "(-0.50 dB" in flat
    assert "VAE 1.40, geometry 1.80, texture 1.50 -> VAE 0.80, geometry 1.50" in flat
    down = fidelity.trend([_row(28, 15.0, 12.0, 18.0, 0.1), _row(112, 13.0, 12.0, 18.0, 0.1)])
    assert "it falls" in down


def test_plot_draws_every_series(tmp_path):
    png = tmp_path / "f.png"
    fidelity.plot([_row(28, 14.0, 12.0, 18.0, 0.3), _row(112, 16.0, 12.5, 17.5, 0.3)], png)
    img = Image.open(png).convert("RGB")
    colours = {c for _, c in img.getcolors(1 << 16)}
    assert {(0x4C, 0x72, 0xB0), (0x99, 0x99, 0x99), (0xC4, 0x4E, 0x52)} <= colours


def test_committed_record_has_two_sizes_and_its_plot():
    rec = json.loads((ROOT / "benchmarks" / "results" / "fidelity_cpu.json").read_text())
    sizes = [r["identities"] for r in rec["rows"]]
    assert sizes == [28, 112] and "partial" not in rec
    assert all(r["tables"]["main"] and r["identity"]["fica_3dgs_psnr"] for r in rec["rows"])
    assert (ROOT / rec["plot"]).stat().st_size > 0 and rec["trend"].startswith("FiCA (3DGS)")
