"""Grain input pipelines for every training stage (big_vision/MaxText style host input).

records (CaptureSource or a tfds data source)
  -> host_records: this host's contiguous slice [i*n/k, (i+1)*n/k) (disjoint, covers all),
     shuffle(per-host seed; grain reseeds every epoch), repeat(num_epochs)
  -> random_map(StageTransform(fn))     (per-element rng from (seed, index): augmentation is
                                         reproducible and independent of worker count)
  -> batch(global_batch_size // process_count, drop_remainder)
  -> to_iter_dataset -> mp_prefetch(workers)

Everything up to the batch is a MapDataset, so Grain's workers each take whole batches
(worker j computes batches j, j+W, ...) and the output is identical for any worker count. The
iterator's `get_state()/set_state()` is what the train loop saves beside the model in Orbax.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np

from data_pipelines.source import CaptureSource
from data_pipelines.transforms import StageFn, StageTransform, TransformOptions, resize_uv
from data_pipelines.workers import grain_worker_init
from fica_jax.errors import UserError


def open_source(data_dir: str | os.PathLike, split: str) -> Any:
    """A random-access source of schema records: our shards, or a prepared tfds directory."""
    data_dir = Path(data_dir)
    if (data_dir / "dataset_info.json").is_file():
        from data_pipelines.tfds_builder import TfdsRecordSource

        return TfdsRecordSource(data_dir, split)
    return CaptureSource(data_dir, split)


def mean_maps(
    data_dir: str | os.PathLike,
    split: str = "train",
    limit: int = 4096,
    resolution: int | None = None,
) -> dict:
    """The split's mean UV texture [r, r, 3] in [0, 1] and mean neutral geometry [r, r, 3]
    (dataset units), over its first `limit` records, at `resolution` texels a side by the maps'
    own rule (`transforms.resize_uv`; None: as stored): the mean-texture / mean-shape baselines
    and the VAE's position reference (`fica_jax.models.uv_latent.MapStats.with_reference`)."""
    src = open_source(data_dir, split)
    n = min(len(src), limit)
    if n == 0:
        raise UserError(f"{data_dir}: split {split!r} has no records to average")
    tex = geo = 0.0
    for i in range(n):
        r = src[i]
        tex = tex + np.asarray(r["uv_texture"], np.float64) / 255.0
        geo = geo + np.asarray(r["uv_geometry"], np.float64)
    # nearest-texel resizing selects texels, so it commutes with the mean: resize once
    mean = lambda x: resize_uv((x / n).astype(np.float32), resolution)
    return {"mean_texture": mean(tex), "mean_geometry": mean(geo)}


def check_uv_resolution(data_dir: str | os.PathLike, resolution: int, multiple: int = 1) -> None:
    """Refuses, in one line, a config `data.uv_resolution` that is not a positive multiple of
    `multiple` (a model's downsampling factor) or, with a `data_dir`, is larger than the UV maps
    stored there: they are resampled down (`transforms.resize_uv`), never up."""
    if resolution < 1 or resolution % multiple:
        raise UserError(
            f"config data.uv_resolution={resolution}: expected a positive multiple of {multiple} "
            "(the model's downsampling factor)"
        )
    src = open_source(data_dir, "train") if data_dir else ()
    stored = int(np.asarray(src[0]["uv_texture"]).shape[0]) if len(src) else resolution
    if resolution > stored:
        raise UserError(
            f"config data.uv_resolution={resolution} is larger than the {stored}x{stored} UV maps "
            f"stored in {data_dir}; expected at most {stored} (maps are resampled down, never up)"
        )


