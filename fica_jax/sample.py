"""Sampling the completion DiT: 50-step guided Euler, decoding, held-out metrics, previews.

FiCA paper s.2.2: one network generates the UV texture and the UV geometry, switched by the
domain token. `generate` runs both domains of every identity in one batch, from the *same*
starting noise, so an identity's texture and geometry samples differ only by the domain token.
The Euler integration (`fica_jax.flow.euler_sample`, classifier-free guidance in the same batch)
is jitted once per (steps, cfg scale, shift) and deterministic given the key.

`fica sample --run DIR --data CACHE --out DIR` samples a finished `dit` run on the cache's
held-out identities, decodes with the cache's VAE, and writes `sample_XXX.png` previews,
`maps/<identity>_{texture,geometry}.npy` and `metrics.json` (against the baselines).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from fica_jax import flow
from fica_jax.eval.metrics import masked_psnr, masked_ssim
from fica_jax.models import layers, uv_latent


# ----------------------------------------------------------------------------- generation
def sample_latents(
    model, control, image_emb, rng, *, steps: int = 50, cfg_scale: float = 1.0, shift: float = 1.0
):
    """-> (texture, geometry) latent grids [B, G, G, C] for B identities' conditions.

    control [B, G, G, Cc], image_emb [B, E]; rng: one key -> the [B, G, G, C] starting noise,
    shared by the two domains of each identity.
    """
    b = control.shape[0]
    c = model.cfg.in_channels
    noise = jax.random.normal(rng, (b, *control.shape[1:3], c), jnp.float32)
    two = lambda a: jnp.concatenate([a, a], axis=0)
    domain = jnp.repeat(jnp.arange(2, dtype=jnp.int32), b)

    # The model is rebuilt inside the Euler loop body from its state, carried by the loop.
    graphdef, state = nnx.split(model)

    def velocity(x, t, drop, st):
        k = x.shape[0] // (2 * b)  # 1, or 2 when guidance doubles the batch
        rep = lambda a: jnp.concatenate([two(a)] * k, axis=0)
        m = nnx.merge(graphdef, st)
        return m(x, t, rep(image_emb), jnp.tile(domain, k), rep(control), drop)

    x = flow.euler_sample(
        velocity, two(noise), steps=steps, cfg_scale=cfg_scale, shift=shift, state=state
    )
    return x[:b], x[b:]


# Jitted once per (steps, cfg scale, shift); `sample_latents` itself is for callers already
# inside a jit (the stage's eval step).
generate = nnx.jit(sample_latents, static_argnames=("steps", "cfg_scale", "shift"))


def _decode(vae, tex, geo, unshuffle):
    z = jnp.concatenate([tex, geo]) / vae.cfg.scaling_factor + vae.cfg.shift_factor
    return vae.decode(layers.pixel_shuffle(z, unshuffle))


_decode_jit = nnx.jit(_decode, static_argnums=(3,))


def decode(
    vae, stats: uv_latent.MapStats, unshuffle: int, tex, geo, mask, *, jit: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Latent grids -> (texture [B, R, R, 3] in [0, 1], geometry [B, R, R, 3] in data units),
    zero outside the UV layout `mask` [B, R, R]. `jit=False` from inside another jit."""
    y = (_decode_jit if jit else _decode)(vae, tex, geo, unshuffle)
    b = tex.shape[0]
    texture = uv_latent.denormalize_map("texture", y[:b], stats, mask)
    geometry = uv_latent.denormalize_map("position", y[b:], stats, mask)
    return texture, geometry


