"""A `tensorflow_datasets` builder over capture shards (no TensorFlow needed).

`FicaCapture(src_dir=SHARDS, data_dir=ROOT).download_and_prepare()` re-emits every record of a
fica dataset directory (`shards.py`) as a tfds dataset in the ArrayRecord file format, with every
schema field a raw `tfds.features.Tensor` (uint8/float16/float32/int32/str, static shapes taken
from metadata.json). The result is read by Grain through `builder.as_data_source(split)` or
`tfds.data_sources("fica_capture", data_dir=ROOT)`; `TfdsRecordSource` turns those examples back
into schema records so every stage pipeline (`pipeline.make_pipeline`) accepts either source.
Version major = record schema version.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import schema
from data_pipelines.shards import read_metadata
from data_pipelines.source import CaptureSource
from fica_jax.errors import UserError


def features_for(meta: dict[str, Any]) -> tfds.features.FeaturesDict:
    """tfds features of one record, with the dims of a dataset's metadata.json."""
    h, w = meta["image_size"]
    dims = {
        "R": meta["uv_resolution"],
        "H": h,
        "W": w,
        "V": meta["n_views"],
        "L": meta["landmark_dim"],
        "S": meta["shape_dim"],
        "E": meta["expression_dim"],
    }
    feats = {}
    for key, field in schema.FIELDS.items():
        shape = tuple(dims[d] if isinstance(d, str) else d for d in field.shape)
        dtype = np.str_ if field.dtype == "str" else np.dtype(field.dtype).type
        feats[key] = tfds.features.Tensor(shape=shape, dtype=dtype)
    return tfds.features.FeaturesDict(feats)


def to_record(example: dict[str, Any]) -> dict[str, np.ndarray]:
    """A tfds example (strings come back as bytes, scalars as numpy scalars) -> schema record."""
    out = {}
    for key, field in schema.FIELDS.items():
        x = example[key]
        if field.dtype == "str":
            out[key] = np.str_(x.decode() if isinstance(x, bytes) else str(x))
        else:
            out[key] = np.asarray(x, dtype=field.dtype)
    return out


class FicaCapture(tfds.core.GeneratorBasedBuilder):
    """FiCA capture records (one example per identity, key = identity)."""

    VERSION = tfds.core.Version(f"{schema.SCHEMA_VERSION}.0.0")
    RELEASE_NOTES = {f"{schema.SCHEMA_VERSION}.0.0": "Record schema v1 (data_pipelines/SCHEMA.md)."}

    # tfds locates a builder's source via importlib_resources, which is not a dependency here
    # (and fails on editable installs); the file itself is the answer.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, src_dir: str | os.PathLike | None = None, **kwargs: Any):
        self._src_dir = Path(src_dir) if src_dir is not None else None
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        if self._src_dir is not None:
            features = features_for(read_metadata(self._src_dir))
        else:
            # Reading an already prepared dataset: its features.json holds the shapes.
            if not (Path(self.data_dir) / "features.json").is_file():
                raise UserError(
                    f"{self.data_dir}: no prepared fica_capture dataset; build one with "
                    "FicaCapture(src_dir=SHARDS, data_dir=ROOT).download_and_prepare()"
                )
            features = tfds.features.FeatureConnector.from_config(str(self.data_dir))
        return tfds.core.DatasetInfo(
            builder=self,
            description="FiCA capture records: see data_pipelines/SCHEMA.md",
            features=features,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        if self._src_dir is None:
            raise UserError("FicaCapture needs src_dir=<fica dataset dir> to prepare data")
        meta = read_metadata(self._src_dir)
        return {
            split: self._generate_examples(split)
            for split, info in meta["splits"].items()
            if info.get("num_records", 0) > 0
        }

    def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
        src = CaptureSource(self._src_dir, split)
        for i in range(len(src)):
            rec = src[i]
            # tfds string tensors take Python str (numpy '<U' arrays are rejected).
            yield (
                str(rec["identity"]),
                {k: str(rec[k]) if f.dtype == "str" else rec[k] for k, f in schema.FIELDS.items()},
            )


def build_tfds(src_dir: str | os.PathLike, tfds_root: str | os.PathLike) -> Path:
    """Prepares the tfds copy of `src_dir` under `tfds_root`; returns its versioned directory."""
    builder = FicaCapture(src_dir=src_dir, data_dir=str(tfds_root))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
        )
    )
    return Path(builder.data_dir)


class TfdsRecordSource:
    """Grain source of schema records over a prepared tfds directory (picklable: lazy open)."""

    def __init__(self, prepared_dir: str | os.PathLike, split: str):
        self.prepared_dir = Path(prepared_dir)
        self.split = split
        self._ds = None
        self._len = len(self._source())

    def _source(self):
        if self._ds is None:
            if not (self.prepared_dir / "dataset_info.json").is_file():
                raise UserError(f"{self.prepared_dir}: not a prepared tfds dataset directory")
            builder = tfds.builder_from_directory(str(self.prepared_dir))
            if self.split not in builder.info.splits:
                raise UserError(
                    f"{self.prepared_dir}: no split {self.split!r}; has {list(builder.info.splits)}"
                )
            self._ds = builder.as_data_source(self.split)
        return self._ds

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ds": None}

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TfdsRecordSource({str(self.prepared_dir)!r}, {self.split!r}, n={self._len})"

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rec = to_record(self._source()[int(index)])
        schema.validate(rec, where=f"{self.prepared_dir} {self.split}[{index}]")
        return rec
