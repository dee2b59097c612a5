"""Every `fica` verb and flag as before the layout change: tests/golden/cli_surface.txt was
written from the parser of commit 8399dd9 (the last one before fica_jax/commands/ existed), one
line per flag with its default, requiredness, arity, type and choices. A renamed, dropped or
re-defaulted flag fails here; an intended change rewrites the golden file (and says so)."""

import argparse
import pathlib

from fica_jax.commands.main import build_parser

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "golden" / "cli_surface.txt"


def cli_surface(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list[str]:
    lines = []
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in sorted(a.choices.items()):
                lines += cli_surface(sub, (*prefix, name))
    for a in sorted(parser._actions, key=lambda a: a.option_strings or [a.dest]):
        if isinstance(a, argparse._SubParsersAction | argparse._HelpAction):
            continue
        kind = getattr(a.type, "__name__", repr(a.type))
        lines.append(
            f"fica {' '.join(prefix)}: {'/'.join(a.option_strings) or a.dest} "
            f"default={a.default!r} required={a.required} nargs={a.nargs!r} type={kind} "
            f"choices={sorted(a.choices) if a.choices else None} action={type(a).__name__}"
        )
    return lines


def test_every_verb_and_flag_is_unchanged():
    assert cli_surface(build_parser()) == GOLDEN.read_text().splitlines()


def test_every_verb_has_a_handler():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        leaves = nested[0].choices.values() if nested else [p]
        assert all(callable(leaf.get_default("func")) for leaf in leaves), name
