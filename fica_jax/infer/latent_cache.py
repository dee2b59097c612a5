"""`fica data cache`: encode a capture dataset once into the DiT's latent + condition cache.

For every identity (FiCA paper s.2.1-2.2): the ground-truth UV texture and geometry through the
trained VAE encoder (posterior mean and std, scaled and packed onto the DiT grid), the partial
UV maps [rgb, mask, nrm, vtx] through the same encoder (the ControlMLP input at latent
resolution), and the portrait's image embedding. The partial maps are either the ground-truth
unwrap stored in the record (`--control gt`) or the trained dense predictor's unwrap of the
portrait (`--control dense`, the default when `--dense` is given: it is what inference sees).
Record layout: `data_pipelines/latents.py` and SCHEMA.md ("Latent cache").

The latent scale: SDXL's 0.13025 is right for SDXL's own weights (`--latent-scale vae`); a VAE
trained here from scratch has other latent statistics, so by default (`auto`) the scale is
1 / std of the posterior means over (up to 64) training identities, stored in the metadata and
used to decode. Each cache records the fingerprints of the checkpoints it was built from; a
consumer with another VAE is refused (`check_vae`).
"""

from __future__ import annotations

import io
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import latents as L
from data_pipelines import shards
from data_pipelines.pipeline import host_slice, mean_maps, open_source
from data_pipelines.shards import DatasetWriter
from fica_jax.errors import UserError
from fica_jax.infer.latents import VAEBundle, check_vae, fingerprint, load_vae, with_scale
from fica_jax.models import layers, uv_latent

BATCH = 8  # identities encoded per call


# ----------------------------------------------------------------------------- encoding
@nnx.jit(static_argnums=(2,))
def _posterior(vae, x, unshuffle):
    """x [B, R, R, 3] in [-1, 1] -> scaled, packed posterior (mean, std) on the DiT grid."""
    post, c = vae.encode(x), vae.cfg
    pack = lambda z: layers.pixel_unshuffle(z, unshuffle)
    return pack((post.mean - c.shift_factor) * c.scaling_factor), pack(post.std * c.scaling_factor)


def _control_maps(stats: uv_latent.MapStats, partial_uv) -> list[np.ndarray]:
    """Partial UV maps [B, R, R, 10] -> the 4 control groups normalised as the VAE's inputs."""
    part = np.asarray(partial_uv, np.float32)
    seen = part[..., 3]
    return [
        uv_latent.normalize_map("texture", part[..., 0:3], stats, seen),
        np.repeat(uv_latent.normalize_map("mask", part[..., 3:4], stats), 3, axis=-1),
        uv_latent.normalize_map("normal", part[..., 4:7], stats, seen),
        uv_latent.normalize_map("position", part[..., 7:10], stats, seen),
    ]


def _pack_control(mean: np.ndarray, b: int, first: int) -> np.ndarray:
    return np.concatenate([mean[(first + i) * b : (first + 1 + i) * b] for i in range(4)], -1)


def _map_control(ctrl: list[np.ndarray]) -> np.ndarray:
    """The 4 normalised groups -> [B, R, R, 10] `control_maps` (the mask once)."""
    return np.concatenate([ctrl[0], ctrl[1][..., :1], ctrl[2], ctrl[3]], -1)


def encode_control(vae: VAEBundle, partial_uv, groups, control_input: str, grid: int) -> np.ndarray:
    """Partial UV maps [B, R, R, 10] -> the DiT's control [B, G, G, Cc] for `groups`: what the
    cache gives the stage (`data_pipelines.latents.latent_example`) and `fica generate` feeds
    the DiT. "latents": the groups through the VAE; "pixels" / "pooled": `L.pixel_control`."""
    ctrl = _control_maps(vae.stats, partial_uv)

    def latents():
        mean, _ = _posterior(vae.model, jnp.asarray(np.concatenate(ctrl)), vae.unshuffle)
        return _pack_control(np.asarray(mean), ctrl[0].shape[0], 0)

    return L.select_control(control_input, groups, _map_control(ctrl), latents, grid)


