"""The DiT's latent + condition cache: records, reading, and the `dit` stage's example function.

Written by `fica data cache` (`fica_jax/infer/latent_cache.py`) with the same atomic shard writer as the
captures (`shards.DatasetWriter`, format `fica-latent-cache`); the layout and every key are in
`SCHEMA.md` ("Latent cache"). One record per identity:

  tex_mean, tex_std  float32 [G, G, Ct]   VAE posterior of the UV texture, scaled and packed onto
  geo_mean, geo_std  float32 [G, G, Ct]   the DiT grid (posterior std kept: training samples it)
  control            float32 [G, G, 4 Ct] partial UV maps [rgb, mask, nrm, vtx] through the VAE
                                          (posterior mean), one Ct-channel group per map
  control_maps       float16 [R, R, 10]   the same maps normalised as the VAE's inputs, at UV
                                          resolution (rgb 3, mask 1, nrm 3, vtx 3): the DiT's
                                          control with `model.control_input` "pixels" / "pooled"
  image_emb          float32 [E]          portrait embedding (source named in the metadata)
  view               int32                the capture view that served as the portrait (0: the
                                          record's portrait; training identities lend every view)
  uv_texture uint8 [R, R, 3], uv_geometry float32 [R, R, 3], uv_mask uint8 [R, R],
  partial_uv float16 [R, R, 10]           ground truth and the control's source maps, for
                                          decoded held-out metrics and previews

A cache may be split into `part-IIIII-of-NNNNN/` directories, one per host that built it; the
source reads all parts. Beside the shards, `baselines.npz` holds the training split's mean UV
texture and mean neutral geometry (the held-out baselines).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import schema
from data_pipelines.shards import METADATA_FILE, read_metadata_file
from data_pipelines.source import CaptureSource
from data_pipelines.transforms import Example, Record, TransformOptions
from fica_jax.errors import UserError

FORMAT = "fica-latent-cache"
VERSION = 2  # 2: + control_maps, view
CONTROL_GROUPS = ("rgb", "mask", "nrm", "vtx")  # order of the `control` channel groups
MAP_CHANNELS = (3, 1, 3, 3)  # each group's channels in `control_maps`
BASELINES_FILE = "baselines.npz"
KEYS = {
    "identity": "str",
    "split": "str",
    "view": "int32",
    "tex_mean": "float32",
    "tex_std": "float32",
    "geo_mean": "float32",
    "geo_std": "float32",
    "control": "float32",
    "control_maps": "float16",
    "image_emb": "float32",
    "uv_texture": "uint8",
    "uv_geometry": "float32",
    "uv_mask": "uint8",
    "partial_uv": "float16",
}


# ----------------------------------------------------------------------------- records
def encode(record: dict[str, np.ndarray]) -> bytes:
    missing = sorted(set(KEYS) - set(record))
    if missing:
        raise UserError(f"latent cache record: missing keys {missing}")
    buf = io.BytesIO()
    arrays = {
        k: np.asarray(record[k]) if t == "str" else np.asarray(record[k], t)
        for k, t in KEYS.items()
    }
    np.savez(buf, **arrays)
    return buf.getvalue()


def decode(data: bytes, where: str = "record") -> dict[str, np.ndarray]:
    record = schema.load_npz(data, where)
    missing = sorted(set(KEYS) - set(record))
    if missing:
        raise UserError(f"{where}: not a latent cache record (missing {missing})")
    return record


def read_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
    """`DIR/metadata.json` of one cache part, checked for format and version."""
    path = Path(data_dir) / METADATA_FILE
    meta = read_metadata_file(path)
    if meta.get("format") != FORMAT or meta.get("schema_version") != VERSION:
        raise UserError(
            f"{path}: format {meta.get('format')!r} v{meta.get('schema_version')}, expected "
            f"{FORMAT!r} v{VERSION}; build the cache with `fica data cache`"
        )
    return meta


class _PartSource(CaptureSource):
    read_metadata = staticmethod(read_metadata)
    decode = staticmethod(decode)


def part_dirs(cache_dir: str | os.PathLike) -> list[Path]:
    """The directories holding one cache's shards: the cache itself, or all of its parts."""
    root = Path(cache_dir)
    if (root / METADATA_FILE).is_file():
        return [root]
    parts = sorted(root.glob("part-*-of-*")) if root.is_dir() else []
    if not parts:
        raise UserError(
            f"{root}: no latent cache here (no metadata.json or part-*/); "
            "build one with `fica data cache --data DIR --vae RUN --out DIR`"
        )
    want = int(parts[0].name.rsplit("-", 1)[1])
    names = {p.name for p in parts if (p / METADATA_FILE).is_file()}
    missing = [
        f"part-{i:05d}-of-{want:05d}"
        for i in range(want)
        if f"part-{i:05d}-of-{want:05d}" not in names
    ]
    if missing:
        raise UserError(f"{root}: cache parts {missing} are missing or unfinished")
    return [root / f"part-{i:05d}-of-{want:05d}" for i in range(want)]