def sample_maps(
    model,
    vae,
    stats,
    unshuffle: int,
    batch,
    rng,
    *,
    steps: int,
    cfg_scale: float,
    shift: float,
    jit: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Generated (texture, geometry) maps for a batch's conditions: `generate` + `decode`.
    `jit=False` from inside another jit (the stage's eval step)."""
    gen = generate if jit else sample_latents
    kw = dict(steps=steps, cfg_scale=cfg_scale, shift=shift)
    tex, geo = gen(model, batch["control"], batch["image_emb"], rng, **kw)
    return decode(vae, stats, unshuffle, tex, geo, batch["uv_mask"], jit=jit)


# ----------------------------------------------------------------------------- metrics
def uv_metrics(
    texture, geometry, batch, baselines: dict[str, Any], unit_mm: float = 1000.0
) -> dict[str, jax.Array]:
    """Held-out figures of generated maps vs the ground truth, beside the baselines: texture
    PSNR / SSIM on the UV mask vs the mean training texture, geometry L1 (mm) vs the mean
    training neutral geometry (the mean-shape template)."""
    m = batch["uv_mask"]
    gt_tex, gt_geo = batch["uv_texture"], batch["uv_geometry"]
    mean_tex = jnp.broadcast_to(jnp.asarray(baselines["mean_texture"]), gt_tex.shape)
    mean_geo = jnp.broadcast_to(jnp.asarray(baselines["mean_geometry"]), gt_geo.shape)
    l1 = lambda a: unit_mm * jnp.sum(jnp.abs(a - gt_geo) * m[..., None]) / (3 * jnp.sum(m) + 1e-6)
    return {
        "texture_psnr": masked_psnr(texture, gt_tex, m),
        "baseline_texture_psnr": masked_psnr(mean_tex, gt_tex, m),
        "texture_ssim": masked_ssim(texture, gt_tex, m),
        "baseline_texture_ssim": masked_ssim(mean_tex, gt_tex, m),
        "geometry_l1_mm": l1(geometry),
        "baseline_geometry_l1_mm": l1(mean_geo),
    }


# ----------------------------------------------------------------------------- previews
def geometry_normals(geo: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A position map [R, R, 3] shown as its surface normals (finite differences) in [0, 1]."""
    du = np.gradient(geo, axis=1)
    dv = np.gradient(geo, axis=0)
    n = np.cross(dv, du)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
    return np.where(mask[..., None] > 0.5, (n + 1) * 0.5, 1.0)


def preview_rows(batch: dict, texture, geometry, n: int = 4) -> list[list[tuple[str, np.ndarray]]]:
    """Per identity: partial input | generated texture | GT texture | generated geometry as
    normals | GT geometry as normals."""
    rows = []
    for i in range(min(n, texture.shape[0])):
        m = np.asarray(batch["uv_mask"][i])
        rows.append(
            [
                ("partial input", np.asarray(batch["partial_uv"][i])[..., :3]),
                ("generated texture", np.asarray(texture[i])),
                ("GT texture", np.asarray(batch["uv_texture"][i])),
                ("generated geometry", geometry_normals(np.asarray(geometry[i]), m)),
                ("GT geometry", geometry_normals(np.asarray(batch["uv_geometry"][i]), m)),
            ]
        )
    return rows


def write_sheet(
    rows: list[list[tuple[str, np.ndarray]]], path: str | os.PathLike, tile: int = 128
) -> np.ndarray:
    """A labelled grid of `tile`-px images, written atomically; returns the RGB array."""
    from PIL import ImageDraw

    label_h = 14
    w, h = tile * max(len(r) for r in rows), (tile + label_h) * len(rows)
    sheet = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(rows):
        for j, (label, img) in enumerate(row):
            u8 = (np.clip(np.asarray(img, np.float32), 0, 1) * 255).astype(np.uint8)
            sheet.paste(
                Image.fromarray(u8).resize((tile, tile), Image.NEAREST),
                (j * tile, i * (tile + label_h) + label_h),
            )
            draw.text((j * tile + 2, i * (tile + label_h)), label, fill="black")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    sheet.save(tmp)
    os.replace(tmp, path)
    return np.asarray(sheet)


# ----------------------------------------------------------------------------- the command
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
    from fica_jax.stages import dit as dit_stage
    from fica_jax.train.checkpoint import load_model, load_run_config

    cfg = load_run_config(run)
    with cfg.unlocked():
        cfg.data.dir = str(cache)
        cfg.data.batch_size = max(1, int(cfg.data.batch_size))
    _, model = load_model(cfg, run, ema=ema)
    ctx = dit_stage.decoding_context(
        cfg, cache_metadata(cache), where=f"fica sample --data {cache}"
    )
    scale = float(cfg.model.cfg_scale if cfg_scale is None else cfg_scale)
    out = pathlib.Path(out)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    rows, totals, n, rng = [], {}, 0, jax.random.PRNGKey(seed)
    names = [str(r) for r in ctx.identities(split)]
    for k, batch in enumerate(dit_stage.held_out_batches(cfg, split)):
        batch = {key: jnp.asarray(v) for key, v in batch.items()}
        key = jax.random.fold_in(rng, k)
        kw = dict(steps=steps, cfg_scale=scale, shift=float(cfg.model.t_shift))
        texture, geometry = sample_maps(model, ctx.vae, ctx.stats, ctx.unshuffle, batch, key, **kw)
        b = texture.shape[0]
        for key, v in uv_metrics(texture, geometry, batch, ctx.baselines).items():
            totals[key] = totals.get(key, 0.0) + float(v) * b
        for j in range(b):
            name = names[n + j] if n + j < len(names) else f"id{n + j}"
            np.save(out / "maps" / f"{name}_texture.npy", np.asarray(texture[j]))
            np.save(out / "maps" / f"{name}_geometry.npy", np.asarray(geometry[j]))
        n += b
        rows += preview_rows(batch, texture, geometry, n=b)
    for i in range(0, len(rows), 8):
        write_sheet(rows[i : i + 8], out / f"sample_{i // 8:03d}.png")
    result = {k: v / max(n, 1) for k, v in totals.items()}
    result.update(identities=n, steps=steps, cfg_scale=scale, seed=seed, split=split)
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "metrics.json")
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
