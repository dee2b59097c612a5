"""docs/results.md, generated from the result files in benchmarks/results/ so that no figure on it
is copied by hand.

  python benchmarks/results_page.py           # writes docs/results.md
  python benchmarks/results_page.py --check   # exit 1 (one line) when docs/results.md is stale

Each result file is read by the section that knows its shape (the demo's report, the rasteriser,
avatar rendering, GPU checks, `fica plan`, the DiT and dense step benchmarks); a file of any other
shape is listed with its scalar top-level keys. Every table names the file it comes from and the
device and conditions the file states; files marked `superseded` or `partial` say so.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.results_format import (  # noqa: E402
    DECIMALS,
    gb,
    heading,
    ms,
    notes,
    num,
    pm,
    source,
    table,
)
from fica_jax.files import write_text  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PAGE = REPO / "docs" / "results.md"
COMMAND = "python benchmarks/results_page.py"


# ---------------------------------------------------------------------------------------- the demo
def label(metric: str) -> str:
    return metric.upper().replace("_", "-")


def eval_table(rows: list[dict], delta_from: str) -> list[str]:
    """The `fica eval` table: each metric as mean ± s.e. over identities, and its paired change
    (Δ ± s.e.) from `delta_from`; resolved: |Δ| over two standard errors (docs/evaluation.md)."""
    metrics = [m for m in DECIMALS if any(isinstance(r.get(m), int | float) for r in rows)]
    header = ["method", "identities"]
    for m in metrics:
        header += [label(m), f"Δ {label(m)} vs {delta_from}", "resolved"]
    body = []
    for r in rows:
        line = [r.get("label", r.get("method", "?")), r.get("identities")]
        for m in metrics:
            digits = DECIMALS[m]
            delta, dse = r.get(f"{m}_delta"), r.get(f"{m}_delta_se")
            resolved = "-" if delta is None or dse is None else num(abs(delta) > 2 * dse)
            line += [pm(r.get(m), r.get(f"{m}_se"), digits),
                     pm(delta, dse, digits, sign=True), resolved]  # fmt: skip
        body.append(line)
    out = table(header, body)
    for m in DECIMALS:  # a metric without a figure: why, once
        why = sorted({r[m] for r in rows if isinstance(r.get(m), str)})
        out += [f"{label(m)}: {w}" for w in why] + ([""] if why else [])
    return out


def stages_table(stages: dict) -> list[str]:
    rows, wins, total = [], 0, 0
    for stage, s in stages.items():
        for figure, v in s.get("vs_baseline", {}).items():
            better = v.get("better")
            wins, total = wins + bool(better), total + 1
            rows.append([f"{stage} ({num(s.get('steps'))} steps)", figure, v.get("value"),
                         v.get("baseline"), "wins" if better else "loses"])  # fmt: skip
    out = table(["stage", "held-out figure", "value", "baseline", "stage vs baseline"], rows)
    return out + [f"{wins} of {total} figures beat their baseline.", ""]


def beside(d: dict, key: str, what: str) -> list[str]:
    """The record's `identity` figures with those of the runs under `key` beside them, one
    column per run (`replicates`: the same recipe elsewhere; `earlier`: earlier records, each
    saying in `recipe` what differs), so one run is never read as the only outcome."""
    runs = d.get(key) or []
    if not (d.get("identity") and runs):
        return []
    name = lambda r: ", ".join(str(r[k]) for k in ("machine", "recipe") if r.get(k))
    out = [f"{what} (`{key}`: "
           + "; ".join(f"{i + 1}: commit {r.get('commit')}, {name(r)}" for i, r in enumerate(runs))
           + "):", ""]  # fmt: skip
    head = ["figure", f"this record ({d.get('commit')})", *map(str, range(1, len(runs) + 1))]
    rows = [[k, d["identity"][k], *(r.get("identity", {}).get(k) for r in runs)]
            for k in d["identity"]]  # fmt: skip
    return out + table(head, rows)


def demo(name: str, d: dict, link: str) -> list[str]:
    out = heading(d.get("benchmark", name), d) + source(name, d, link)
    report = d.get("report", {})
    wall = d.get("wall_s")
    total = report.get("seconds_total")
    if wall is not None:
        cpu = [f"{num(d[k])} s {k[:-6]}" for k in ("user_cpu_s", "sys_cpu_s") if k in d]
        m, s = divmod(round(wall), 60)
        out += [f"Wall time: **{m} min {s} s** ({num(wall)} s" + "".join(", " + c for c in cpu)
                + ").", ""]  # fmt: skip
    if total is not None:
        out += [f"Seconds summed over the report's steps: {num(total)} "
                f"({num(report.get('cpu_count'))} CPUs, load average at start "
                f"{num((report.get('loadavg_start') or [None])[0])}, at end "
                f"{num((report.get('loadavg_end') or [None])[0])}).", ""]  # fmt: skip
    sizes = report.get("sizes", {})
    if sizes:  # the run's identity count is the report's own (a --identities flag overrides)
        flat = ", ".join(f"{k} {v}" for k, v in sizes.items()
                         if k != "identities" and not isinstance(v, dict | list))  # fmt: skip
        steps = ", ".join(f"{k} {v}" for k, v in sizes.get("steps", {}).items())
        out += [f"Identities: {num(report.get('identities', sizes.get('identities')))}; sizes: "
                f"{flat}." + (f" Train steps: {steps}." if steps else ""), ""]  # fmt: skip
    if d.get("per_step_s"):
        out += ["Seconds per step of the demo:", ""]
        out += table(["step", "seconds"], [[k, v] for k, v in d["per_step_s"].items()])
    for key in sorted(k for k in d if k.startswith("eval_tables")):
        tables = d[key]
        what = "" if key == "eval_tables" else f" (`{key}`)"
        if key != "eval_tables" and d.get("eval_4_samples_command"):
            what += f", from `{d['eval_4_samples_command']}`"
        if tables.get("main"):
            out += [
                f"Pipeline on held-out identities{what}: mean ± standard error over "
                "identities; Δ paired by identity against the mean texture:",
                "",
            ]
            out += eval_table(tables["main"], "mean texture")
        if tables.get("ablation"):
            out += [f"Ablation{what}, in the paper's order; Δ against the row above:", ""]
            out += eval_table(tables["ablation"], "row above")
        if tables.get("portrait"):
            out += [f"Portrait row{what}: each avatar rendered from its portrait's own camera, "
                    "expression and gaze vs the portrait, face region:", ""]  # fmt: skip
            out += eval_table(tables["portrait"], "mean texture")
        if tables.get("uv_texture"):
            out += [f"UV texture{what} on the texels the portrait shows (visible) and the rest "
                    "(unseen), against the ground-truth texture:", ""]  # fmt: skip
            out += eval_table(tables["uv_texture"], "mean texture")
        if tables.get("budget"):
            out += [f"Error budget{what}, dome frames: the bound with the VAE's round trip, or "
                    "with one of FiCA's maps in place of its own; Δ against the bound:", ""]  # fmt: skip
            out += eval_table(tables["budget"], "bound")
    if d.get("identity"):
        out += ["Identity figures (`identity`, issue 27):", ""]
        out += table(["figure", "value"], [[k, v] for k, v in d["identity"].items()])
    out += beside(d, "replicates", "The same figures from other runs of the recipe")
    out += beside(d, "earlier", "The same figures from earlier records, another recipe")
    if report.get("stages"):
        out += [
            "Each stage's held-out figures against its own baselines (`report.json`, "
            "`vs_baseline`):",
            "",
        ]
        out += stages_table(report["stages"])
    return out + notes(d)


# ------------------------------------------------------------------------------------ rendering
def render(name: str, d: dict, link: str) -> list[str]:
    """`benchmarks/render.py`: the rasteriser's ms per frame, rows grouped by scene, one column
    pair (forward, forward + backward) per path."""
    out = heading(f"Rasteriser, {d.get('device', '?')}", d) + source(name, d, link)
    for k in (
        "tile_size",
        "chunk",
        "complete",
        "all_dropped_zero",
        "auto_over_sequential_max",
        "old_slower_everywhere",
    ):
        if k in d:
            out.append(f"- {k.replace('_', ' ')}: `{num(d[k])}`")
    for k in ("growth_512", "upm_speedup"):
        if isinstance(d.get(k), dict):
            out.append(f"- {k.replace('_', ' ')}: "
                       + ", ".join(f"{a} {num(b)}" for a, b in d[k].items()))  # fmt: skip
    out.append("")
    paths = list(dict.fromkeys(r["path"] for r in d["rows"]))
    groups: dict[tuple, dict] = {}
    for r in d["rows"]:
        key = (r.get("workload"), r.get("uv_map"), r.get("N"), r.get("size"))
        groups.setdefault(key, {})[r["path"]] = r
    header = ["workload", "N", "size", "intersections"]
    for p in paths:
        header += [f"{p} fwd ms", f"{p} fwd+bwd ms"]
    rows = []
    for (workload, uv, n, size), by in groups.items():
        isects = next((r["n_isects"] for r in by.values() if "n_isects" in r), None)
        line = [workload + (f" (UV {uv})" if uv else ""), n, f"{size} px", isects]
        for p in paths:
            r = by.get(p, {})
            line += ["skipped", "skipped"] if "skipped" in r else [r.get("fwd_ms"),
                                                                  r.get("fwd_bwd_ms")]  # fmt: skip
        rows.append(line)
    out += table(header, rows)
    skipped = list(dict.fromkeys(r["skipped"] for r in d["rows"] if "skipped" in r))
    return out + [f"Skipped: {s}" for s in skipped] + ([""] if skipped else []) + notes(d)


def avatar_render(name: str, d: dict, link: str) -> list[str]:
    """`benchmarks/gsplat_render.py` and `benchmarks/upm_drive.py`: driving and rendering an
    avatar, per backend or size."""
    title = "Avatar rendering" if d.get("benchmark") == "gsplat_render" else "Driving the UPM"
    out = heading(f"{title}, {d.get('device', '?')}", d) + source(name, d, link)
    if "avatar" in d:
        out += [f"Avatar: `{d['avatar']}`, {num(d.get('frames'))} frames.", ""]
    cols = [c for c in ("backend", "uv_map", "N", "visible_texels", "size", "drive_ms",
                        "render_ms", "fps", "render_first_ms", "psnr_vs_jax", "n_isects",
                        "isect_capacity", "isect_overflow") if c in d["rows"][0]]  # fmt: skip
    out += table([c.replace("_", " ") for c in cols], [[r.get(c) for c in cols] for r in d["rows"]])
    return out + notes(d)


def gpu_checks(name: str, d: dict, link: str) -> list[str]:
    out = heading(f"GPU checks, {d.get('device', '?')}", d) + source(name, d, link)
    rows = [[f"`{t}`", v.get("result"), v.get("figures")] for t, v in d.get("tests", {}).items()]
    out += table(["test", "result", "figures"], rows)
    runs = ", ".join(f"`{b}`" for b in d.get("benchmarks", []))
    return out + ([f"Benchmarks of the same session: {runs}.", ""] if runs else [])


# --------------------------------------------------------------------------------- fica plan
def plan_rows(plans: list[tuple[str, dict, str]]) -> list[str]:
    """`fica plan` reports: memory per chip against each chip's HBM, predicted step and MFU."""
    from fica_jax.perf.chips import CHIPS  # the one table of chip figures

    out = ["Each file is one `fica plan` run (`benchmarks/plan.py`): the real train step "
           "compiled for a mesh of devices that are not there, by the CPU compiler (fake devices) "
           "or, where the compiler column says so, by the TPU compiler (libtpu, `--topology`). "
           "Step times and MFU are a per-op roofline over that program (docs/architecture.md "
           "§9-§10), not measurements.", ""]  # fmt: skip
    mem, speed = [], []
    for name, d, link in plans:
        config = re.search(r"--config (\S+)", d.get("command", ""))
        config = config.group(1) if config else d.get("config", {}).get("stage", "?")
        mesh = ",".join(f"{k}={v}" for k, v in d["mesh"].items() if v != 1) or "1 device"
        where = f"[`{name}`]({link})"
        compiler = d.get("compiler", "cpu (fake devices)")
        b = d["per_device_bytes"]
        mem.append([where, f"`{config}`", mesh, compiler, d.get("param_count"), gb(b.get("params")),
                    gb(b.get("optimizer_state")), gb(b.get("temp_activations")),
                    gb(b.get("peak_estimate"))])  # fmt: skip
        ratio = d.get("flops", {}).get("hardware_over_model")
        kernel = (d.get("renderer") or {}).get("step", {})
        for chip, r in d["roofline"].items():
            hbm = CHIPS[chip].hbm_bytes if chip in CHIPS else None
            k = kernel.get(chip, {})
            speed.append([where, mesh, chip, f"{gb(b.get('peak_estimate'))} / {gb(hbm)}",
                          num(r.get("fits_hbm")), ms(r.get("compute_s")),
                          ms(r.get("op_roofline_s")), ms(r.get("async_copy_s")),
                          ms(r.get("collective_s")), ms(r.get("step_s")),
                          ms(k.get("kernel_s")), ms(k.get("step_s")),
                          num(k.get("renderer_share"), 2),
                          num(r.get("mfu"), 3), num(r.get("mfu_no_overlap"), 3),
                          num(ratio, 3)])  # fmt: skip
    out += ["Memory per chip (the compiler's memory analysis):", ""]
    out += table(["file", "config", "mesh", "compiler", "parameters", "params", "optimizer",
                  "activations", "peak"], mem)  # fmt: skip
    out += ["Predicted step per chip (peak memory against the chip's HBM from "
            "`fica_jax/perf/chips.py`):", ""]  # fmt: skip
    out += ["The renderer's compositing kernel is a custom call the HLO roofline cannot see: "
            "where a stage renders, its compute is given analytically (pixel-Gaussian pairs of a "
            "representative frame x vector ops per pair / the chip's vector throughput, "
            "`fica_jax/plan/render_cost.py`) and added to the step (`step + renderer`, no "
            "overlap assumed); `renderer share` is its part of that.", ""]  # fmt: skip
    out += table(["file", "mesh", "chip", "peak / HBM", "fits", "compute", "op roofline",
                  "async DMA", "collectives", "step (overlap)", "renderer kernel",
                  "step + renderer", "renderer share", "MFU", "MFU, no overlap",
                  "hardware / model FLOPs"], speed)  # fmt: skip
    return out


