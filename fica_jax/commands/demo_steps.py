"""The steps `fica demo` chains: stage configs at the demo's sizes, training (skipped once the
final checkpoint exists), held-out figures vs baselines, exports, avatars and their GIFs."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from fica_jax.config import load_config
from fica_jax.errors import UserError
from fica_jax.files import atomic_file, ensure_dir, write_text

# The exports `fica generate` / `fica eval` read (`--models DIR/<name>`), the runs behind them:
# name -> (config, the folder of OUT it trains on: the captures or the latent cache).
RUNS = {"vae": ("vae:tiny", "data"), "dense": ("dense:tiny", "data"), "dit": ("dit:tiny", "cache"),
        "dit-rgb": ("dit:tiny-rgb", "cache"), "dit-maps": ("dit:tiny-maps", "cache"),
        "refiner": ("refiner:tiny", "data"), "upm": ("upm:tiny", "data")}  # fmt: skip


def data_meta(data_dir: pathlib.Path) -> dict:
    """The `metadata.json` of a folder a run trains on (the captures; the one-part latent cache)."""
    from data_pipelines.shards import METADATA_FILE, read_metadata_file

    return read_metadata_file(pathlib.Path(data_dir) / METADATA_FILE)


def stage_cfg(name: str, data_dir: pathlib.Path, steps: int, sizes: dict, meta: dict):
    """`RUNS[name]`'s tiny config fitted to the data it trains on (its stage's `fit_data` of the
    data's `metadata.json`, `meta`), with the demo's overrides for the run (`sizes["config"]`):
    all devices on fsdp, `steps` steps, held-out metrics once, at the end."""
    from fica_jax.train.stage import get_stage

    spec = RUNS[name][0]
    o = [f"--config.data.dir={data_dir}", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
         f"--config.train.steps={steps}", f"--config.optim.warmup_steps={max(1, steps // 10)}",
         f"--config.train.eval_every={steps}", f"--config.train.ckpt_every={steps}"]  # fmt: skip
    stage = get_stage(load_config(spec, o).stage)
    fit = stage.fit_data(meta) if stage.fit_data is not None else {}
    o += [f"--config.{k}={v}" for k, v in {**fit, **sizes["config"].get(name, {})}.items()]
    return load_config(spec, o)


def final_step(run: pathlib.Path) -> int | None:
    """The newest complete checkpoint of a run (Orbax renames a step's folder to its number only
    once it is complete), without opening Orbax."""
    root = run / "checkpoints"
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    return max(steps, default=None)


def train(cfg, run: pathlib.Path) -> None:
    from fica_jax.train import loop

    print(f"[demo] train {cfg.stage}: {cfg.train.steps} steps -> {run}", flush=True)
    loop.train(cfg, run)


def held_out(run: pathlib.Path) -> dict:
    """The run's last logged `eval/...` figures, and each baseline beside its metric, better or
    not in the direction the run's stage declares (`Stage.metrics`; an undeclared metric with a
    baseline is a `UserError`): {"eval/x": v, ..., "vs_baseline": {x: {"value", "baseline",
    "better"}}}."""
    from fica_jax.train.checkpoint import load_run_config
    from fica_jax.train.metrics import read_metrics
    from fica_jax.train.stage import get_stage, vs_baselines

    final: dict = {}
    for _, row in sorted(read_metrics(run).items()):
        final.update(row)
    evals = {k[5:]: v for k, v in final.items() if k.startswith("eval/")}
    stage = get_stage(load_run_config(run).stage)
    return {
        "step": final.get("step"),
        **{f"eval/{k}": v for k, v in evals.items()},
        "vs_baseline": vs_baselines(stage, evals),
    }


def export(run: pathlib.Path, out: pathlib.Path) -> dict:
    """`fica export` of a run: its EMA params where it keeps them (the DiTs sample with theirs)."""
    from fica_jax.export.model_export import export_run
    from fica_jax.train.checkpoint import load_run_config

    ema = float(load_run_config(run).optim.get("ema_decay", 0.0)) > 0
    meta = export_run(run, out, ema=ema)
    return {"dir": str(out), "step": meta["source"]["step"], "ema": ema,
            "parameters": meta["parameters"]}  # fmt: skip


def portraits(
    data_dir: pathlib.Path, out: pathlib.Path, n: int
) -> list[tuple[str, pathlib.Path, pathlib.Path]]:
    """The first `n` held-out identities' portraits (PNG) and their capture camera, expression
    and landmarks as a `--pose` JSON (`fica_jax.infer.pose.load_pose_json`: what a face tracker
    would give) -> [(identity, png, json)]."""
    from PIL import Image

    from data_pipelines.pipeline import open_source

    src = open_source(data_dir, "test")
    ensure_dir(out)
    got = []
    for i in range(min(n, len(src))):
        rec = src[i]
        name = str(rec["identity"])
        png, js = out / f"{name}.png", out / f"{name}.pose.json"
        if not (png.is_file() and js.is_file()):
            img = np.asarray(rec["view_image"][0])
            pose = {"image_size": list(img.shape[:2]), "K": rec["view_K"][0].tolist(),
                    "viewmat": rec["view_viewmat"][0].tolist(),
                    "expression": rec["view_expression"][0].tolist(),
                    "landmarks": rec["view_kpts"][0].tolist(),
                    "landmarks_visible": rec["view_kpts_visible"][0].tolist()}  # fmt: skip
            with atomic_file(png) as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
            write_text(js, json.dumps(pose))
        got.append((name, png, js))
    return got


def avatar(png: pathlib.Path, pose: pathlib.Path, models: pathlib.Path, out: pathlib.Path,
           steps: int) -> dict:  # fmt: skip
    from fica_jax.commands.generate import generate_avatar

    # the held-out portraits are the dataset's own, framed as training portraits already: the
    # face detector (which misses some turned procedural heads) has nothing to correct
    info = generate_avatar(png, models, out, steps=steps, pose=pose, align=False)
    return {"dir": str(out), "refined": info["refined"], "seconds_by_part": info["seconds"]}


def gif(avatar_dir: pathlib.Path, out: pathlib.Path, mode: str, size: int) -> dict:
    from fica_jax.avatar.drive import render_avatar

    res = render_avatar(avatar_dir, out, mode=mode, size=size)
    return {"file": res["out"], "frames": res["frames"], "size": size}


def check_data(data_dir: pathlib.Path, identities: int, seed: int, sizes: dict) -> None:
    """A resumed `--out` must hold the captures this run would synthesise."""
    from data_pipelines.shards import read_metadata

    gen = read_metadata(data_dir).get("generator", {})
    cfg = gen.get("config", {})
    have = {"identities": gen.get("identities"), "uv_resolution": cfg.get("uv_resolution"),
            "image_size": cfg.get("image_size"), "n_frames": cfg.get("n_frames"), "seed": gen.get("seed"),
            "test_every": cfg.get("test_every")}  # fmt: skip
    want = {"identities": identities, "uv_resolution": sizes["uv"], "image_size": sizes["image"],
            "n_frames": sizes["frames"], "seed": seed, "test_every": sizes["test_every"]}  # fmt: skip
    for key, value in want.items():
        if have[key] is not None and int(have[key]) != value:
            raise UserError(
                f"{data_dir}/metadata.json: {key} {have[key]}, this demo run needs {value}; "
                "pass another --out (or the flags that wrote this one)"
            )


def table_row(table: list[dict], method: str) -> dict:
    return next((r for r in table if r.get("method") == method), {})


def identity_summary(tables: dict, stages: dict) -> dict:
    """The issue-27 figures of one demo run: FiCA (3DGS) vs the mean texture and the
    ground-truth-maps bound (share of the gap closed), SSIM, the visible-texel gain over the mean
    texture and the distance to the VAE ceiling there, the DiT's held-out texture vs the mean
    training texture, the error budget (the VAE's ceiling, the cost of FiCA's geometry and of
    its texture alone) and the refiner's and the visible-texel transfer's ablation steps in
    standard errors."""
    main, abl, uv = tables["main"], tables["ablation"], tables.get("uv_texture", [])
    fica, mean, bound = table_row(main, "3dgs"), table_row(main, "mean"), table_row(main, "gt_upm")
    out = {
        "fica_3dgs_psnr": fica.get("psnr"),
        "mean_texture_psnr": mean.get("psnr"),
        "gt_maps_bound_psnr": bound.get("psnr"),
        "gap_closed": (fica["psnr"] - mean["psnr"]) / (bound["psnr"] - mean["psnr"])
        if fica and mean and bound else None,
        "fica_3dgs_ssim": fica.get("ssim"),
        "mean_texture_ssim": mean.get("ssim"),
    }  # fmt: skip
    final, base, vae = table_row(uv, "3dgs"), table_row(uv, "mean"), table_row(uv, "vae")
    if final and base:
        out["visible_texel_psnr"] = final.get("visible_psnr")
        out["visible_texel_psnr_gain_db"] = final["visible_psnr"] - base["visible_psnr"]
        out["unseen_texel_psnr_gain_db"] = final["unseen_psnr"] - base["unseen_psnr"]
    if final and vae:
        out["visible_texel_psnr_below_vae_ceiling_db"] = vae["visible_psnr"] - final["visible_psnr"]
    dit = stages.get("dit", {}).get("vs_baseline", {}).get("texture_psnr", {})
    out["dit_texture_psnr"], out["dit_mean_texture_psnr"] = dit.get("value"), dit.get("baseline")
    # the error budget (dome frames): the latent ceiling, and what each of FiCA's maps costs
    budget = tables.get("budget", [])
    vae, tex, geo = (table_row(budget, m) for m in ("vae_upm", "gt_tex", "gt_geo"))
    if vae and bound:
        out["vae_maps_psnr"] = vae.get("psnr")
        out["geometry_cost_db"] = bound["psnr"] - tex["psnr"] if tex else None
        out["texture_cost_db"] = bound["psnr"] - geo["psnr"] if geo else None
    # each ablation step is paired with the row above it
    for name, method in (("shape_fit", "abl_fit"), ("refiner", "abl_ref"), ("transfer", "3dgs")):
        step = table_row(abl, method)
        if step.get("psnr_delta") is not None and step.get("psnr_delta_se"):
            out[f"{name}_step_db"] = step["psnr_delta"]
            out[f"{name}_step_in_se"] = step["psnr_delta"] / step["psnr_delta_se"]
    return out
