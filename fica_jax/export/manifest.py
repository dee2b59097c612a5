"""Framework-free readers of fica-jax's on-disk folders: a JSON manifest carrying `format` and
`version` beside an arrays file (safetensors or .npz).

One reader for `fica export`'s model folders (`model_export`), avatar bundles (`fica_jax.avatar.bundle`)
and the PyTorch runtime (`torch_runtime`, which must not import JAX): numpy, json and
safetensors only. Bad folders raise one-line `UserError`s naming the file and what was expected.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from fica_jax.errors import UserError

AVATAR_FORMAT, AVATAR_VERSION = "fica-avatar", 1  # avatar.json (`Avatar.save`)


def read_manifest(
    directory: str | os.PathLike, name: str, fmt: str, version: int, writer: str
) -> tuple[pathlib.Path, dict]:
    """(folder, parsed `directory/name`), checked to be `fmt` version `version`; `writer` names
    what makes such folders (for the missing-file message)."""
    d = pathlib.Path(directory)
    try:
        meta = json.loads((d / name).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{d} holds no {name}; expected a folder written by {writer}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{d}/{name} is not valid JSON ({e})") from None
    got = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else (None, None)
    if got != (fmt, version):
        raise UserError(f"{d}/{name} is format {got[0]!r} v{got[1]}; expected {fmt} v{version}")
    return d, meta


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{name: array} of a `.safetensors` or `.npz` file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
        with np.load(path) as z:
            return dict(z)
    except Exception as e:  # safetensors and numpy raise their own error types
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