def cache_metadata(cache_dir: str | os.PathLike) -> dict[str, Any]:
    """Metadata of a cache (part 0's, after checking that every part was built alike)."""
    metas = [read_metadata(d) for d in part_dirs(cache_dir)]
    same = ("vae", "dense", "control_source", "embedding", "grid", "token_channels")
    for d, m in zip(part_dirs(cache_dir)[1:], metas[1:], strict=True):
        for k in same:
            if m.get(k) != metas[0].get(k):
                raise UserError(f"{d}: {k} differs from part 0's; rebuild the cache")
    return metas[0]


class LatentSource:
    """Random access over one split of a latent cache (all parts, in order)."""

    def __init__(self, cache_dir: str | os.PathLike, split: str):
        self.cache_dir = Path(cache_dir)
        self.parts = [_PartSource(d, split) for d in part_dirs(cache_dir)]
        self._starts = np.cumsum([0] + [len(p) for p in self.parts]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def __repr__(self) -> str:
        return f"LatentSource({str(self.cache_dir)!r}, n={len(self)})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {self!r}")
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part][index - self._starts[part]]


def load_baselines(cache_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    path = part_dirs(cache_dir)[0] / BASELINES_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; rebuild the cache with `fica data cache`")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- examples
def control_channels(groups: Sequence[str], sizes: int | Sequence[int]) -> list[int]:
    """Channel indices of the chosen control groups in a record's `control` array (`sizes`: the
    token channels, every group that wide) or `control_maps` (`sizes=MAP_CHANNELS`)."""
    bad = [g for g in groups if g not in CONTROL_GROUPS]
    if bad or not groups:
        raise UserError(
            f"control maps {list(groups)}: expected a non-empty subset of {CONTROL_GROUPS}"
        )
    sizes = [sizes] * len(CONTROL_GROUPS) if isinstance(sizes, int) else list(sizes)
    starts = np.cumsum([0, *sizes])
    return [int(starts[CONTROL_GROUPS.index(g)]) + c for g in groups for c in range(sizes[CONTROL_GROUPS.index(g)])]  # fmt: skip


def pixel_control(maps: np.ndarray, groups: Sequence[str], grid: int, pooled: bool = False
                  ) -> np.ndarray:  # fmt: skip
    """Normalised partial maps [..., R, R, 10] -> the chosen groups on the DiT's latent grid, no
    VAE in between (a sparse map through an 8x-downsampling VAE loses the texels it has):
    space-to-depth [..., G, G, (R / G)^2 x channels], or with `pooled` each cell's mean over the
    texels the portrait saw [..., G, G, channels] (the mask group: the share of them)."""
    maps = np.asarray(maps, np.float32)
    *lead, r, _, _ = maps.shape
    f = r // grid
    if f * grid != r:
        raise UserError(f"control maps {r}x{r}: not a multiple of the {grid}x{grid} latent grid")
    if pooled:
        seen = (maps[..., 3:4] > 0).astype(np.float32)
        cells = lambda x: x.reshape(*lead, grid, f, grid, f, x.shape[-1]).sum((-4, -2))
        n = cells(seen)
        mean = cells(maps * seen) / np.maximum(n, 1.0)
        mean[..., 3:4] = 2.0 * n / (f * f) - 1.0  # coverage, on the mask's [-1, 1] scale
        return mean[..., control_channels(groups, MAP_CHANNELS)]
    maps = maps[..., control_channels(groups, MAP_CHANNELS)]
    c = maps.shape[-1]
    x = maps.reshape(*lead, grid, f, grid, f, c)
    x = np.moveaxis(x, -4, -3)  # [..., G, G, f, f, c]: the layout of layers.pixel_unshuffle
    return x.reshape(*lead, grid, grid, f * f * c)


def control_width(groups: Sequence[str], control_input: str, token_channels: int,
                  factor: int) -> int:  # fmt: skip
    """Channels of the DiT's control input: `token_channels` per group through the VAE
    ("latents"), the groups' map channels x factor^2 ("pixels", factor = R / G), or the groups'
    map channels ("pooled")."""
    if control_input == "latents":
        return len(groups) * token_channels
    if control_input in ("pixels", "pooled"):
        n = len(control_channels(groups, MAP_CHANNELS))
        return n * factor * factor if control_input == "pixels" else n
    raise UserError(
        f"model.control_input {control_input!r}: expected 'latents', 'pixels' or 'pooled'"
    )


def latent_example(record: Record, rng: np.random.Generator, opts: TransformOptions) -> Example:
    """DiT training example: texture/geometry latents sampled from their cached posteriors
    (z = mean + std * eps; `augment=False` takes the mean), the control groups and embedding.

    `opts.extra` carries the stage's choices: `control` (the groups), `control_input`
    ("latents": the VAE-encoded groups; "pixels" / "pooled": `pixel_control` of the maps), `image_emb`
    (False zeroes the embedding: the ablation without it), `ground_truth` (add the decoded-metric
    maps).
    """
    extra = dict(opts.extra)

    def posterior(name):
        mean, std = np.asarray(record[f"{name}_mean"]), np.asarray(record[f"{name}_std"])
        return (
            mean + std * rng.standard_normal(mean.shape).astype(np.float32)
            if opts.augment
            else mean
        )

    emb = np.asarray(record["image_emb"], np.float32)
    out = {
        "tex_latent": posterior("tex").astype(np.float32),
        "geo_latent": posterior("geo").astype(np.float32),
        "control": _control(record, extra["control"], extra.get("control_input", "latents")),
        "image_emb": emb if extra.get("image_emb", True) else np.zeros_like(emb),
    }
    if extra.get("ground_truth"):
        out["uv_texture"] = np.asarray(record["uv_texture"], np.float32) / 255.0
        out["uv_geometry"] = np.asarray(record["uv_geometry"], np.float32)
        out["uv_mask"] = np.asarray(record["uv_mask"], np.float32)
        out["partial_uv"] = np.asarray(record["partial_uv"], np.float32)
    return out


def select_control(control_input: str, groups: Sequence[str], maps: np.ndarray,
                   latents: Callable[[], np.ndarray], grid: int) -> np.ndarray:  # fmt: skip
    """The DiT's control input for `groups`, for the cache (`latent_example`) and `fica generate`
    (`infer.latent_cache.encode_control`) alike: "pixels" / "pooled", `pixel_control` of the
    normalised partial maps [..., R, R, 10] on the `grid`; "latents", the groups' channels of
    `latents()` [..., G, G, 4 x token channels] (the VAE-encoded groups, encoded only if asked)."""
    if control_input in ("pixels", "pooled"):
        return pixel_control(maps, groups, grid, pooled=control_input == "pooled")
    z = latents()
    return z[..., control_channels(groups, z.shape[-1] // len(CONTROL_GROUPS))]


def _control(record: Record, groups: Sequence[str], control_input: str) -> np.ndarray:
    latents = np.asarray(record["control"], np.float32)
    return select_control(control_input, groups, record["control_maps"], lambda: latents,
                          latents.shape[0])  # fmt: skip
