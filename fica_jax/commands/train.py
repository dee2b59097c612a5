"""`fica train STAGE ...` and `fica plan ...` (command group listed in `fica_jax/commands/main.py`).

fica train toy --config configs/toy.py --workdir /tmp/toy [--init_from DIR]
    [--profile_steps 10,20] [--config.train.steps=500 ...]
fica plan --config configs/dit.py:paper --mesh data=2,fsdp=32 [--chips v5p,h100] [--topology v5p:4x4x4] [--out F]
"""

from __future__ import annotations

import argparse
import sys

from fica_jax.errors import UserError
from fica_jax.files import write_text


def _profile_steps(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        a, b = (int(t) for t in text.split(","))
    except ValueError:
        raise UserError(f"--profile_steps {text!r}: expected two step numbers A,B") from None
    if not 0 <= a < b:
        raise UserError(f"--profile_steps {text!r}: expected 0 <= A < B")
    return a, b


def cmd_train(args, extra) -> int:
    # Multi-host set-up must precede any JAX computation.
    from fica_jax.train import distributed

    distributed.initialize_from_env()

    from fica_jax.config import load_config
    from fica_jax.train.loop import train
    from fica_jax.train.stage import get_stage

    stage = get_stage(args.stage)  # unknown stage -> UserError before loading anything heavy
    cfg = load_config(args.config, extra)
    if args.fit_data and stage.fit_data is not None:
        cfg = load_config(args.config, _fitted(cfg, stage) + list(extra))
    if get_stage(cfg.stage) is not stage:
        raise UserError(
            f"config {args.config} is for stage {cfg.stage!r}, not {args.stage!r}; "
            f"run `fica train {cfg.stage} --config {args.config} ...`"
        )
    train(
        cfg,
        args.workdir,
        init_from=args.init_from,
        profile_steps=_profile_steps(args.profile_steps),
    )
    return 0


def _fitted(cfg, stage) -> list[str]:
    """`--config.KEY=VALUE` overrides from the stage's `fit_data` of `data.dir`'s metadata (what
    the data fix: UV resolution, image size, code and landmark sizes, the head template)."""
    import pathlib

    from data_pipelines.shards import METADATA_FILE, read_metadata_file

    if not cfg.data.get("dir"):
        raise UserError("--fit-data needs --config.data.dir=DIR")
    meta = read_metadata_file(pathlib.Path(cfg.data.dir) / METADATA_FILE)
    return [f"--config.{k}={v}" for k, v in stage.fit_data(meta).items()]


def cmd_plan(args, extra) -> int:
    from fica_jax.plan import planner as plan

    report = plan.plan_in_subprocess(
        args.config, args.mesh, args.chips, extra, args.topology, args.libtpu
    )
    text = plan.dumps(report)
    if args.out:
        write_text(args.out, text + "\n")
    print(text)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage (resumes from WORKDIR's checkpoints)")
    p.add_argument("stage", help="stage: a name (toy, vae, dense, dit, ...) or path/to/stage.py")
    p.add_argument("--config", required=True, help="FILE[:ARG] config, e.g. configs/toy.py:tiny")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and profiles go here")
    p.add_argument("--init_from", default=None, help="another run's workdir: take its params")
    p.add_argument("--fit-data", action="store_true",
                   help="set what the data fix (UV and image sizes, code and landmark sizes, "
                   "template) from data.dir's metadata; explicit --config.* still win")  # fmt: skip
    p.add_argument("--profile_steps", default=None, help="A,B: profiler trace of steps A..B")
    p.set_defaults(func=cmd_train)

    q = subparsers.add_parser("plan", help="compile the train step for a virtual mesh; JSON out")
    q.add_argument("--config", required=True, help="FILE[:ARG] config")
    q.add_argument("--mesh", required=True, help="axis sizes, e.g. data=8,fsdp=8[,tensor=1]")
    q.add_argument("--chips", default="v5p,v6e,a100,h100", help="chips for the roofline")
    q.add_argument("--out", default=None, help="also write the JSON here")
    q.add_argument(
        "--topology",
        default=None,
        help="compile with the TPU compiler for this slice, e.g. v5p:4x4x4 (libtpu, no TPU needed)",
    )
    q.add_argument("--libtpu", default=None, help="folder with libtpu (pip install --target)")
    q.set_defaults(func=cmd_plan)


def main(argv: list[str] | None = None) -> int:
    """`python -m fica_jax.commands.train train|plan ...`: these commands without the other groups."""
    parser = argparse.ArgumentParser(prog="fica")
    add_commands(parser.add_subparsers(dest="command", required=True))
    from fica_jax.commands.main import run

    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