def encode_maps(vae: VAEBundle, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Records' UV maps -> tex/geo posteriors and the 4-group control latents (numpy)."""
    s, m = vae.stats, batch["uv_mask"]
    tex = uv_latent.normalize_map("texture", batch["uv_texture"], s, m)
    geo = uv_latent.normalize_map("position", batch["uv_geometry"], s, m)
    ctrl = _control_maps(s, batch["partial_uv"])
    b = tex.shape[0]
    mean, std = (
        np.asarray(a)
        for a in _posterior(
            vae.model, jnp.asarray(np.concatenate([tex, geo, *ctrl])), vae.unshuffle
        )
    )
    return {
        "tex_mean": mean[:b],
        "tex_std": std[:b],
        "geo_mean": mean[b : 2 * b],
        "geo_std": std[b : 2 * b],
        "control": _pack_control(mean, b, 2),
        "control_maps": _map_control(ctrl),
    }


def _scale_from_data(vae: VAEBundle, src, n: int) -> float:
    vae = with_scale(vae, 1.0)
    rec = [src[i] for i in range(min(n, len(src)))]
    out = encode_maps(vae, _stack(rec))
    z = np.concatenate([out["tex_mean"], out["geo_mean"]])
    return float(1.0 / max(z.std(), 1e-6))


def _stack(records: list[dict]) -> dict[str, np.ndarray]:
    keys = ("uv_texture", "uv_geometry", "uv_mask", "partial_uv")
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


# ----------------------------------------------------------------------------- the command
def build_cache(
    data_dir: str | os.PathLike,
    vae_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dense_run: str | os.PathLike | None = None,
    clip_path: str | os.PathLike | None = None,
    control: str | None = None,
    unshuffle: int = 2,
    latent_scale: str = "auto",
    train_views: int = 1,
    process_index: int = 0,
    process_count: int = 1,
    overwrite: bool = False,
) -> pathlib.Path:
    """Writes the cache (this host's part when process_count > 1); returns its directory."""
    from fica_jax.train.metrics import Progress

    control = _check_options(control, dense_run, train_views)
    out = pathlib.Path(out)
    target = out if process_count == 1 else out / f"part-{process_index:05d}-of-{process_count:05d}"
    vae = load_vae(vae_path, unshuffle)
    dense = _load_dense(dense_run)
    clip = None
    if clip_path:
        from fica_jax.models.clip import from_pretrained as clip_from_pretrained

        clip = clip_from_pretrained(clip_path)
    if (target / "metadata.json").is_file() and not overwrite:
        _check_up_to_date(target, vae, dense, control, train_views)
        return target

    vae, scale = _fit_vae(vae, data_dir, latent_scale)
    sources = {split: open_source(data_dir, split) for split in ("train", "test")}
    todo = _rows(sources, train_views, process_index, process_count)
    embedding = "clip" if clip is not None else ("dense-vit-pooled" if dense else "none")
    info = {
        "vae": vae.source,
        "dense": dense[2] if dense else None,
        "control_source": control,
        "train_views": train_views,  # as asked (0 = all views)
        "embedding": embedding,
        "control_groups": list(L.CONTROL_GROUPS),
        "latent_scale": scale,
        "map_stats": vae.stats.to_dict(),
        "unshuffle": unshuffle,
        "data": str(pathlib.Path(data_dir).resolve()),
    }
    bar = Progress(len(todo), 0, True, label="cache", log_every=max(1, len(todo) // 10))
    # the head template the maps lie on travels on to the DiT's export (`fica generate` checks
    # that every export agrees); the capture's own template.npz stays with the capture
    capture = shards.read_metadata(data_dir).get("template", {})
    template = {k: v for k, v in capture.items() if k != "file"}
    with DatasetWriter(
        target, overwrite=overwrite, kind=L.FORMAT, version=L.VERSION, info=info, template=template
    ) as w:
        for k in range(0, len(todo), BATCH):
            chunk = todo[k : k + BATCH]
            recs = [sources[s][i] for s, i, _ in chunk]
            batch, emb = _condition(recs, chunk, control, embedding, dense, clip)
            _write_rows(w, recs, chunk, encode_maps(vae, batch), batch, emb, data_dir)
            bar.update(len(recs))
        w.write_file(L.BASELINES_FILE, _baselines(data_dir, vae.stats))
    bar.close()
    return target


def _check_options(control: str | None, dense_run, train_views: int) -> str:
    """The control source (`dense` when a dense run is given, else `gt`), once the options agree."""
    control = control or ("dense" if dense_run else "gt")
    if control not in ("gt", "dense") or (control == "dense" and not dense_run):
        raise UserError(
            f"--control {control!r}: expected 'gt', or 'dense' together with --dense RUN"
        )
    if train_views != 1 and control == "gt":
        raise UserError(
            f"--train-views {train_views}: the records' ground-truth partial maps unwrap the "
            "portrait only; other views need --control dense"
        )
    if train_views < 0:
        raise UserError(f"--train-views {train_views}: expected 0 (all views) or a count >= 1")
    return control


def _load_dense(dense_run) -> tuple | None:
    """(config, model, {path, step, fingerprint}) of the dense predictor run, or None."""
    from fica_jax.train.checkpoint import load_model, load_run_config

    if not dense_run:
        return None
    dcfg = load_run_config(dense_run)
    step, model = load_model(dcfg, dense_run)
    source = {
        "path": str(pathlib.Path(dense_run).resolve()),
        "step": step,
        "fingerprint": fingerprint(model),
    }
    return dcfg, model, source


def _check_up_to_date(target: pathlib.Path, vae: VAEBundle, dense, control, train_views) -> None:
    """An existing cache is kept only if built from this VAE and this conditioning."""
    meta = L.read_metadata(target)
    check_vae(meta, vae, str(target))
    views = meta.get("train_views", 1)
    if (
        meta.get("dense") != (dense[2] if dense else None)
        or meta["control_source"] != control
        or views != train_views
    ):
        raise UserError(
            f"{target}: cache built from other conditioning (dense {meta.get('dense')}, control {meta['control_source']}, train views {views}); pass --overwrite to rebuild"
        )
    print(f"{target}: up to date (VAE fingerprint {meta['vae']['fingerprint']})")


def _fit_vae(vae: VAEBundle, data_dir, latent_scale: str) -> tuple[VAEBundle, float]:
    """-> (the VAE with map statistics and its latent scale applied, that scale): the scale of
    the VAE's own config or, by default, fitted to the training split (module doc)."""
    train = open_source(data_dir, "train")
    if vae.stats is None:  # SDXL weights: residual from the training mean shape, its range
        ref = mean_maps(data_dir, "train")["mean_geometry"]
        geo = np.stack([train[i]["uv_geometry"] for i in range(min(64, len(train)))])
        msk = np.stack([train[i]["uv_mask"] for i in range(min(64, len(train)))])
        half = 1.1 * float(np.abs(geo - ref)[np.asarray(msk) > 0.5].max(initial=1e-3))
        vae.stats = uv_latent.MapStats(position_extent=(half,) * 3).with_reference(ref)
    scale = (
        vae.model.cfg.scaling_factor if latent_scale == "vae" else _scale_from_data(vae, train, 64)
    )
    return with_scale(vae, scale), scale


def _rows(sources: dict, train_views: int, process_index: int, process_count: int) -> list:
    """(split, record index, view) of this host's rows: each held-out identity once, from its
    portrait (view 0); each training identity once per view it lends as a portrait
    (`train_views`; 0 = all): any photo of a person is a portrait of them, and one target seen
    under several conditionings is harder to memorise."""
    n_views = int(sources["train"][0]["view_image"].shape[0]) if len(sources["train"]) else 1
    per_split = {"train": n_views if train_views == 0 else min(train_views, n_views), "test": 1}
    return [
        (split, i, v)
        for split, src in sources.items()
        for i in range(len(src))[host_slice(len(src), process_index, process_count)]
        for v in range(per_split[split])
    ]


def _condition(recs: list[dict], chunk: list, control: str, embedding: str, dense, clip):
    """-> (the records' UV maps, their partial maps the dense predictor's unwrap of the photo
    when `control` is "dense"; image embeddings [B, D] of that photo, zeros [B, 1] without an
    embedding). The photo of a row is view `v` of its record (`_rows`)."""
    from fica_jax.infer import conditioning

    batch = _stack(recs)
    # the photo each row is conditioned on [B, H, W, 3]
    photo = np.stack([r["view_image"][v] for r, (*_, v) in zip(recs, chunk, strict=True)])
    if control != "dense" and embedding == "none":
        return batch, np.zeros((len(recs), 1), np.float32)
    dcfg, dmodel, _ = dense if dense else (None, None, None)
    size = int(dcfg.data.image_size) if dcfg else photo.shape[1]
    img = jax.image.resize(
        jnp.asarray(photo, jnp.float32) / 255.0,
        (len(recs), size, size, 3),
        "bilinear",
    )
    if not dense:
        return batch, np.asarray(conditioning.embed_clip(img, clip), np.float32)
    cond = conditioning.condition(img, dmodel, batch["uv_texture"].shape[1], clip)
    if control == "dense":
        batch["partial_uv"] = np.asarray(cond.partial_uv, np.float32)
    return batch, np.asarray(cond.image_emb, np.float32)


def _write_rows(w: DatasetWriter, recs, chunk, enc: dict, batch: dict, emb, data_dir) -> None:
    """One cache row per record of `chunk`: its encoded latents and what it was conditioned on."""
    for j, rec in enumerate(recs):
        row = {k2: v[j] for k2, v in enc.items()}
        row.update(
            identity=rec["identity"],
            split=rec["split"],
            view=np.int32(chunk[j][2]),
            image_emb=emb[j],
            uv_texture=rec["uv_texture"],
            uv_geometry=rec["uv_geometry"],
            uv_mask=rec["uv_mask"],
            partial_uv=batch["partial_uv"][j],
        )
        dims = {
            "grid": int(row["tex_mean"].shape[0]),
            "token_channels": int(row["tex_mean"].shape[-1]),
            "image_emb_dim": int(emb.shape[-1]),
            "uv_resolution": int(rec["uv_texture"].shape[0]),
        }
        w.add_encoded(
            str(rec["split"]),
            dims,
            L.encode(row),
            # the writer's key: one per row, so a view's row gets its own
            str(rec["identity"]) + (f"#view{chunk[j][2]}" if chunk[j][2] else ""),
            f"{data_dir} {rec['identity']}",
        )


def _baselines(data_dir, stats: uv_latent.MapStats) -> bytes:
    """npz of the training split's mean UV texture [0, 1] and mean neutral geometry, and the
    VAE's position reference map when its statistics have one."""
    arrays = mean_maps(data_dir, "train")
    if stats.position_reference is not None:
        arrays["position_reference"] = np.asarray(stats.position_reference, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
