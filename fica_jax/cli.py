"""The `fica` command line.

Each command group lives beside the code it drives and exposes `add_commands(subparsers)`;
a handler is stored as `func` on its parser and receives `(args, extra)` where `extra` holds the
unparsed `--config.key=value` overrides. A `UserError` becomes one `error: ...` line, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fica_jax.errors import UserError

# Modules contributing sub-commands (each defines add_commands(subparsers)).
COMMAND_MODULES = (
    "data_pipelines.cli",  # fica data synth | inspect | convert | tfds | cache
    "fica_jax.train.cli",  # fica train STAGE, fica plan
    "fica_jax.sample",  # fica sample
    "fica_jax.drive",  # fica avatar | render
    "fica_jax.export.model_export",  # fica export
    "fica_jax.generate",  # fica generate
    "fica_jax.eval.harness",  # fica eval
    "fica_jax.demo",  # fica demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fica", description="FiCA in JAX: data, training, planning and avatars."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parses `argv` (unknown `--config.*` go to the handler) and runs the chosen command."""
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not e.startswith("--config.")]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)}")
    try:
        return int(args.func(args, extra) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