# ------------------------------------------------------------------------------ step benchmarks
def dit_step(name: str, d: dict, link: str) -> list[str]:
    out = heading("DiT train step: ours vs diffusers", d) + source(name, d, link)
    shape = d.get("shape", {})
    out += ["Shape: " + ", ".join(f"{k} {v}" for k, v in shape.items())
            + f"; loss: {d.get('loss', '?')}; optimizer {d.get('optimizer', {}).get('name', '?')}.",
            ""]  # fmt: skip
    rows = []
    for k in ("ours", "diffusers", "ours_cpu_variant", "ours_with_control"):
        if isinstance(d.get(k), dict):
            r = d[k]
            rows.append([k, r.get("params"), r.get("step_median_s"), r.get("cpu_s_median"),
                         r.get("compile_s"), r.get("xla_temp_mb")])  # fmt: skip
    out += table(["implementation", "parameters", "step s (median)", "CPU s per step",
                  "compile s", "XLA temp MB"], rows)  # fmt: skip
    ratios = [
        f"{k.replace('_', ' ')} {num(v)}"
        for k, v in d.items()
        if k.startswith(("ratio", "params_ratio", "target")) and not isinstance(v, dict)
    ]
    out += ["Ratios: " + "; ".join(ratios) + ".", ""] if ratios else []
    if isinstance(d.get("sampling"), dict):
        out += ["Sampling (one call, `rows_per_call` rows):", ""]
        rows = [[k, r.get("params"), f"{r.get('width')}/{r.get('depth')}/{r.get('heads')}",
                 r.get("rows_per_call"), r.get("steps"), r.get("cfg_scale"), r.get("median_s"),
                 r.get("per_step_ms")] for k, r in d["sampling"].items()]  # fmt: skip
        out += table(["variant", "parameters", "width/depth/heads", "rows", "steps", "cfg",
                      "seconds", "ms per step"], rows)  # fmt: skip
    return out + notes(d)


