"""big_vision-style Python configs: `configs/NAME.py` exposes `get_config(arg) -> ConfigDict`.

A config is named on the command line as `FILE[:ARG]` (`configs/dense.py:tiny`) or, for the
configs shipped with the package, `NAME[:ARG]` (`dense:tiny`). Overrides come as
`--config.path.to.key=value`; the value is parsed to the type of the existing entry, and an unknown
key is a `UserError` that names the key and the nearest existing ones.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from fica_jax.errors import UserError

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(spec: str) -> tuple[pathlib.Path, str | None]:
    """Splits `FILE[:ARG]` and finds FILE (a path, or a name under the shipped `configs/`)."""
    path_str, _, arg = spec.partition(":")
    path = pathlib.Path(path_str)
    if not path.suffix:
        path = CONFIGS_DIR / f"{path_str}.py"
    if not path.is_file():
        shipped = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise UserError(
            f"config file {path_str!r} not found (looked for {path}); expected a path to a .py file "
            f"with get_config(arg) or one of the shipped configs: {', '.join(shipped)}"
        )
    return path, (arg or None)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `FILE[:ARG]`, applies `--config.key=value` overrides and returns a locked config."""
    path, arg = resolve_config_path(spec)
    module_name = f"_fica_config_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} has no get_config(arg) function")
    try:
        cfg = module.get_config(arg) if arg is not None else module.get_config()
    except (KeyError, ValueError) as e:
        raise UserError(f"config {path}: get_config({arg!r}) failed: {e}") from None
    cfg = ml_collections.ConfigDict(cfg)
    apply_overrides(cfg, overrides, source=str(path))
    cfg.lock()
    return cfg


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


def _parse_value(text: str, current, key: str):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise UserError(f"--config.{key}={text}: expected a boolean (true/false)")
    if isinstance(current, str) or current is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return text if current is not None else value
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(
            f"--config.{key}={text}: expected a {type(current).__name__} like {current!r}"
        ) from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, type(current)):
        raise UserError(
            f"--config.{key}={text}: expected a {type(current).__name__} like {current!r}"
        )
    return value


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: Sequence[str], source: str = "config"
) -> None:
    """Applies `--config.a.b=value` (or `a.b=value`) strings in place."""
    for item in overrides:
        text = item.removeprefix("--").removeprefix("config.")
        key, eq, raw = text.partition("=")
        if not eq:
            raise UserError(f"override {item!r}: expected --config.KEY=VALUE")
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            is_last = i == len(parts) - 1
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                near = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(near)}?" if near else ""
                raise UserError(f"unknown config key {key!r} in {source}{hint}")
            if is_last:
                current = node[part]
                if isinstance(current, ml_collections.ConfigDict):
                    raise UserError(f"config key {key!r} is a group; override one of its entries")
                with node.unlocked():
                    node[part] = _parse_value(raw, current, key)
            else:
                node = node[part]


def variant(
    table: Mapping[str, Any], name: str, key: str, overrides: Mapping[str, Any] = {}, **fields
) -> Any:
    """`table[name]` (a frozen dataclass) with `fields` set and the non-empty `overrides` set.

    The one variant-merge rule for every stage: a config names a variant and may override its
    sizes by name; an override of 0 / "" / () / None keeps the variant's value, lists become
    tuples. `key` is the config key of the name (`model.variant`), used in the `UserError` that
    lists the valid variants when `name` is unknown.
    """
    if name not in table:
        raise UserError(f"config {key}={name!r} is unknown; expected one of {sorted(table)}")
    chosen = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    chosen = {k: v for k, v in chosen.items() if v not in (0, "", (), None)}
    return dataclasses.replace(table[name], **fields, **chosen)
