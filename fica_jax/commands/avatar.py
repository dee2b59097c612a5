"""`fica avatar` (a held-out identity's UV maps through a trained UPM -> avatar bundle) and
`fica render` (drive a bundle: turntable, blendshape sweep, expression codes or an ARKit track;
the JAX renderer or the exported PyTorch runtime). The work is in `fica_jax.avatar.drive`."""

from __future__ import annotations

from fica_jax.avatar.drive import make_avatar, render_avatar


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("avatar", help="build an avatar bundle from a trained UPM run")
    p.add_argument("--run", required=True, help="the `fica train upm` workdir")
    p.add_argument("--data", required=True, help="capture dataset holding the identity's UV maps")
    p.add_argument("--out", required=True, help="avatar folder to write")
    p.add_argument("--split", default="test", help="split of --data (default test: held out)")
    p.add_argument("--identity", default=None, help="index or identity id (default: the first)")

    def avatar_cmd(args, extra) -> int:
        info = make_avatar(args.run, args.data, args.out, split=args.split, identity=args.identity)
        print(f"avatar of identity {info['identity']} ({args.split}) -> {args.out}")
        return 0

    p.set_defaults(func=avatar_cmd)

    p = subparsers.add_parser("render", help="drive and render an avatar to a GIF or PNG sheet")
    p.add_argument("--avatar", required=True, help="avatar folder (`fica avatar --out`)")
    p.add_argument(
        "--out", required=True, help="FILE.gif / FILE.mp4 (animation) or FILE.png (sheet)"
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--turntable", action="store_true", help="orbit at neutral expression")
    mode.add_argument("--sweep", action="store_true", help="each blendshape, then the gaze")
    mode.add_argument("--expressions", help="[T, E] .npy of expression codes, one per frame")
    mode.add_argument("--arkit", help="ARKit-52 blendshape CSV (Live Link Face layout)")
    mode.add_argument("--meshes", help="folder of tracked meshes (*.ply/*.bin/*.obj, name "
                      "order) in the avatar's template topology: codes fitted to each")  # fmt: skip
    p.add_argument("--neutral", default=None,
                   help="--meshes: the neutral mesh the deltas start from (default: the first)")  # fmt: skip
    p.add_argument("--mesh-unit", default="mm", choices=("mm", "m"),
                   help="--meshes: the files' length unit (Ava-256 and Multiface: mm)")  # fmt: skip
    p.add_argument("--size", type=int, default=256, help="image side in px (default 256)")
    p.add_argument("--fps", type=float, default=12.0)
    p.add_argument("--backend", default="jax", choices=("jax", "torch"),
                   help="jax (default) or the exported PyTorch runtime (gsplat on CUDA)")  # fmt: skip
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="torch backend: cuda needs a GPU; auto takes it when present")  # fmt: skip

    def render_cmd(args, extra) -> int:
        which = ("turntable" if args.turntable else "sweep" if args.sweep
                 else "arkit" if args.arkit else "meshes" if args.meshes else "codes")  # fmt: skip
        res = render_avatar(
            args.avatar, args.out, mode=which, codes=args.arkit or args.meshes or args.expressions,
            size=args.size, fps=args.fps, backend=args.backend, device=args.device,
            neutral=args.neutral, mesh_unit=1e-3 if args.mesh_unit == "mm" else 1.0,
        )  # fmt: skip
        print(f"{res['frames']} frames at {res['size']} px in {res['seconds']} s -> {res['out']}")
        return 0

    p.set_defaults(func=render_cmd)
