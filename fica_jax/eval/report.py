"""`fica eval`'s outputs: tables in the paper's layout (`report.md`, `report.json`), the
per-identity breakdown (`per_identity.csv`, `per_identity.png`) and the best / median / worst
frame sheet (`frames.png`). Figures are means over identities of each identity's mean over its
frames (and DiT samples, `fica eval --samples`), ± their standard error over identities; each
row also gives its change, paired identity by identity, from the mean-texture baseline (main
table) or from the row above (ablation), so a reader can see what the held-out set resolves.
The portrait table (renders from view 0's own camera) and the UV texture table (PSNR on the
texels the portrait shows / the unseen ones, `texture.py`) are aggregated the same way, each
paired with the mean-texture baseline; the error-budget table's rows are paired with the
ground-truth-maps bound."""

from __future__ import annotations

import csv
import math
import pathlib
import time

import numpy as np

from fica_jax.errors import UserError
from fica_jax.files import atomic_file, write_json, write_text

NAMES = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "id_csim": "ID-CSIM",
         "visible_psnr": "PSNR visible texels (dB)", "unseen_psnr": "PSNR unseen texels (dB)"}  # fmt: skip
TABLES = ("frames", "portrait", "uv_texture")  # metrics.csv's `table` column


def _mean(values) -> float | None:
    """Mean of the values present; NaN (a texel set empty for that identity) counts as absent."""
    v = [float(x) for x in values if x not in ("", None) and not math.isnan(float(x))]
    return float(np.mean(v)) if v else None


def split_rows(rows: list[dict]) -> dict[str, list[dict]]:
    """Metrics rows by their `table` (rows without one, as before it existed: "frames")."""
    out = {t: [] for t in TABLES}
    for r in rows:
        out[r.get("table") or "frames"].append(r)
    return out


def per_identity(rows: list[dict], metrics=None) -> dict[tuple[str, str], dict[str, float | None]]:
    """{(identity, method): {metric: mean over the identity's frames and samples}}."""
    from fica_jax.eval.protocol import METRICS

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["identity"], r["method"]), []).append(r)
    ms = metrics or METRICS
    return {k: {m: _mean(r.get(m) for r in g) for m in ms} for k, g in groups.items()}


def _se(values: list[float]) -> float | None:
    """Standard error of the mean over identities (None below two)."""
    return float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else None


def table(
    rows: list[dict], methods, notes: dict[str, str], paired: str = "", metrics=None
) -> list[dict]:
    """One dict per (method, label): metric means over identities (`<metric>_se`: their standard
    error), or the reason missing. `paired` "above" / "first": also each metric's change from the
    row above (the ablation's steps) / from the first row (the baseline), identity by identity
    (`<metric>_delta`, `<metric>_delta_se`). `metrics`: the frame metrics unless given."""
    from fica_jax.eval.protocol import METRICS

    metrics = metrics or METRICS
    ids = per_identity(rows, metrics)
    out, prev = [], None
    for key, label in methods:
        mine = {i: v for (i, m), v in ids.items() if m == key}
        row = {"method": key, "label": label, "identities": len(mine)}
        for metric in metrics:
            vals = {i: v[metric] for i, v in mine.items() if v[metric] is not None}
            if not mine:
                row[metric] = "not trained"
            elif not vals:
                row[metric] = notes.get(metric, "unavailable")
            else:
                row[metric] = float(np.mean(list(vals.values())))
                row[f"{metric}_se"] = _se(list(vals.values()))
                both = sorted(set(vals) & set(prev or {}))
                if paired and prev is not None and both:  # prev: the row compared with
                    diff = [vals[i] - prev[i][metric] for i in both if prev[i][metric] is not None]
                    if diff:
                        row[f"{metric}_delta"] = float(np.mean(diff))
                        row[f"{metric}_delta_se"] = _se(diff)
        out.append(row)
        prev = mine if paired == "above" or prev is None else prev
    return out


