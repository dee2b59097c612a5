"""`fica sample --run DIR --data CACHE --out DIR`: samples a finished `dit` run on the cache's
held-out identities, decodes with the cache's VAE, and writes `sample_XXX.png` previews,
`maps/<identity>_{texture,geometry}.npy` and `metrics.json` (against the baselines)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.files import atomic_file, check_writable, ensure_dir, write_json
from fica_jax.infer.latents import decoding_context, held_out_batches
from fica_jax.infer.sample import preview_rows, sample_maps, uv_metrics
from fica_jax.preview import write_sheet


def sample_run(
    run: str | os.PathLike,
    cache: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int = 50,
    cfg_scale: float | None = None,
    seed: int = 0,
    split: str = "test",
    ema: bool = True,
) -> dict[str, float]:
    """`fica sample`: every identity of `split` in the cache; returns the mean metrics."""
    from data_pipelines.latents import cache_metadata
    from fica_jax.train.checkpoint import load_model, load_run_config

    out = check_writable(out)  # before loading the run
    cfg = load_run_config(run)
    with cfg.unlocked():
        cfg.data.dir = str(cache)
        cfg.data.batch_size = max(1, int(cfg.data.batch_size))
    _, model = load_model(cfg, run, ema=ema)
    ctx = decoding_context(cfg, cache_metadata(cache), where=f"fica sample --data {cache}")
    scale = float(cfg.model.cfg_scale if cfg_scale is None else cfg_scale)
    ensure_dir(out / "maps")
    rows, totals, n, rng = [], {}, 0, jax.random.PRNGKey(seed)
    names = [str(r) for r in ctx.identities(split)]
    for k, batch in enumerate(held_out_batches(cfg, split)):
        batch = {key: jnp.asarray(v) for key, v in batch.items()}
        key = jax.random.fold_in(rng, k)
        kw = dict(steps=steps, cfg_scale=scale, shift=float(cfg.model.t_shift))
        texture, geometry = sample_maps(model, ctx.vae, ctx.stats, ctx.unshuffle, batch, key, **kw)
        b = texture.shape[0]
        for key, v in uv_metrics(texture, geometry, batch, ctx.baselines).items():
            totals[key] = totals.get(key, 0.0) + float(v) * b
        for j in range(b):
            name = names[n + j] if n + j < len(names) else f"id{n + j}"
            for kind, maps in (("texture", texture), ("geometry", geometry)):
                with atomic_file(out / "maps" / f"{name}_{kind}.npy") as tmp:
                    np.save(tmp, np.asarray(maps[j]))
        n += b
        rows += preview_rows(batch, texture, geometry, n=b)
    for i in range(0, len(rows), 8):
        write_sheet(rows[i : i + 8], out / f"sample_{i // 8:03d}.png")
    result = {k: v / max(n, 1) for k, v in totals.items()}
    result.update(identities=n, steps=steps, cfg_scale=scale, seed=seed, split=split)
    write_json(out / "metrics.json", result)
    return result


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "sample", help="sample a trained dit run on a latent cache's held-out identities"
    )
    p.add_argument("--run", required=True, help="the `fica train dit` workdir")
    p.add_argument("--data", required=True, help="latent cache (`fica data cache --out`)")
    p.add_argument("--out", required=True, help="output directory (PNGs, .npy maps, metrics.json)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="guidance scale (default: the run's model.cfg_scale)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test")
    p.add_argument(
        "--no-ema", action="store_true", help="use the raw params even if the run keeps an EMA"
    )

    def run_cmd(args, extra) -> int:
        res = sample_run(
            args.run,
            args.data,
            args.out,
            steps=args.steps,
            cfg_scale=args.cfg,
            seed=args.seed,
            split=args.split,
            ema=not args.no_ema,
        )
        print(json.dumps(res, indent=2))
        return 0

    p.set_defaults(func=run_cmd)
