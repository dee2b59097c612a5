"""Reading a latent cache (`fica data cache`, `data_pipelines/latents.py`) back: the VAE that
encoded it and decodes samples (`VAEBundle`, refused when it is not the cache's own), the map
normalisation a `vae` run trained with (`map_stats`), the decoding context of a DiT run, and the
DiT's batches of cache rows (`latent_pipeline`, `held_out_batches`)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from data_pipelines.latents import (
    LatentSource,
    cache_metadata,
    latent_example,
    load_baselines,
)
from data_pipelines.pipeline import make_pipeline, mean_maps
from fica_jax.errors import UserError
from fica_jax.models import uv_latent


# ----------------------------------------------------------------------------- models
@dataclasses.dataclass
class VAEBundle:
    """The VAE, how its latents sit on the DiT grid, and where it came from."""

    model: Any
    stats: uv_latent.MapStats
    unshuffle: int
    source: dict  # {"path", "step", "fingerprint"}


def fingerprint(model: nnx.Module) -> str:
    """sha256 over every parameter's path, shape and bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param).to_pure_dict())[0]
    for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
        arr = np.asarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}{arr.shape}{arr.dtype}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:16]


def load_vae(path: str | os.PathLike, unshuffle: int = 2) -> VAEBundle:
    """A `vae` stage run directory, or local SDXL weights (diffusers dir / .safetensors)."""
    from fica_jax.train.checkpoint import load_model, load_run_config

    p = pathlib.Path(path)
    if (p / "config.json").is_file() and (p / "checkpoints").is_dir():
        cfg = load_run_config(p)
        if cfg.stage != "vae":
            raise UserError(f"--vae {path}: run of stage {cfg.stage!r}, expected a `vae` run")
        step, model = load_model(cfg, p)
        stats = map_stats(cfg)
    else:
        from fica_jax.models.vae_import import from_pretrained

        model, step, stats = from_pretrained(p), None, None
    return VAEBundle(
        model,
        stats,
        unshuffle,
        {"path": str(p.resolve()), "step": step, "fingerprint": fingerprint(model)},
    )


def check_vae(meta: dict, vae: VAEBundle, where: str) -> None:
    """One line refusing a cache built with another VAE checkpoint than `vae`."""
    built = meta["vae"]
    if built["fingerprint"] != vae.source["fingerprint"]:
        raise UserError(
            f"{where}: the latent cache was built with VAE {built['path']} (step {built['step']}, "
            f"fingerprint {built['fingerprint']}), not {vae.source['path']} (step "
            f"{vae.source['step']}, fingerprint {vae.source['fingerprint']}); rebuild the cache"
        )
    digest = meta["map_stats"].get("reference_digest", "")
    if vae.stats is not None and digest != vae.stats.reference_digest:
        raise UserError(
            f"{where}: the latent cache's position reference (digest {digest or 'none'}) is not "
            f"the one VAE {vae.source['path']} normalises with "
            f"({vae.stats.reference_digest or 'none'}); rebuild the cache"
        )


def with_scale(vae: VAEBundle, scale: float) -> VAEBundle:
    """The bundle with the VAE's latent scaling set to `scale` (what the cache stores)."""
    vae.model.cfg = dataclasses.replace(vae.model.cfg, scaling_factor=float(scale))
    return vae


REFERENCES = ("", "train_mean")  # cfg.model.position_reference


def map_stats(cfg: ml_collections.ConfigDict) -> uv_latent.MapStats:
    """The run's map normalisation. `model.position_reference = "train_mean"` centres positions
    on the mean neutral geometry of `data.dir`'s training split at the run's `data.uv_resolution`
    (read from the data, so a VAE run and every cache built from it agree while the data stay in
    place; the cache keeps its own copy and the digest), `position_extent` then being the
    residual's half-width."""
    stats = uv_latent.MapStats(
        position_center=tuple(cfg.model.position_center),
        position_extent=tuple(cfg.model.position_extent),
    )
    ref = cfg.model.get("position_reference", "")
    if ref not in REFERENCES:
        raise UserError(f"config model.position_reference={ref!r}; expected one of {REFERENCES}")
    if ref == "train_mean":
        r = cfg.data.get("uv_resolution") or None
        stats = stats.with_reference(train_mean_geometry(str(cfg.data.dir), r))
    return stats


@functools.lru_cache(maxsize=4)
def train_mean_geometry(data_dir: str, resolution: int | None = None) -> np.ndarray:
    """The training split's mean neutral geometry [R, R, 3], resampled to `resolution` as the
    maps are (`data_pipelines.pipeline.mean_maps`; None: as stored)."""
    if not data_dir or not pathlib.Path(data_dir).is_dir():
        raise UserError(
            f"config data.dir={data_dir!r}: no such directory; model.position_reference="
            "'train_mean' reads the VAE's training data for its mean geometry"
        )
    return mean_maps(data_dir, "train", resolution=resolution)["mean_geometry"]


