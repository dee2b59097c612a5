"""One writer for every benchmark's JSON under benchmarks/results/ (temp file, then rename)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile


def write_result(result: dict, out: str | os.PathLike, indent: int = 1) -> pathlib.Path:
    """Writes `result` as JSON to `out` atomically, readable by everyone; prints the summary
    (every key but `rows`) on one line."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(result, indent=indent) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a results file is for everyone
    os.replace(tmp, out)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    return out
