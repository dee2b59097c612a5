"""One writer for every benchmark's JSON under benchmarks/results/ (atomic, `fica_jax.files`)."""

from __future__ import annotations

import json
import os
import pathlib

from fica_jax.files import write_text


def write_result(result: dict, out: str | os.PathLike, indent: int = 1) -> pathlib.Path:
    """Writes `result` as JSON to `out` atomically, readable by everyone; prints the summary
    (every key but `rows`) on one line."""
    path = write_text(out, json.dumps(result, indent=indent) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return path