# ----------------------------------------------------------------------------- decoding
@dataclasses.dataclass
class DecodingContext:
    """What decoding a cache's latents needs: its VAE (latent scale applied), map statistics,
    unshuffle factor and held-out baselines."""

    vae: nnx.Module
    stats: uv_latent.MapStats
    unshuffle: int
    baselines: dict
    cache: str

    def identities(self, split: str) -> list[tuple[str, int]]:
        """(identity, the view it was conditioned on) of every cache row of `split`, in order."""
        src = LatentSource(self.cache, split)
        return [(str(src[i]["identity"]), int(src[i]["view"])) for i in range(len(src))]


def decoding_context(cfg: ml_collections.ConfigDict, meta: dict, where: str) -> DecodingContext:
    """Loads `cfg.model.vae` (else the VAE the cache names) and refuses a cache built with
    another VAE checkpoint."""
    vae = load_vae(cfg.model.vae or meta["vae"]["path"], int(meta["unshuffle"]))
    check_vae(meta, vae, where)
    vae = with_scale(vae, meta["latent_scale"])
    baselines = load_baselines(cfg.data.dir)
    stats = uv_latent.MapStats.from_dict(meta["map_stats"], baselines.get("position_reference"))
    return DecodingContext(vae.model, stats, vae.unshuffle, baselines, str(cfg.data.dir))


# ----------------------------------------------------------------------------- data
def _check_cache(cfg: ml_collections.ConfigDict, meta: dict) -> None:
    m, where = cfg.model, f"latent cache {cfg.data.dir}"
    grid = m.latent_size
    want = {"grid": grid, "token_channels": m.latent_channels, "image_emb_dim": m.image_emb_dim}
    for key, value in want.items():
        if int(meta[key]) != int(value):
            cfg_key = {
                "grid": "model.latent_size",
                "token_channels": "model.latent_channels",
                "image_emb_dim": "model.image_emb_dim",
            }[key]
            raise UserError(
                f"{where} has {key} {meta[key]}, but config {cfg_key}={value}; pass --config.{cfg_key}={meta[key]}"
            )
    if m.use_image_emb and meta["embedding"] == "none":
        raise UserError(
            f"{where} holds no image embedding (built without --dense/--clip); pass --config.model.use_image_emb=false or rebuild it"
        )


def latent_pipeline(
    cfg: ml_collections.ConfigDict,
    split: str,
    process_index: int,
    process_count: int,
    *,
    ground_truth: bool,
    **kw,
):
    if not cfg.data.dir:
        raise UserError(
            "config data.dir is empty; build a latent cache with `fica data cache --data DIR --vae RUN --out CACHE` and pass --config.data.dir=CACHE"
        )
    _check_cache(cfg, cache_metadata(cfg.data.dir))
    shard_split = "test" if split == "eval" else split
    extra = {
        "control": tuple(cfg.model.control_maps),
        "control_input": str(cfg.model.get("control_input", "latents")),
        "image_emb": bool(cfg.model.use_image_emb),
        "ground_truth": ground_truth,
    }
    args = dict(
        global_batch_size=cfg.data.batch_size,
        seed=(cfg.data.shuffle_seed + cfg.seed) % 2**32,
        process_index=process_index,
        process_count=process_count,
        workers=cfg.data.workers,
        source=LatentSource(cfg.data.dir, shard_split),
        extra=extra,
    )
    return make_pipeline(cfg.data.dir, latent_example, shard_split, **{**args, **kw})


def held_out_batches(cfg: ml_collections.ConfigDict, split: str = "test"):
    """Every identity of `split` once, in order, with ground truth (for `fica sample`): the
    batch is the largest divisor of the split size up to the config's batch size (set on a
    copy: the caller's `cfg` is left as it is)."""
    n = len(LatentSource(cfg.data.dir, split))
    b = max(d for d in range(1, min(int(cfg.data.batch_size), n) + 1) if n % d == 0)
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.data.batch_size = b
    return latent_pipeline(
        cfg, split, 0, 1, ground_truth=True, augment=False, shuffle=False, num_epochs=1
    )


def model_inputs(batch, stats: uv_latent.MapStats) -> tuple[jax.Array, jax.Array]:
    """[2B, R, R, 3] maps in [-1, 1] (texture rows then geometry rows) and their [2B, R, R, 1]
    UV-layout mask."""
    mask = batch["uv_mask"]
    tex = uv_latent.normalize_map("texture", batch["uv_texture"], stats, mask)
    geo = uv_latent.normalize_map("position", batch["uv_geometry"], stats, mask)
    x = jnp.concatenate([tex, geo], axis=0)
    m = jnp.concatenate([mask, mask], axis=0)[..., None]
    return x, m
