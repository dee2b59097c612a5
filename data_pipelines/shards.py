"""Capture shards on disk: ArrayRecord files plus `metadata.json` (layout in `SCHEMA.md`).

A dataset directory holds `{split}-{i:05d}-of-{n:05d}.array_record` files (one schema record per
identity, `data_pipelines.schema.encode` bytes, `group_size:1` so every record is one chunk and
random access reads only that record) and a `metadata.json` describing dims, splits and where the
data came from. Writing is atomic: everything goes into a hidden temp dir beside the output,
which is renamed into place only after the last shard and the metadata are closed; any failure
removes the temp dir and leaves an existing output untouched.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import schema
from fica_jax.errors import UserError
from fica_jax.files import check_writable
from fica_jax.geometry import template_store
from fica_jax.geometry.template import HeadTemplate

METADATA_FILE = "metadata.json"
SHARD_SUFFIX = ".array_record"
SPLITS = ("train", "test")
# ~16 identities x ~10 MB (R=256, 5 views) ~ 160 MB per shard: large enough for sequential
# throughput, small enough that a converter crash loses little and hosts open few files.
DEFAULT_RECORDS_PER_SHARD = 16


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def record_dims(record: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The dataset-level dims of one record (every record of a dataset must agree)."""
    img = np.asarray(record["view_image"])
    return {
        "uv_resolution": int(np.asarray(record["uv_texture"]).shape[0]),
        "image_size": [int(img.shape[1]), int(img.shape[2])],
        "n_views": int(img.shape[0]),
        "landmark_dim": int(np.asarray(record["view_kpts"]).shape[1]),
        "expression_dim": int(np.asarray(record["view_expression"]).shape[1]),
        "shape_dim": int(np.asarray(record["id_coeffs"]).shape[0]),
    }


def jsonable(x: Any) -> Any:
    """Converts numpy values / tuples / dataclass dicts to plain JSON types."""
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def _created_by() -> str:
    try:
        from importlib.metadata import version

        v = version("fica-jax")
    except Exception:  # not installed as a distribution (source checkout)
        v = "source"
    return f"fica-jax {v}: {' '.join(Path(sys.argv[0]).name.split() + sys.argv[1:])}"


