"""`fica demo`: the whole FiCA pipeline at tiny scale on a CPU, from nothing to a drivable avatar
and the evaluation report.

synthetic captures (portrait + dome frames) -> stage `vae` -> stage `dense` -> latent cache
(the dense predictor's partial UV maps as control; every view of a training identity serves as
one of its portraits) -> stage `dit` (full conditioning) and its
ablations `dit-rgb` (partial RGB only) and `dit-maps` (+ normal & vertex maps) -> the DiT's maps
of every portrait (`fica sample`, both splits) -> stage `refiner` (trained on those maps mixed
with the corruption curriculum: what it will be given) -> stage `upm` -> one `fica export` folder per model in `OUT/models/` ->
`fica generate` for held-out portraits (`OUT/avatars/<id>`, camera and expression from the capture
as a `--pose` JSON) -> turntable and expression-sweep GIFs of the first -> `fica eval` into
`OUT/eval` (FiCA vs the mean-texture baseline and the ablations) -> `OUT/report.json`.

Every stage runs through the same `fica train` loop with the shipped `tiny` configs; the demo only
chooses data sizes and step counts (`SIZES`; `--quick` is the CI-sized run). Resumable: a step
whose output exists is skipped (a stage whose final checkpoint exists is not trained again, an
interrupted one resumes from its last checkpoint), so re-running with the same `--out` finishes
the job.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fica_jax.errors import UserError
from fica_jax.files import ensure_dir, write_json

_TRAINED = ("vae", "dense", "dit", "dit-rgb", "dit-maps", "refiner", "upm")
_DITS = ("dit", "dit-rgb", "dit-maps")  # the full DiT and its two ablations
SIZES = {
    # Full default: ~15-17 min on 2 idle cores (benchmarks/results/demo_report_cpu.json). 64^2
    # UV maps: at 32^2 the VAE's 4x4 latents lose to the 8x-downsample baseline (17.2 vs 17.4 dB
    # held-out texture PSNR after 300 steps); the DiT then sees 8x8x4 latents in 16 tokens.
    "default": dict(
        # every 4th identity held out: 21 to train on and 7 to evaluate on (1 in 8 gave 3
        # held-out identities, whose standard errors were larger than most ablation steps)
        identities=28,
        test_every=4,
        uv=64,
        image=64,
        frames=3,
        sample_steps=50,
        avatars=3,
        gif_size=128,
        eval_frames=None,
        # DiT samples per held-out identity in the eval: single-seed rows move by > 1 dB on 3
        # identities (seeds 0-3: RGB-only row 12.7, 14.9, 15.4, 14.6 dB); +~5 s
        eval_samples=4,
        steps={
            "vae": 300,
            # 900, not 300: held-out UV L1 0.165 vs 0.194 (U-Net branch), mask IoU 0.70 vs 0.62
            "dense": 900,
            # 600, not 300: held-out texture 11.3 vs 10.5 dB, geometry 3.1 vs 4.5 mm, +~10 s
            "dit": 600,
            "dit-rgb": 600,
            "dit-maps": 600,
            "refiner": 200,
            "upm": 300,
        },
        # per run, beside what the data fix (each stage's `fit_data`): the refiner's portrait
        # size, the DiTs' patch and held-out sampling steps (= sample_steps); learning rates
        # would go here too ("optim.lr")
        config={
            "refiner": {"data.image_size": 32, "model.input_source": "mix"},
            **dict.fromkeys(_DITS, {"model.patch": 2, "model.eval_steps": 50}),
        },
    ),  # fmt: skip
    # CI: the fewest identities / steps that still run every stage and every output.
    "quick": dict(
        identities=9,
        test_every=8,
        uv=32,
        image=64,
        frames=1,
        sample_steps=4,
        avatars=1,
        gif_size=48,
        eval_frames=1,
        eval_samples=1,
        steps={name: 8 for name in _TRAINED},
        config={
            "refiner": {"data.image_size": 32, "model.input_source": "mix"},
            **dict.fromkeys(_DITS, {"model.patch": 1, "model.eval_steps": 4}),
        },
    ),  # fmt: skip
}


@dataclass
class Step:
    """One resumable step: skipped when `output` exists. `run` makes it (-> report entry);
    `describe` (optional) gives the entry's figures either way (so a resumed report has them)."""

    name: str
    output: pathlib.Path
    run: Callable[[], dict | None]
    describe: Callable[[], dict] | None = None


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: on a shared machine
    a step's wall time grows with the load, its CPU time hardly does."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_steps(steps: list[Step], report: dict, save: Callable[[dict], None]) -> dict:
    """Runs the steps in order, timing each, saving the report after every one. A skipped step
    keeps the entry (and seconds) of the run that made it."""
    done = report.setdefault("steps", {})
    for step in steps:
        if step.output.exists():
            entry = {**done.get(step.name, {}), "skipped": True}
        else:
            print(f"[demo] {step.name} -> {step.output}", flush=True)
            t, c = time.time(), _cpu_seconds()
            entry = {**(step.run() or {}), "seconds": round(time.time() - t, 1),
                     "cpu_seconds": round(_cpu_seconds() - c, 1), "skipped": False}  # fmt: skip
            if not step.output.exists():
                raise RuntimeError(f"demo step {step.name} did not write {step.output}")
        if step.describe is not None:
            entry |= step.describe()
        done[step.name] = entry
        save(report)
    return report


