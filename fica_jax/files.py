"""Writing outputs so that a reader never sees a partial file, and a bad output path is one line.

Every writer in fica-jax goes through here:
- `atomic_file(path)` yields a temporary path beside `path` (same suffix, so PIL / imageio pick
  the format from it) and renames it onto `path` only when the block ends without an error;
- `atomic_dir(path)` does the same for a folder: the old folder, if any, is replaced at the end;
- `write_text` / `write_json` are the one-line cases;
- `check_writable(path)` raises the same error up front, creating nothing.

A location that cannot be written (a read-only or missing parent, a file where a folder should
be) raises `UserError` naming it, which the CLI prints as one `error: ...` line with exit code 2;
nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

from fica_jax.errors import UserError


def _unwritable(path: pathlib.Path, err: OSError) -> UserError:
    reason = err.strerror or type(err).__name__
    return UserError(f"cannot write {path}: {reason}; expected a writable output location")


def ensure_dir(path: str | os.PathLike) -> pathlib.Path:
    """`path` as a folder (created with its parents), or a `UserError` naming it."""
    path = pathlib.Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(path, e) from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: permission denied; expected a writable folder")
    return path


def check_writable(path: str | os.PathLike) -> pathlib.Path:
    """`path` as a Path when a file or folder could be written there (missing parents
    included), else the `UserError` writing it would raise; creates nothing. Commands call it
    on their output paths before any slow work."""
    path = pathlib.Path(path)
    probe = path.parent  # the nearest existing folder above `path` must be writable
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot write {path}: {probe} is not a folder; expected a writable "
                        "output location")  # fmt: skip
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {path}: {probe} is not writable; expected a writable "
                        "output location")  # fmt: skip
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """with atomic_file(p) as tmp: write tmp  ->  renamed onto p at the end (mode 0644)."""
    path = pathlib.Path(path)
    parent = ensure_dir(check_writable(path).parent)  # an error names `path`, not its folder
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise _unwritable(path, e) from None
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared outputs unreadable
        os.replace(tmp, path)
    except OSError as e:
        raise _unwritable(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """with atomic_dir(d) as tmp: fill folder tmp  ->  it replaces d at the end."""
    path = pathlib.Path(path)
    ensure_dir(check_writable(path).parent)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    except OSError as e:
        raise _unwritable(path, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return pathlib.Path(path)


def write_json(path: str | os.PathLike, obj, **kw) -> pathlib.Path:
    return write_text(path, json.dumps(obj, indent=2, **kw) + "\n")
