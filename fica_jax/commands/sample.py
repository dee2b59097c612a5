"""`fica sample --run DIR --data CACHE --out DIR`: samples a finished `dit` run on the cache's
held-out identities (or `--split train`), decodes with the cache's VAE, and writes
`sample_XXX.png` previews, `maps/<identity>_{texture,geometry}.npy` and `metrics.json` (against
the baselines). One map per identity, conditioned on its portrait (view 0): the cache's rows for
the other views a training identity lends are skipped (they are what the DiT trained on, not
what `fica generate` gives the refiner)."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax.files import atomic_file, check_writable, ensure_dir, write_json
from fica_jax.infer.latents import decoding_context, held_out_batches
from fica_jax.infer.sample import preview_rows, sample_maps, temperatures, uv_metrics
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
    maps: str | os.PathLike | None = None,
    temperature: float | None = None,
    fit_shape: str | os.PathLike | None = None,
    fit_residual: float | None = None,
) -> dict[str, float]:
    """`fica sample`: every identity of `split` in the cache; returns the mean metrics. The
    maps go to `maps` (default OUT/maps: one folder can gather both splits for the refiner).
    `fit_shape`: the captures the cache was built from; each map's geometry is then fitted to
    its portrait's landmarks as `fica generate` fits it before the refiner, keeping
    `fit_residual` of its part outside the shape space (`infer.shape_samples`)."""
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
    temp = temperatures(cfg.model.get("temperature", 1.0) if temperature is None else temperature)
    maps = ensure_dir(pathlib.Path(maps) if maps else out / "maps")
    rows, totals, n, done, rng = [], {}, 0, 0, jax.random.PRNGKey(seed)
    rows_of = ctx.identities(split)
    for k, batch in enumerate(held_out_batches(cfg, split)):
        b = len(batch["tex_latent"])
        keep = [j for j in range(b) if rows_of[n + j][1] == 0]  # portrait rows (module doc)
        names = [rows_of[n + j][0] for j in keep]
        n += b
        if not keep:
            continue
        batch = {key: jnp.asarray(np.asarray(v)[keep]) for key, v in batch.items()}
        key = jax.random.fold_in(rng, k)
        kw = dict(steps=steps, cfg_scale=scale, shift=float(cfg.model.t_shift), temperature=temp)
        texture, geometry = sample_maps(model, ctx.vae, ctx.stats, ctx.unshuffle, batch, key, **kw)
        for key, v in uv_metrics(texture, geometry, batch, ctx.baselines).items():
            totals[key] = totals.get(key, 0.0) + float(v) * len(keep)
        for j, name in enumerate(names):
            for kind, arr in (("texture", texture), ("geometry", geometry)):
                with atomic_file(maps / f"{name}_{kind}.npy") as tmp:
                    np.save(tmp, np.asarray(arr[j]))
        done += len(keep)
        rows += preview_rows(batch, texture, geometry, n=len(keep))
    for i in range(0, len(rows), 8):
        write_sheet(rows[i : i + 8], out / f"sample_{i // 8:03d}.png")
    result = {k: v / max(done, 1) for k, v in totals.items()}
    result.update(identities=done, steps=steps, cfg_scale=scale, temperature=temp, seed=seed,
                  split=split)  # fmt: skip
    if fit_shape is not None:  # the metrics above are the DiT's own; the maps are then fitted
        from fica_jax.geometry.shape_fit import RESIDUAL
        from fica_jax.infer.shape_samples import fit_sample_maps

        keep = RESIDUAL if fit_residual is None else float(fit_residual)
        result["shape_fit"] = fit_sample_maps(maps, fit_shape, keep, splits=(split,))
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
    p.add_argument("--temperature", type=float, default=None,
                   help="starting-noise scale (default: the run's model.temperature)")  # fmt: skip
    p.add_argument("--split", default="test")
    p.add_argument("--maps", default=None, help="where the .npy maps go (default OUT/maps)")
    p.add_argument("--fit-shape", default=None, metavar="CAPTURES",
                   help="fit each map's geometry to its portrait's landmarks in CAPTURES (the "
                        "captures the cache was built from), as fica generate does before the "
                        "refiner: maps the refiner trains on")  # fmt: skip
    p.add_argument("--fit-residual", type=float, default=None,
                   help="with --fit-shape: the share of the geometry outside the shape space kept "
                        "(the refiner config's model.shape_fit_residual; default 0)")  # fmt: skip
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
            maps=args.maps,
            temperature=args.temperature,
            fit_shape=args.fit_shape,
            fit_residual=args.fit_residual,
        )
        print(json.dumps(res, indent=2))
        return 0

    p.set_defaults(func=run_cmd)