def _cell(r: dict, m: str) -> str:
    """`mean ± s.e.` (and `(Δ ± s.e.)` when paired) or the reason missing."""
    if not isinstance(r[m], float):
        return str(r[m])

    def pm(value: float, se: float | None, fmt: str) -> str:
        return format(value, fmt) + ("" if se is None else f" ± {se:.4f}")

    text = pm(r[m], r.get(f"{m}_se"), ".4f")
    if f"{m}_delta" in r:
        text += f" (Δ {pm(r[f'{m}_delta'], r[f'{m}_delta_se'], '+.4f')})"
    return text


def _markdown(title: str, rows: list[dict], metrics=None) -> str:
    from fica_jax.eval.protocol import HIGHER_IS_BETTER, METRICS

    ms = metrics or METRICS
    arrow = {True: "↑", False: "↓"}
    head = "| Method | " + " | ".join(f"{NAMES[m]} {arrow[HIGHER_IS_BETTER[m]]}" for m in ms)
    lines = [f"### {title}", "", head + " |", "|" + "---|" * (len(ms) + 1)]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_cell(r, m) for m in ms) + " |")
    return "\n".join(lines) + "\n"


def _bar_chart(ids: dict, methods, path: pathlib.Path) -> None:
    """Per-identity PSNR bars, one colour per method (PIL; no plotting library needed)."""
    from PIL import Image, ImageDraw

    names = sorted({i for i, _ in ids})
    keys = [(k, lab) for k, lab in methods if any(m == k for _, m in ids)]
    colours = ["#999999", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2"]
    vals = [ids.get((i, k), {}).get("psnr") or 0.0 for i in names for k, _ in keys]
    top = max(vals + [1.0]) * 1.1
    bw, gap, h, left, legend = 14, 18, 260, 40, 16 * len(keys) + 10
    w = left + len(names) * (bw * len(keys) + gap) + 20
    im = Image.new("RGB", (max(w, 360), h + 40 + legend), "white")
    d = ImageDraw.Draw(im)
    d.text((4, 2), "held-out PSNR on the face region (dB), per identity", fill="black")
    for t in np.linspace(0, top, 5):
        y = 20 + h - int(h * t / top)
        d.line((left - 4, y, im.width, y), fill="#dddddd")
        d.text((2, y - 6), f"{t:.0f}", fill="black")
    for a, ident in enumerate(names):
        x0 = left + a * (bw * len(keys) + gap)
        for b, (k, _) in enumerate(keys):
            v = ids.get((ident, k), {}).get("psnr") or 0.0
            x = x0 + b * bw
            d.rectangle((x, 20 + h - int(h * v / top), x + bw - 2, 20 + h), fill=colours[b % 6])
        d.text((x0, 24 + h), ident[-6:], fill="black")
    for b, (_, lab) in enumerate(keys):
        y = h + 44 + 16 * b
        d.rectangle((left, y, left + 10, y + 10), fill=colours[b % 6])
        d.text((left + 16, y - 1), lab, fill="black")
    with atomic_file(path) as tmp:
        im.save(tmp, format="PNG")


def _frames_sheet(rows: list[dict], sheets: dict, path: pathlib.Path) -> None:
    """Best / median / worst FiCA (3DGS) frames: GT | 3DGS | 4x error | mesh | mean baseline."""
    from fica_jax.preview import write_sheet

    scored = sorted((r["psnr"], r["identity"], r["frame"]) for r in rows if r["method"] == "3dgs")
    if not scored:
        return
    picks = [("best", scored[-1]), ("median", scored[len(scored) // 2]), ("worst", scored[0])]
    grid = []
    for tag, (psnr, ident, frame) in picks:
        by = {m: next(x for x in sheets[ident][m] if x[0]["view"] == frame) for m in sheets[ident]}
        f, img, face = by["3dgs"]
        err = np.abs(img - f["image"]).mean(-1, keepdims=True) * face[..., None]
        row = [(f"{tag} {ident[-6:]} v{frame}", f["image"]), (f"3DGS {psnr:.1f} dB", img),
               ("4x |error| (face)", np.repeat(np.clip(4 * err, 0, 1), 3, -1))]  # fmt: skip
        row += [
            (lab, by[m][1]) for m, lab in (("mesh", "FiCA (Mesh)"), ("mean", "mean tex")) if m in by
        ]
        grid.append(row)
    write_sheet(grid, path, 128)


def gather_parts(out: pathlib.Path, count: int, timeout: float = 3600.0) -> list[dict]:
    """Process 0: every host's `metrics.part-K.csv` (waits until all exist)."""
    parts = [out / f"metrics.part-{k}.csv" for k in range(count)]
    deadline = time.time() + timeout
    while not all(p.is_file() for p in parts):
        if time.time() > deadline:
            missing = [str(p) for p in parts if not p.is_file()]
            raise UserError(f"fica eval: parts never arrived: {missing}")
        time.sleep(2.0)
    rows = []
    for p in parts:
        with open(p, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def write_report(out: pathlib.Path, rows: list[dict], sheets: dict, info: dict) -> dict:
    """`rows`: every table's metrics rows (`split_rows`) -> report.json's tables "main",
    "ablation", "portrait", "uv_texture" and "budget", report.md, per_identity.csv/png,
    frames.png."""
    from fica_jax.eval.protocol import ABLATION, BUDGET, MAIN, METRICS, UV_METRICS, UV_TEXTURE

    notes = {
        m: info["weights"][m] for m in ("lpips", "id_csim") if "unavailable" in info["weights"][m]
    }
    by = split_rows(rows)
    rows = by["frames"]
    tables = {
        "main": table(rows, MAIN, notes, paired="first"),
        "ablation": table(rows, ABLATION, notes, paired="above"),
        "portrait": table(by["portrait"], MAIN, notes, paired="first"),
        "uv_texture": table(by["uv_texture"], UV_TEXTURE, {}, paired="first", metrics=UV_METRICS),
        "budget": table(rows, BUDGET, notes, paired="first"),
    }
    ids = per_identity(rows)
    with atomic_file(out / "per_identity.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["identity", "method", *METRICS])
        for (i, m), v in sorted(ids.items()):
            w.writerow([i, m, *("" if v[k] is None else f"{v[k]:.6f}" for k in METRICS)])
    _bar_chart(ids, MAIN, out / "per_identity.png")
    if sheets:
        first = [r for r in rows if isinstance(r["psnr"], float) and int(r.get("sample") or 0) == 0]
        _frames_sheet(first, sheets, out / "frames.png")
    text = (
        "# fica eval\n\n"
        f"{info['identities']} held-out identities of `{info['data']}` ({info['split']} split), "
        f"models `{info['models']}`, backend {info['backend']}, {info['steps']} DiT steps, "
        f"{info.get('samples', 1)} DiT sample(s) per identity (seeds from {info.get('seed', 0)}), "
        f"portrait pose: {info['pose']}. Face-region metrics, conventions in docs/evaluation.md; "
        "± is the standard error over identities; Δ, paired by identity, is the change from the "
        "mean-texture baseline (main, portrait and UV texture tables) or from the row above "
        "(ablation) or from the bound (error budget). "
        f"LPIPS: {info['weights']['lpips']}; ID-CSIM: {info['weights']['id_csim']}.\n\n"
        + _markdown("Held-out animation (paper Table 1 layout)", tables["main"])
        + "\n"
        + _markdown("Ablation (paper Table 2 order)", tables["ablation"])
        + "\n"
        + _markdown(
            "Portrait (view 0: the input's own camera, expression and gaze)", tables["portrait"]
        )
        + "\nUV textures vs the capture's on the atlas texels the portrait shows (visible) and "
        "on the rest (unseen); Δ from the mean texture on the same texels.\n\n"
        + _markdown("UV texture: visible vs unseen texels", tables["uv_texture"], UV_METRICS)
        + "\nWhere FiCA (3DGS) loses to the bound on the dome frames; Δ from the bound.\n\n"
        + _markdown("Error budget", tables["budget"])
    )
    write_text(out / "report.md", text)
    rep = {"info": info, "tables": tables}
    write_json(out / "report.json", rep)
    return rep