class DatasetWriter:
    """Writes records into shards atomically. Use as a context manager.

    with DatasetWriter(out_dir, generator={...}, template={...}) as w:
        for rec in records: w.add(rec)          # or w.add_encoded(split, dims, bytes)
    On a clean exit the shards are renamed to `-of-N` names, metadata.json is written and the
    temp dir replaces `out_dir`; on an exception nothing is left behind.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        overwrite: bool = False,
        records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
        generator: Mapping[str, Any] | None = None,
        template: Mapping[str, Any] | None = None,
        head: HeadTemplate | None = None,
        kind: str = "fica-capture",
        version: int = schema.SCHEMA_VERSION,
        info: Mapping[str, Any] | None = None,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"{self.out_dir}: exists and is not a directory")
        if self.out_dir.is_dir() and any(self.out_dir.iterdir()) and not overwrite:
            raise UserError(
                f"{self.out_dir}: output directory exists and is not empty; "
                "pass --overwrite to replace it"
            )
        if records_per_shard < 1:
            raise UserError(f"records_per_shard must be >= 1, got {records_per_shard}")
        check_writable(self.out_dir)  # a location that cannot be written: one UserError, now
        self.records_per_shard = records_per_shard
        self.generator = dict(generator or {})
        # the head template: its arrays go to template.npz, its facts into metadata["template"]
        # (a procedural name in `template` is enough: the template is rebuilt from it)
        self.template = dict(template or {})
        self.head = head or template_store.procedural(self.template.get("template", ""))
        if self.head is not None:
            self.template = template_store.metadata(self.head) | self.template
            self.template["key"] = template_store.key(self.head)
        # Other record kinds (the latent cache) reuse the writer with their own format tag,
        # version and extra metadata.
        self.kind, self.version, self.info = kind, version, dict(info or {})
        self._tmp: Path | None = None
        self._writers: dict[str, Any] = {}
        self._shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        self._dims: dict[str, Any] | None = None
        self._identities: set[str] = set()

    def __enter__(self) -> DatasetWriter:
        self._final = self.out_dir.resolve()  # renames need a real name, not "." or "x/.."
        self._final.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(
            tempfile.mkdtemp(prefix=f".{self._final.name}.tmp-", dir=self._final.parent)
        )
        umask = os.umask(0)  # mkdtemp makes 0700; the final dir gets ordinary permissions
        os.umask(umask)
        os.chmod(self._tmp, 0o777 & ~umask)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            for w in self._writers.values():
                w.close()
            self._writers.clear()
            if self._tmp is not None and self._tmp.exists():
                shutil.rmtree(self._tmp, ignore_errors=True)

    # ------------------------------------------------------------------ adding records
    def add(self, record: Mapping[str, np.ndarray], where: str = "record") -> None:
        schema.validate(record, where)
        split = str(np.asarray(record["split"]))
        self.add_encoded(
            split,
            record_dims(record),
            schema.encode(record),
            str(np.asarray(record["identity"])),
            where,
        )

    def add_encoded(
        self, split: str, dims: Mapping[str, Any], data: bytes, identity: str, where: str
    ) -> None:
        """Adds already-encoded (hence validated) record bytes."""
        from array_record.python.array_record_module import ArrayRecordWriter

        assert self._tmp is not None, "use DatasetWriter as a context manager"
        if self._dims is None:
            self._dims = dict(dims)
        elif dict(dims) != self._dims:
            raise UserError(
                f"{where}: dims {dict(dims)} differ from the dataset's {self._dims}; "
                "all identities of one dataset must share resolution, views and code sizes"
            )
        if identity in self._identities:
            raise UserError(f"{where}: identity {identity!r} appears twice")
        self._identities.add(identity)
        shards = self._shards[split]
        if split not in self._writers:
            name = f"{split}-{len(shards):05d}.partial"
            self._writers[split] = ArrayRecordWriter(str(self._tmp / name), "group_size:1")
            shards.append({"file": name, "num_records": 0})
        self._writers[split].write(data)
        shards[-1]["num_records"] += 1
        if shards[-1]["num_records"] >= self.records_per_shard:
            self._writers.pop(split).close()

    def write_file(self, name: str, data: bytes) -> None:
        """A side file (e.g. the latent cache's baselines) swapped in with the shards."""
        assert self._tmp is not None, "use DatasetWriter as a context manager"
        (self._tmp / name).write_bytes(data)

    # ------------------------------------------------------------------ finishing
    def _finish(self) -> None:
        assert self._tmp is not None
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        if self._dims is None:
            raise UserError(f"{self.out_dir}: no records to write")
        splits = {}
        for split, shards in self._shards.items():
            for i, sh in enumerate(shards):
                final = shard_name(split, i, len(shards))
                os.replace(self._tmp / sh["file"], self._tmp / final)
                sh["file"] = final
            splits[split] = {
                "num_records": sum(s["num_records"] for s in shards),
                "shards": shards,
            }
        meta = {
            "format": self.kind,
            "schema_version": self.version,
            **self._dims,
            **self.info,
            "splits": splits,
            "template": self.template,
            "generator": self.generator,
            "created_by": _created_by(),
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        if self.head is not None:
            template_store.save(self.head, self._tmp)
        (self._tmp / METADATA_FILE).write_text(json.dumps(jsonable(meta), indent=1) + "\n")
        # Swap in: move an old output aside first so a crash between the renames never leaves
        # a mix of old and new shards under out_dir.
        old = None
        if self._final.exists():
            old = self._tmp.with_name(self._tmp.name + "-old")
            os.replace(self._final, old)
        os.replace(self._tmp, self._final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------- reading metadata
def read_metadata_file(path: Path) -> dict[str, Any]:
    """A metadata.json as a dict; a missing, unreadable or non-object file is a UserError."""
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object")
    return meta


def read_metadata(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Loads and checks `DIR/metadata.json`; every problem is a UserError naming the path."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: dataset directory does not exist")
    path = data_dir / METADATA_FILE
    if not path.is_file():
        raise UserError(
            f"{path}: missing; {data_dir} is not a fica dataset "
            "(create one with `fica data synth` or `fica data convert`)"
        )
    meta = read_metadata_file(path)
    version = meta.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema_version {version!r}, this fica-jax reads version "
            f"{schema.SCHEMA_VERSION}; re-create the dataset with this version"
        )
    for key in ("uv_resolution", "image_size", "n_views", "splits"):
        if key not in meta:
            raise UserError(f"{path}: missing key {key!r}")
    for split, info in meta["splits"].items():
        if not isinstance(info, dict) or "shards" not in info:
            raise UserError(f"{path}: splits.{split} must hold a 'shards' list")
    return meta


def dataset_template(data_dir: str | os.PathLike) -> HeadTemplate | None:
    """The head template `data_dir` is laid out on (registered under its key), None for a
    folder-layout conversion that names none."""
    meta = read_metadata(data_dir)
    where = str(Path(data_dir) / METADATA_FILE)
    return template_store.from_metadata(meta.get("template", {}), data_dir, where)


def template_stats(data_dir: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """What a model laid out on `data_dir`'s head template carries into its `fica export`: the
    template (metadata and arrays, `template_store.export_stats`) and its expression names
    (empty where the folder holds no metadata or no template)."""
    try:
        info = read_metadata(data_dir).get("template", {})
        where = str(Path(data_dir) / METADATA_FILE)
        head = template_store.from_metadata(info, data_dir, where)
    except (UserError, OSError):
        head, info = None, {}
    stats, arrays = template_store.export_stats(head) if head is not None else ({}, {})
    stats["template"] = info | stats.get("template", {})
    return stats | {"expression_names": list(info.get("expression_names", []))}, arrays
