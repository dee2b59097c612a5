"""Does FiCA improve with data? The demo's recipe at 28 identities and at ~4x that.

  python benchmarks/fidelity.py --out /tmp/fidelity                     # 28 and 112 identities
  python benchmarks/fidelity.py --out /tmp/fidelity --identities 28 56  # other sizes

Each size is one `fica demo` run (`OUT/n<N>`, resumable: an interrupted size resumes, a finished
one is read back) with every stage's steps scaled by N / 28 (the same epochs over the data;
every 4th identity held out, so 7 and 28 held-out identities). The JSON
(`benchmarks/results/fidelity_cpu.json`) holds, per size: the main table and the ablation of
`fica eval`, the visible / unseen texel split (uv_texture table), the portrait row, the dense
stage's held-out figures and the `identity` summary (`demo_steps.identity_summary`, the same
object the demo's report carries); the PNG plots FiCA (3DGS) and the mean texture against identities with the
ground-truth-maps bound drawn in. The trend is stated in the JSON's `trend` line, whichever way it
goes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_io import write_result  # noqa: E402
from fica_jax.commands.demo_steps import identity_summary, table_row  # noqa: E402

BASE = 28  # the demo's identities; steps scale from here


def fica_tables_identities(tables: dict) -> int | None:
    return table_row(tables["main"], "3dgs").get("identities")


def run_size(out: pathlib.Path, n: int, seed: int) -> dict:
    """One demo run at `n` identities, steps scaled by n / 28; -> its figures."""
    from fica_jax.commands.demo import SIZES, run_demo

    sizes = json.loads(json.dumps(SIZES["default"]))
    scale = n / BASE
    sizes["steps"] = {k: max(1, round(v * scale)) for k, v in sizes["steps"].items()}
    t = time.time()
    report = run_demo(out / f"n{n}", n, seed, sizes)
    tables = json.loads((out / f"n{n}" / "eval" / "report.json").read_text())["tables"]
    dense = report["stages"]["dense"]
    return {
        "identities": n,
        "held_out": fica_tables_identities(tables),
        "steps": sizes["steps"],
        "seconds_this_run": round(time.time() - t, 1),
        "seconds_total": report.get("seconds_total"),
        "identity": identity_summary(tables, report["stages"]),
        "dense": {k: v for k, v in dense.items() if k.startswith("eval/")},
        "tables": tables,
    }  # fmt: skip


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """PSNR against identities (log2 axis): FiCA (3DGS), the mean texture and the ground-truth
    maps bound, each with +- one standard error (PIL, as `fica eval`'s charts: no plotting
    library is a dependency)."""
    from PIL import Image, ImageDraw

    from fica_jax.files import atomic_file

    series = (("3dgs", "FiCA (3DGS)", "#4c72b0"), ("mean", "mean texture", "#999999"),
              ("gt_upm", "GT maps -> UPM (bound)", "#c44e52"))  # fmt: skip
    pts = {m: [(r["identities"], table_row(r["tables"]["main"], m)) for r in rows]
           for m, *_ in series}  # fmt: skip
    ys = [
        v["psnr"] + s * (v.get("psnr_se") or 0) for p in pts.values() for _, v in p for s in (-1, 1)
    ]
    lo, hi = min(ys) - 0.5, max(ys) + 0.5
    n = [r["identities"] for r in rows]
    w, h, left, top = 420, 260, 50, 30
    im = Image.new("RGB", (w + 170, h + 70), "white")
    d = ImageDraw.Draw(im)
    d.text((4, 4), "held-out face PSNR (dB) vs identities (steps x identities / 28)", fill="black")
    lx = lambda v: left + (w - left - 20) * (0.5 if len(set(n)) == 1 else
                                             (np.log2(v) - np.log2(min(n))) / (np.log2(max(n)) - np.log2(min(n))))  # fmt: skip
    ly = lambda v: top + h - (h - 10) * (v - lo) / (hi - lo)
    for t in np.linspace(lo, hi, 5):
        d.line((left, ly(t), w, ly(t)), fill="#dddddd")
        d.text((4, ly(t) - 5), f"{t:.1f}", fill="black")
    for v in n:
        d.text((lx(v) - 6, top + h + 4), str(v), fill="black")
    for k, (m, name, colour) in enumerate(series):
        xy = [(lx(c), ly(v["psnr"])) for c, v in pts[m]]
        if len(xy) > 1:
            d.line(xy, fill=colour, width=2)
        for (_, v), (x, y) in zip(pts[m], xy, strict=True):
            se = v.get("psnr_se") or 0
            d.line((x, ly(v["psnr"] - se), x, ly(v["psnr"] + se)), fill=colour)
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.rectangle((w + 10, top + 16 * k, w + 20, top + 16 * k + 10), fill=colour)
        d.text((w + 24, top + 16 * k), name, fill="black")
    with atomic_file(path) as tmp:
        im.save(tmp, format="PNG")


def trend(rows: list[dict]) -> str:
    a, b = rows[0], rows[-1]
    fa, fb = (table_row(r["tables"]["main"], "3dgs") for r in (a, b))
    d, se = fb["psnr"] - fa["psnr"], (fa.get("psnr_se") ** 2 + fb.get("psnr_se") ** 2) ** 0.5
    word = "rises" if d > 2 * se else ("falls" if d < -2 * se else "does not change resolvably")
    ga, gb = a["identity"]["gap_closed"], b["identity"]["gap_closed"]
    out = (f"FiCA (3DGS) {fa['psnr']:.2f} dB at {a['identities']} identities -> {fb['psnr']:.2f} dB at "
           f"{b['identities']} ({d:+.2f} dB, s.e. of the difference {se:.2f}): it {word}; share "
           f"of the mean-texture-to-bound gap closed {ga:.0%} -> {gb:.0%}")  # fmt: skip
    # the stages' own held-out figures, and where the avatar loses to the bound, at both sizes
    pair = lambda f: " -> ".join(f(r) for r in (a, b))
    dense = lambda r: (
        f"{r['dense']['eval/uv_l1']:.3f} (mean map {r['dense']['eval/baseline_uv_l1']:.3f})"
    )
    dit = lambda r: (
        f"{r['identity']['dit_texture_psnr']:.2f} (mean {r['identity']['dit_mean_texture_psnr']:.2f})"
    )
    out += f". Dense UV L1 {pair(dense)}; DiT held-out texture PSNR {pair(dit)}"
    if all("geometry_cost_db" in r["identity"] for r in (a, b)):
        cost = lambda r: (
            f"VAE {r['identity']['gt_maps_bound_psnr'] - r['identity']['vae_maps_psnr']:.2f}, "
            f"geometry {r['identity']['geometry_cost_db']:.2f}, "
            f"texture {r['identity']['texture_cost_db']:.2f}"
        )
        out += f"; cost vs the bound (dB): {pair(cost)}"
    return out  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="work folder (one demo run per size; resumable)")
    p.add_argument("--identities", type=int, nargs="+", default=[BASE, 4 * BASE])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result", default=str(REPO / "benchmarks" / "results" / "fidelity_cpu.json"))
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    rows = [run_size(out, n, args.seed) for n in sorted(args.identities)]
    png = pathlib.Path(args.result).with_suffix(".png")
    plot(rows, png)
    write_result({
        "benchmark": "fica demo recipe at several dataset sizes (issue 27)",
        "recorded": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/fidelity.py " + " ".join(argv or sys.argv[1:]),
        "machine": "2 CPU cores, no GPU",
        "trend": trend(rows) if len(rows) > 1 else "one size only",
        "plot": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png),
        "rows": rows,
    }, args.result)  # fmt: skip


if __name__ == "__main__":
    main()