def dense_step(name: str, d: dict, link: str) -> list[str]:
    out = heading(f"Dense train step, {d.get('shape', {}).get('image_size', '?')} px", d)
    out += source(name, d, link)
    out += ["Shape: " + ", ".join(f"{k} {v}" for k, v in d.get("shape", {}).items()) + ".", ""]
    speedup = d.get("speedup_vs_first", {})
    rows = [[r["impl"], r.get("step_s_median"), r.get("steps_per_s"), speedup.get(r["impl"]),
             r.get("compile_s"), r.get("step_gflops")] for r in d["rows"]]  # fmt: skip
    out += table(["head implementation", "step s (median)", "steps/s", "speed-up vs first",
                  "compile s", "GFLOP per step"], rows)  # fmt: skip
    parts = list(dict.fromkeys(p for r in d["rows"] for p in r.get("parts_ms", {})))
    if parts:
        out += ["Parts, ms (forward / forward + backward):", ""]
        rows = [[p] + [r.get("parts_ms", {}).get(p, {}).get("ms") for r in d["rows"]]
                for p in parts]  # fmt: skip
        out += table(["part"] + [r["impl"] for r in d["rows"]], rows)
    if "first_loss_max_abs_diff" in d:
        out += [f"First loss, largest difference between implementations: "
                f"{num(d['first_loss_max_abs_diff'])}.", ""]  # fmt: skip
    return out + notes(d)