def portrait_example(record, rng, opts) -> dict:
    """What the conditioning sheet shows of a capture record: the portrait (view 0, resized
    only: its partial UV maps were unwrapped from it), the partial UV maps and the UV maps."""
    from data_pipelines import transforms as T

    ex, _ = T.warp_view(record, 0, rng, opts, geometric=False)
    return {
        "image": ex["image"],
        "partial_uv": T.float32(record["partial_uv"]),
        **T.uv_maps(record),
    }


def _conditioning_rows(data_dir, dense_model, vae_model, vae_cfg, image_size: int) -> tuple:
    """Held-out portraits -> dense predictions -> partial UV maps, beside the ground truth and
    the VAE's reconstructions (one sheet row per portrait) and a summary."""
    import jax.numpy as jnp

    from data_pipelines.pipeline import CaptureData, first_batch, open_source
    from fica_jax.infer import conditioning
    from fica_jax.infer.latents import map_stats, model_inputs

    # Through the training pipeline itself (un-augmented eval pass): what the stages see.
    names = [str(r["identity"]) for r in open_source(data_dir, "test")][:3]
    read = CaptureData(portrait_example)
    kw = dict(global_batch_size=len(names), num_epochs=1, image_size=image_size)
    batch = {k: jnp.asarray(v) for k, v in first_batch(read(vae_cfg, "eval", 0, 1, **kw)).items()}
    images, n, uv = batch["image"], len(names), int(vae_cfg.data.uv_resolution)
    cond = conditioning.condition(images, dense_model, uv)
    x, _ = model_inputs(batch, map_stats(vae_cfg))
    recon = vae_model.decode(vae_model.encode(x).mode())
    geo = lambda y: (np.asarray(y) + 1) * 0.5  # [-1, 1] positions as colours
    rows, hits = [], []
    for i in range(n):
        pred, gt = np.asarray(cond.partial_uv[i]), np.asarray(batch["partial_uv"][i])
        hits.append(float(((pred[..., 3] > 0.5) & (gt[..., 3] > 0.5)).sum() / max(gt[..., 3].sum(), 1)))  # fmt: skip
        uv_img = np.concatenate([np.asarray(cond.dense["uv"][i]), np.zeros((*images.shape[1:3], 1))], -1)  # fmt: skip
        rows.append([
            ("portrait", images[i]),
            ("pred mask", np.asarray(cond.dense["mask"][i])[..., None].repeat(3, -1)),
            ("pred UV (u,v,0)", uv_img), ("partial UV rgb", pred[..., :3]),
            ("GT partial rgb", gt[..., :3]), ("GT texture", batch["uv_texture"][i]),
            ("VAE texture", geo(recon[i])), ("GT geometry", geo(x[n + i])),
            ("VAE geometry", geo(recon[n + i])),
        ])  # fmt: skip
    summary = {"embedding": cond.embedding, "embedding_dim": int(cond.image_emb.shape[-1]),
               "partial_uv_texel_recall_vs_gt": float(np.mean(hits)), "portraits": names}  # fmt: skip
    return rows, summary


def _conditioning_sheet(out: pathlib.Path, data: pathlib.Path, sizes: dict) -> dict:
    from fica_jax.preview import write_sheet
    from fica_jax.train.checkpoint import load_model, load_run_config

    (vcfg, vae), (dcfg, dense) = (
        (c, load_model(c, out / "runs" / n)[1])
        for n in ("vae", "dense")
        for c in [load_run_config(out / "runs" / n)]
    )
    rows, summary = _conditioning_rows(data, dense, vae, vcfg, int(dcfg.data.image_size))
    write_sheet(rows, out / "conditioning.png")
    return {**summary, "png": str(out / "conditioning.png")}