def host_slice(n: int, process_index: int, process_count: int) -> slice:
    """Contiguous, disjoint slices over all hosts that cover [0, n) (sizes differ by <= 1)."""
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count})")
    return slice(process_index * n // process_count, (process_index + 1) * n // process_count)


def host_records(
    ds: grain.MapDataset,
    process_index: int,
    process_count: int,
    *,
    seed: int | None,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """The one host-sharding convention for every stage's records: this host's contiguous slice
    (`host_slice`), shuffled with a per-host seed (`seed=None`: kept in order), then repeated
    (`num_epochs=None`: forever; grain reseeds each epoch)."""
    ds = ds[host_slice(len(ds), process_index, process_count)]
    if seed is not None:
        # Hosts shuffle their own slices; the seed mixes in the host for independence.
        ds = ds.shuffle(seed=(seed * 1_000_003 + process_index) % 2**32)
    return ds.repeat(num_epochs)


def _mark_flags_parsed() -> None:
    # grain 0.2.18 workers read absl flags; without this they fail when the main program did not
    # parse absl flags (grain issue 1355).
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(
    data_dir: str | os.PathLike,
    transform: StageFn,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    workers: int = 0,
    augment: bool = True,
    num_epochs: int | None = None,
    image_size: int | None = None,
    uv_resolution: int | None = None,
    shuffle: bool = True,
    source: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> grain.IterDataset:
    """This host's batches of `transform(record, rng, options)` (a stage's example function from
    `data_pipelines.transforms`): dicts of numpy arrays with leading dim
    global_batch_size // process_count. `num_epochs=None` repeats forever. `source` overrides
    the source opened from `data_dir` (tests, custom sources, the latent cache); `extra` reaches
    the example function as `options.extra`."""
    if global_batch_size % process_count:
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by {process_count} hosts"
        )
    per_host = global_batch_size // process_count
    src = source if source is not None else open_source(data_dir, split)
    n = len(range(len(src))[host_slice(len(src), process_index, process_count)])
    if n == 0 or (num_epochs is not None and n * num_epochs < per_host):
        raise UserError(
            f"{data_dir} split {split!r}: host {process_index} of {process_count} gets "
            f"{n} records, fewer than its batch of {per_host}"
        )
    ds = host_records(
        grain.MapDataset.source(src),
        process_index,
        process_count,
        seed=seed if shuffle else None,
        num_epochs=num_epochs,
    )
    extra = tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (extra or {}).items())
    )
    options = TransformOptions(
        augment=augment, image_size=image_size, uv_resolution=uv_resolution, extra=extra
    )
    ds = ds.random_map(StageTransform(transform, options), seed=seed)
    ds = ds.batch(per_host, drop_remainder=True)
    it = ds.to_iter_dataset()
    if workers > 0:
        _mark_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=grain_worker_init()
        )
    return it


def first_batch(ds: grain.IterDataset) -> dict[str, np.ndarray]:
    it = iter(ds)
    try:
        return next(it)
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


@dataclasses.dataclass(frozen=True)
class CaptureData:
    """`Stage.make_data` of the stages that read capture shards with the example function
    `transform`: maps the shared `cfg.data` fields (configs/common.py) onto `make_pipeline`.
    Train repeats forever with augmentation; any other split is one un-augmented, unshuffled
    pass ("eval" reads the identity-level held-out split "test" of the shards)."""

    transform: StageFn

    def __call__(
        self, cfg: Any, split: str, process_index: int, process_count: int, **overrides: Any
    ) -> grain.IterDataset:
        data = cfg.data
        if not data.dir:
            raise UserError(
                "config data.dir is empty; create data with `fica data synth --out DIR ...` and "
                "pass --config.data.dir=DIR"
            )
        train = split == "train"
        shard_split = "test" if split == "eval" else split
        epochs = None
        if not train:
            # One pass, but at least one full batch even when the held-out split is small.
            n = len(open_source(data.dir, shard_split))
            epochs = max(1, -(-int(data.batch_size) // max(n, 1)))
        kw = dict(
            global_batch_size=data.batch_size,
            seed=(data.get("shuffle_seed", 0) + cfg.get("seed", 0)) % 2**32,
            process_index=process_index,
            process_count=process_count,
            workers=data.get("workers", 0),
            augment=train and data.get("augment", True),
            num_epochs=epochs,
            image_size=data.get("image_size") or None,
            uv_resolution=data.get("uv_resolution") or None,
            shuffle=train,
        )
        return make_pipeline(data.dir, self.transform, shard_split, **{**kw, **overrides})
