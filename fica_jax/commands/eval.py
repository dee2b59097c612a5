"""`fica eval`: the zero-shot animation protocol on held-out identities (`fica_jax.eval`)."""

from __future__ import annotations

import json
import pathlib

from fica_jax.eval.harness import evaluate


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("eval", help="zero-shot animation protocol on held-out identities")
    p.add_argument("--models", required=True, help="folder of exports (as for fica generate)")
    p.add_argument("--data", required=True, help="capture dataset with held-out identities")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--backend", default="jax", choices=("jax", "torch"))
    p.add_argument("--steps", type=int, default=50, help="DiT Euler steps (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the DiT's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="DiT samples per identity (seeds seed..)")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="first N identities only")
    p.add_argument("--frames", type=int, default=None, help="first N dome frames per identity")
    p.add_argument(
        "--pose", default="gt", choices=("gt", "regressor"),
        help="the portrait's camera, expression and landmarks: the capture's, as a face tracker "
        "gives them (default), or the dense predictor's",
    )  # fmt: skip
    p.add_argument("--lpips", default=None, help="folder with alexnet.pth + alex.pth (v0.1)")
    p.add_argument("--arcface", default=None, help="insightface iresnet backbone.pth")

    def run_cmd(args, extra) -> int:
        rep = evaluate(
            args.models, args.data, args.out, backend=args.backend, steps=args.steps,
            cfg_scale=args.cfg, seed=args.seed, samples=args.samples, split=args.split,
            limit=args.limit, frames=args.frames, pose=args.pose, lpips_dir=args.lpips,
            arcface=args.arcface,
        )  # fmt: skip
        if "tables" in rep:
            print(pathlib.Path(args.out, "report.md").read_text())
        print(f"eval -> {args.out} ({json.dumps(rep.get('info', {}).get('seconds'))} s)")
        return 0

    p.set_defaults(func=run_cmd)