# ---------------------------------------------------------------------------------- any other file
def generic(name: str, d: dict, link: str) -> list[str]:
    """A file of unknown shape: its scalar top-level keys (one level of nesting flattened)."""
    rows = []
    for k, v in d.items():
        items = v.items() if isinstance(v, dict) else [("", v)]
        for sub, x in items:
            key = f"{k}.{sub}" if sub else k
            if isinstance(x, list) and all(not isinstance(e, dict | list) for e in x):
                rows.append([key, ", ".join(num(e) for e in x)])
            elif not isinstance(x, dict | list):
                rows.append([key, x])
    flags = {k: d[k] for k in ("superseded", "partial") if k in d}
    return heading(f"`{name}`", d) + source(name, flags, link) + table(["key", "value"], rows)


def kind(d: dict) -> str:
    if "eval_tables" in d:
        return "demo"
    if d.get("benchmark") == "render" and "rows" in d:
        return "render"
    if d.get("benchmark") in ("gsplat_render", "upm_drive") and d.get("rows"):
        return "avatar"
    if d.get("check") == "gpu_checks":
        return "gpu"
    if "roofline" in d and "per_device_bytes" in d and "mesh" in d:
        return "plan"
    if str(d.get("benchmark", "")).endswith("dit_step.py"):
        return "dit_step"
    if "speedup_vs_first" in d and d.get("rows"):
        return "dense_step"
    if any(k.startswith("synthesize_") for k in d):
        return "synth"
    return "generic"


