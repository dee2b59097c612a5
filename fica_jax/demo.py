"""`fica demo`: the embedded default job, end to end at tiny scale on a CPU.

synthetic captures -> stage `vae` (UV autoencoder) -> stage `dense` (dense predictor) ->
conditioning of held-out portraits (partial UV maps + image embedding) -> a PNG and a JSON report
with every stage's held-out metrics against its baseline.

Every stage runs through the same `fica train` loop with the shipped `tiny` configs; the demo only
chooses data sizes and step counts. Later stages (DiT, refiner, UPM, avatar export) join here as
they land. Re-running with the same `--out` resumes each stage from its checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from fica_jax.config import load_config
from fica_jax.errors import UserError

UV_RES, IMAGE_SIZE = 64, 128


def _stage_cfg(name: str, data_dir: pathlib.Path, steps: int | None):
    overrides = [f"--config.data.dir={data_dir}", "--config.mesh.fsdp=-1"]
    if name == "vae":
        overrides.append(f"--config.data.uv_resolution={UV_RES}")
    if name == "dense":
        overrides.append(f"--config.data.image_size={IMAGE_SIZE}")
    if steps is not None:
        overrides += [
            f"--config.train.steps={steps}",
            f"--config.optim.warmup_steps={max(1, steps // 10)}",
        ]
    cfg = load_config(f"{name}:tiny", overrides)
    with cfg.unlocked():
        cfg.train.eval_every = cfg.train.steps  # held-out metrics once, at the end
    return cfg


def _u8(x) -> np.ndarray:
    return (np.clip(np.asarray(x, np.float32), 0, 1) * 255).astype(np.uint8)


def _sheet(rows: list[list[tuple[str, np.ndarray]]], path: pathlib.Path) -> None:
    """A grid of labelled 128 px tiles, written atomically."""
    tile, label_h = 128, 14
    w, h = tile * max(len(r) for r in rows), (tile + label_h) * len(rows)
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, (label, img) in enumerate(row):
            im = Image.fromarray(_u8(img)).resize((tile, tile), Image.NEAREST)
            sheet.paste(im, (j * tile, i * (tile + label_h) + label_h))
            draw.text((j * tile + 2, i * (tile + label_h)), label, fill="black")
    tmp = path.with_suffix(".tmp.png")
    sheet.save(tmp)
    os.replace(tmp, path)


def _conditioning_rows(data_dir, dense_model, vae_model, vae_cfg) -> tuple[list, dict]:
    from data_pipelines import transforms
    from data_pipelines.pipeline import CaptureData, first_batch, open_source
    from fica_jax import conditioning
    from fica_jax.stages import vae as vae_stage

    # Held-out portraits and maps through the training pipeline itself (un-augmented eval pass),
    # so the demo sees exactly what the stages see.
    names = [str(r["identity"]) for r in open_source(data_dir, "test")][:3]
    read = CaptureData(transforms.dit_example)
    kw = dict(global_batch_size=len(names), num_epochs=1, image_size=IMAGE_SIZE)
    batch = {k: jnp.asarray(v) for k, v in first_batch(read(vae_cfg, "eval", 0, 1, **kw)).items()}
    images = batch["image"]
    cond = conditioning.condition(images, dense_model, UV_RES)
    x, _ = vae_stage.model_inputs(batch, vae_stage.map_stats(vae_cfg))
    recon = vae_model.decode(vae_model.encode(x).mode())
    n = len(names)
    geo = lambda y: (y + 1) * 0.5  # [-1, 1] positions as colours
    rows, hits = [], []
    for i in range(n):
        pred, gt = np.asarray(cond.partial_uv[i]), np.asarray(batch["partial_uv"][i])
        hits.append(
            float(((pred[..., 3] > 0.5) & (gt[..., 3] > 0.5)).sum() / max(gt[..., 3].sum(), 1))
        )
        rows.append(
            [
                ("portrait", images[i]),
                ("pred mask", np.asarray(cond.dense["mask"][i])[..., None].repeat(3, -1)),
                (
                    "pred UV (u,v,0)",
                    np.concatenate(
                        [np.asarray(cond.dense["uv"][i]), np.zeros((IMAGE_SIZE, IMAGE_SIZE, 1))], -1
                    ),
                ),
                ("partial UV rgb", pred[..., :3]),
                ("GT partial rgb", gt[..., :3]),
                ("GT texture", batch["uv_texture"][i]),
                ("VAE texture", (np.asarray(recon[i]) + 1) * 0.5),
                ("GT geometry", geo(np.asarray(x[n + i]))),
                ("VAE geometry", geo(np.asarray(recon[n + i]))),
            ]
        )
    summary = {
        "embedding": cond.embedding,
        "embedding_dim": int(cond.image_emb.shape[-1]),
        "partial_uv_texel_recall_vs_gt": float(np.mean(hits)),
        "portraits": names,
    }
    return rows, summary


def run_demo(out: pathlib.Path, identities: int, steps: int | None, seed: int) -> dict:
    from data_pipelines.synth import synthesize
    from data_pipelines.synthetic.generator import SynthConfig
    from fica_jax.train import loop
    from fica_jax.train.checkpoint import load_model
    from fica_jax.train.metrics import read_metrics

    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}
    t0 = time.time()
    if not (data / "metadata.json").is_file():
        print(f"[demo] synthesising {identities} identities -> {data}", flush=True)
        synthesize(
            data,
            identities,
            SynthConfig(uv_resolution=UV_RES, image_size=IMAGE_SIZE, n_frames=2),
            seed=seed,
        )
    report["data"] = {"dir": str(data), "identities": identities, "seconds": time.time() - t0}

    cfgs = {}
    for name in ("vae", "dense"):
        cfg = cfgs[name] = _stage_cfg(name, data, steps)
        print(f"[demo] stage {name}: {cfg.train.steps} steps -> {out / 'runs' / name}", flush=True)
        t = time.time()
        loop.train(cfg, out / "runs" / name)
        # From the run's log rather than train()'s return value, so a resumed, already finished
        # stage reports the same figures.
        final: dict = {}
        for _, row in sorted(read_metrics(out / "runs" / name).items()):
            final.update(row)
        report["stages"][name] = {"seconds": time.time() - t, **final}

    _, vae_model = load_model(cfgs["vae"], out / "runs" / "vae")
    _, dense_model = load_model(cfgs["dense"], out / "runs" / "dense")
    rows, summary = _conditioning_rows(data, dense_model, vae_model, cfgs["vae"])
    _sheet(rows, out / "conditioning.png")
    report["conditioning"] = {**summary, "png": str(out / "conditioning.png")}
    report["seconds"] = time.time() - t0
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "report.json")
    return report


def _cmd(args, extra) -> int:
    if extra:
        raise UserError(f"fica demo takes no config overrides, got {extra}")
    if args.identities < 9:
        raise UserError("--identities must be >= 9 (identity 7 of every 8 is held out for testing)")
    report = run_demo(pathlib.Path(args.out), args.identities, args.steps, args.seed)
    v, d, c = report["stages"]["vae"], report["stages"]["dense"], report["conditioning"]
    print(
        f"[demo] vae held-out: texture PSNR {v['eval/texture_psnr']:.2f} dB "
        f"(8x downsample baseline {v['eval/baseline_texture_psnr']:.2f}), geometry L1 "
        f"{v['eval/geometry_l1_mm']:.2f} mm (baseline {v['eval/baseline_geometry_l1_mm']:.2f})\n"
        f"[demo] dense held-out: UV L1 {d['eval/uv_l1']:.4f} (constant baseline "
        f"{d['eval/baseline_uv_l1']:.4f}), mask IoU {d['eval/mask_iou']:.3f}\n"
        f"[demo] conditioning: embedding = {c['embedding']}; sheet {c['png']}\n"
        f"[demo] report {pathlib.Path(args.out) / 'report.json'} ({report['seconds']:.0f} s)"
    )
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="synthetic data -> all available stages -> report")
    p.add_argument("--out", default="demo_out", help="output folder (resumable)")
    p.add_argument("--identities", type=int, default=24)
    p.add_argument("--steps", type=int, default=None, help="steps per stage (default: config)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd)