def plan(out: pathlib.Path, identities: int, seed: int, sizes: dict) -> list[Step]:
    """Every step of the demo, in order, as resumable `Step`s."""
    from fica_jax.commands import demo_steps as ds

    data, runs, models, avatars = out / "data", out / "runs", out / "models", out / "avatars"
    cache = out / "cache"

    def synth():
        from data_pipelines.synth import synthesize
        from data_pipelines.synthetic.generator import SynthConfig

        c = SynthConfig(uv_resolution=sizes["uv"], image_size=sizes["image"],
                        n_frames=sizes["frames"], test_every=sizes["test_every"])  # fmt: skip
        synthesize(data, identities, c, seed=seed, progress=False)
        return {"dir": str(data), "identities": identities}

    def latent_cache():
        from fica_jax.infer.latent_cache import build_cache

        # every view of a training identity as its portrait: 4x the DiT's (conditioning, target)
        # pairs; the held-out identities keep their portrait
        build_cache(data, runs / "vae", cache, dense_run=runs / "dense", unshuffle=1, train_views=0)
        return {"dir": str(cache), "control": "dense", "train_views": "all"}

    def train_step(name):
        def run():
            src = out / ds.RUNS[name][1]  # the captures or the latent cache
            cfg = ds.stage_cfg(name, src, sizes["steps"][name], sizes, ds.data_meta(src))
            if cfg.model.get("input_source", "corrupt") != "corrupt":  # the refiner's DiT maps
                with cfg.unlocked():
                    cfg.model.samples_dir = str(runs / "dit-samples" / "maps")
            ds.train(cfg, runs / name)
            return {"run": str(runs / name), "steps": int(cfg.train.steps)}

        final = runs / name / "checkpoints" / str(sizes["steps"][name])
        return Step(f"train {name}", final, run, lambda: ds.held_out(runs / name))

    steps = [Step("synthesise captures", data / "metadata.json", synth)]
    steps += [train_step("vae"), train_step("dense")]
    steps.append(Step("latent cache", cache / "metadata.json", latent_cache))
    steps += [train_step(n) for n in _DITS]

    def dit_samples():  # what the refiner trains on: the DiT's maps of every portrait, their
        # geometry fitted to its landmarks as `fica generate` fits it before the refiner
        from fica_jax.commands.sample import sample_run

        ref = ds.stage_cfg("refiner", data, sizes["steps"]["refiner"], sizes, ds.data_meta(data))
        keep = float(ref.model.shape_fit_residual)
        got = {split: sample_run(runs / "dit", cache, samples / split, steps=sizes["sample_steps"],
                                 split=split, maps=samples / "maps", fit_shape=data,
                                 fit_residual=keep)
               for split in ("train", "test")}  # fmt: skip
        write_json(samples / "done.json", got)
        return {"dir": str(samples), **{f"{k}_identities": v["identities"] for k, v in got.items()},
                **{f"{k}_fitted": v["shape_fit"]["fitted"] for k, v in got.items()}}  # fmt: skip

    samples = runs / "dit-samples"
    steps.append(Step("dit samples", samples / "done.json", dit_samples))
    steps += [train_step(n) for n in ("refiner", "upm")]
    steps.append(Step("conditioning sheet", out / "conditioning.png",
                      lambda: _conditioning_sheet(out, data, sizes)))  # fmt: skip
    for name in _TRAINED:
        run = lambda n=name: ds.export(runs / n, models / n)
        steps.append(Step(f"export {name}", models / name / "model.json", run))

    held = ds.portraits(data, out / "portraits", sizes["avatars"]) if data.exists() else []
    for name, png, pose in held:
        run = lambda p=png, j=pose, n=name: ds.avatar(p, j, models, avatars / n, sizes["sample_steps"])  # fmt: skip
        steps.append(Step(f"generate {name}", avatars / name / "avatar.json", run))
    if held:
        first = avatars / held[0][0]
        for mode in ("turntable", "sweep"):
            gif = avatars / f"{held[0][0]}_{mode}.gif"
            steps.append(Step(f"{mode} gif", gif, lambda g=gif, m=mode: ds.gif(first, g, m, sizes["gif_size"])))  # fmt: skip
    steps.append(Step("evaluate", out / "eval" / "report.json", lambda: _evaluate(out, sizes)))
    return steps