SECTIONS = (  # (title, kinds, intro)
    ("The demo", ("demo",), "`fica demo --out demo_out` on a CPU: every stage at tiny scale on "
     "synthetic captures, then `fica eval` on held-out identities (conventions in "
     "docs/evaluation.md). Each file's heading says what run it records."),
    ("Rasteriser and avatar rendering", ("render", "avatar", "gpu"), "Milliseconds per frame "
     "after compilation; each file names its device."),
    ("Planned scale", ("plan",), ""),
    ("Train-step benchmarks", ("dit_step", "dense_step"), ""),
    ("Data generation", ("synth",), "`benchmarks/synth.py`: synthetic captures as `fica data "
     "synth` makes them."),
    ("Other results", ("generic",), "Files of no known shape: their scalar top-level keys."),
)  # fmt: skip
RENDERERS = {"demo": demo, "render": render, "avatar": avatar_render, "gpu": gpu_checks,
             "dit_step": dit_step, "dense_step": dense_step, "synth": generic,
             "generic": generic}  # fmt: skip


def page(results: pathlib.Path = RESULTS, out: pathlib.Path = PAGE) -> str:
    """The whole page for the JSON files in `results`, with links relative to `out`."""
    files = []
    for path in sorted(results.glob("*.json")):
        d = json.loads(path.read_text())
        link = pathlib.Path(os.path.relpath(path, out.parent)).as_posix()
        files.append((kind(d) if isinstance(d, dict) else "generic", path.name, d, link))
    lines = [f"*Generated by `{COMMAND}` from `benchmarks/results/*.json`: edit those files or "
             f"the script, not this page; `{COMMAND} --check` fails when it is stale.*", "",
             "# Results", "",
             "Every table names the file it comes from and the device and conditions recorded "
             "in it. Quality figures come from synthetic captures at tiny scale; scale figures "
             "are compiled plans, not measured steps.", ""]  # fmt: skip
    for title, kinds, intro in SECTIONS:
        mine = [f for f in files if f[0] in kinds]
        if not mine:
            continue
        lines += [f"## {title}", ""] + ([intro, ""] if intro else [])
        if kinds == ("plan",):
            lines += plan_rows([(name, d, link) for _, name, d, link in mine])
            continue
        for k, name, d, link in sorted(mine, key=lambda f: (kinds.index(f[0]), f[1])):
            lines += RENDERERS[k](name, d, link)
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=pathlib.Path, default=RESULTS)
    ap.add_argument("--out", type=pathlib.Path, default=PAGE)
    ap.add_argument("--check", action="store_true", help="exit 1 if --out is not up to date")
    args = ap.parse_args(argv)
    text = page(args.results, args.out)
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is stale: run {COMMAND}")
            return 1
        return 0
    write_text(args.out, text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
