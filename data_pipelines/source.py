"""Grain random-access source over capture shards (`shards.py` layout, `SCHEMA.md`).

`CaptureSource(data_dir, split)[i]` is the decoded, validated schema record `i` of the split,
counting across shard files in order. The source holds only paths and counts; readers open lazily
in whichever process reads, so it pickles into Grain's multiprocessing workers. Broken inputs
become `UserError`s naming the file (and record) instead of Riegeli/zip tracebacks.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines import schema
from data_pipelines.shards import read_metadata
from fica_jax.errors import UserError


class CaptureSource:
    """Random access over one split of a dataset directory; items are schema record dicts."""

    # Other record kinds (data_pipelines/latents.py) override how metadata and records are read.
    read_metadata = staticmethod(read_metadata)
    decode = staticmethod(schema.decode)

    def __init__(self, data_dir: str | os.PathLike, split: str, *, check_files: bool = True):
        self.data_dir = Path(data_dir)
        self.split = split
        self.metadata = self.read_metadata(self.data_dir)
        splits = self.metadata["splits"]
        if split not in splits:
            raise UserError(
                f"{self.data_dir / 'metadata.json'}: no split {split!r}; has {sorted(splits)}"
            )
        shards = splits[split]["shards"]
        self.files = [str(self.data_dir / s["file"]) for s in shards]
        counts = [int(s["num_records"]) for s in shards]
        self._starts = list(np.cumsum([0] + counts)[:-1].tolist())
        self._counts = counts
        self._len = int(sum(counts))
        self._readers: dict[int, Any] = {}
        if check_files:
            # Opening a reader parses the file's footer: a truncated file opens with the wrong
            # record count (or fails), so checking counts up front catches it before training.
            for i in range(len(self.files)):
                self._reader(i)

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:  # grain DataLoader checkpoints key on the source repr
        return f"{type(self).__name__}({str(self.data_dir)!r}, {self.split!r}, n={self._len})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}  # C++ readers do not pickle; workers reopen their own
        return state

    def _reader(self, shard: int):
        if shard in self._readers:
            return self._readers[shard]
        from array_record.python.array_record_module import ArrayRecordReader

        path = self.files[shard]
        if not os.path.isfile(path):
            raise UserError(f"{path}: shard file listed in metadata.json is missing")
        try:
            reader = ArrayRecordReader(path)
            n = reader.num_records()
        except RuntimeError as e:
            raise UserError(f"{path}: corrupt or truncated shard ({_first_line(e)})") from None
        if n != self._counts[shard]:
            try:
                reader.close()
            except RuntimeError:  # closing re-checks the file, which is what we report
                pass
            raise UserError(
                f"{path}: holds {n} records but metadata.json says {self._counts[shard]}; "
                "the file is truncated or corrupt"
            )
        self._readers[shard] = reader
        return reader

    def locate(self, index: int) -> tuple[str, int]:
        """(shard file, record index within it) of global record `index`."""
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} out of range for {self!r}")
        shard = bisect.bisect_right(self._starts, index) - 1
        return self.files[shard], index - self._starts[shard]

    def read_bytes(self, index: int) -> bytes:
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} out of range for {self!r}")
        shard = bisect.bisect_right(self._starts, index) - 1
        j = index - self._starts[shard]
        try:
            return self._reader(shard).read([j])[0]
        except RuntimeError as e:
            raise UserError(
                f"{self.files[shard]} record {j}: corrupt or truncated shard ({_first_line(e)})"
            ) from None

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        data = self.read_bytes(index)
        shard_file, j = self.locate(index)
        return self.decode(data, where=f"{shard_file} record {j}")

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
