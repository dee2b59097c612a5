"""The `fica` command line.

Each command group is a module of `fica_jax/commands/` exposing `add_commands(subparsers)`;
a handler is stored as `func` on its parser and receives `(args, extra)` where `extra` holds the
unparsed `--config.key=value` overrides. A `UserError` becomes one `error: ...` line, exit code 2;
an output path (`OUTPUT_ARGS`) that cannot be written is one before the handler starts.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys

from fica_jax.errors import UserError
from fica_jax.files import check_writable

# Modules contributing sub-commands (each defines add_commands(subparsers)).
COMMAND_MODULES = (
    "fica_jax.commands.data",  # fica data synth | inspect | convert | tfds | cache
    "fica_jax.commands.train",  # fica train STAGE, fica plan
    "fica_jax.commands.sample",  # fica sample
    "fica_jax.commands.avatar",  # fica avatar | render
    "fica_jax.commands.export",  # fica export
    "fica_jax.commands.generate",  # fica generate
    "fica_jax.commands.eval",  # fica eval
    "fica_jax.commands.demo",  # fica demo
)

# Every verb's output-path flags (dest names): `--out` (a file or folder) and `inspect --png`.
OUTPUT_ARGS = ("out", "png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fica", description="FiCA in JAX: data, training, planning and avatars."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


# A compile shorter than this is not worth a file: most of a tiny run's programs compile in less.
CACHE_MIN_COMPILE_SECONDS = "0.5"


def use_compilation_cache(default: str = "~/.cache/fica/xla") -> str | None:
    """Points JAX's persistent compilation cache at `FICA_XLA_CACHE` (or `default`; "off"
    disables it) unless the environment already names one, and returns the folder.

    On a CPU host a tiny stage spends most of its wall time in XLA compiles (`fica demo`: every
    stage, export, `generate` and `eval` compile their own programs), and the same programs come
    back: one `generate` per portrait, the eval re-running generate's models, a resumed run,
    the next command. The cache key is the optimised HLO plus compile options, devices and
    versions, so a hit is the same executable. Call before JAX is imported (JAX reads these
    variables once)."""
    where = os.environ.get("FICA_XLA_CACHE", default)
    if where.lower() in ("off", "0", "none", ""):
        os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
        return None
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(where).expanduser()))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", CACHE_MIN_COMPILE_SECONDS)
    return os.environ["JAX_COMPILATION_CACHE_DIR"]


def main(argv: list[str] | None = None) -> int:
    use_compilation_cache()
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parses `argv` (unknown `--config.*` go to the handler) and runs the chosen command."""
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    try:
        for dest in OUTPUT_ARGS:  # before any slow work: loading models, training, rendering
            if getattr(args, dest, None):
                check_writable(getattr(args, dest))
        return int(args.func(args, extra) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