def _evaluate(out: pathlib.Path, sizes: dict) -> dict:
    from fica_jax.eval.harness import evaluate

    rep = evaluate(out / "models", out / "data", out / "eval", backend="jax",
                   steps=sizes["sample_steps"], frames=sizes["eval_frames"],
                   samples=sizes["eval_samples"], progress=True)  # fmt: skip
    return {"dir": str(out / "eval"), "tables": rep.get("tables"),
            "seconds_eval": rep.get("info", {}).get("seconds")}  # fmt: skip


def run_demo(out: pathlib.Path, identities: int, seed: int, sizes: dict) -> dict:
    """Runs (or resumes) the whole demo in `out`; returns the report (also `out/report.json`)."""
    from fica_jax.commands import demo_steps as ds

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; expected a folder (new, or an earlier demo's)")
    ensure_dir(out)
    if (out / "data" / "metadata.json").is_file():
        ds.check_data(out / "data", identities, seed, sizes)
    path = out / "report.json"
    try:
        report = json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        report = {}
    report |= {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "identities": identities,
               "seed": seed, "sizes": sizes, "cpu_count": os.cpu_count(),
               "loadavg_start": list(os.getloadavg())}  # fmt: skip

    def save(rep):
        write_json(path, rep, default=str)

    t0 = time.time()
    # The plan lists the avatars' portraits once the captures exist: plan again after them
    # (without the captures step, so a fresh run does not report it as skipped).
    run_steps(plan(out, identities, seed, sizes)[:1], report, save)
    run_steps(plan(out, identities, seed, sizes)[1:], report, save)
    report["stages"] = {n: report["steps"][f"train {n}"] for n in _TRAINED}
    tables = report["steps"].get("evaluate", {}).get("tables")
    if tables:  # issue 27's figures: does the avatar carry the portrait's identity?
        report["identity"] = ds.identity_summary(tables, report["stages"])
    report["seconds_this_run"] = round(time.time() - t0, 1)
    for key in ("seconds", "cpu_seconds"):
        report[f"{key}_total"] = round(sum(s.get(key, 0.0) for s in report["steps"].values()), 1)
    report["loadavg_end"] = list(os.getloadavg())
    save(report)
    return report


def outputs(out: pathlib.Path) -> list[pathlib.Path]:
    """Every file the demo leaves for the user (the training runs' folders by name only)."""
    files = [out / "report.json", out / "conditioning.png"]
    for sub in ("models", "avatars", "eval", "portraits"):
        files += sorted(p for p in (out / sub).rglob("*") if p.is_file() and not p.name.startswith("."))  # fmt: skip
    return [p for p in files if p.is_file()] + [out / "data", *sorted((out / "runs").glob("*"))]


def _cmd(args, extra) -> int:
    if extra:
        raise UserError(f"fica demo takes no config overrides, got {extra}")
    sizes = json.loads(json.dumps(SIZES["quick" if args.quick else "default"]))
    identities = args.identities or sizes["identities"]
    k = sizes["test_every"]
    if identities < k + 1:
        raise UserError(
            f"--identities must be >= {k + 1} (the last of every {k} is held out for testing)"
        )
    if args.steps is not None:
        if args.steps < 1:
            raise UserError(f"--steps {args.steps}: expected a positive number of steps")
        sizes["steps"] = {n: args.steps for n in sizes["steps"]}
    out = pathlib.Path(args.out)
    report = run_demo(out, identities, args.seed, sizes)
    lines = []
    for name, st in report["stages"].items():
        figs = ", ".join(f"{k} {v['value']:.4g} vs {v['baseline']:.4g}{'' if v['better'] else ' (NOT better)'}"
                         for k, v in st.get("vs_baseline", {}).items())  # fmt: skip
        lines.append(f"[demo] {name} held-out (value vs baseline): {figs}")
    lines += [f"[demo] {n}: {s.get('seconds', 0):.0f} s{' (earlier run)' if s['skipped'] else ''}"
              for n, s in report["steps"].items()]  # fmt: skip
    lines.append("[demo] outputs:")
    lines += [f"  {p}" for p in outputs(out)]
    lines.append(f"[demo] report {out / 'report.json'}, eval {out / 'eval' / 'report.md'} "
                 f"({report['seconds_total']:.0f} s of steps, {report['seconds_this_run']:.0f} s this run)")  # fmt: skip
    print("\n".join(lines))
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="synthetic data -> every stage -> avatar + eval report")
    p.add_argument("--out", default="demo_out", help="output folder (resumable)")
    p.add_argument("--quick", action="store_true", help="the CI-sized run (minutes)")
    p.add_argument("--identities", type=int, default=None, help="default 28 (--quick 9)")
    p.add_argument("--steps", type=int, default=None, help="steps of every stage (debugging)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
