"""`fica export --run RUN --out DIR`: a run's checkpoint -> model.safetensors + model.json, from
whatever mesh it was trained on (`fica_jax.export.model_export`)."""

from __future__ import annotations

from fica_jax.export.model_export import DTYPES, export_run


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="a run's checkpoint -> model.safetensors + model.json (any mesh)"
    )
    p.add_argument("--run", required=True, help="the `fica train` workdir")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--ema", action="store_true", help="export the EMA params")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))

    def run_cmd(args, extra) -> int:
        meta = export_run(args.run, args.out, step=args.step, ema=args.ema, dtype=args.dtype)
        print(
            f"exported {meta['stage']} step {meta['source']['step']}: "
            f"{meta['parameters']:,} params ({args.dtype}) -> {args.out}"
        )
        return 0

    p.set_defaults(func=run_cmd)
