"""`fica data ...`: synth | inspect | convert | tfds (dataset layout in `SCHEMA.md`).

Bad input (missing dir, corrupt/truncated shard, wrong schema version, ill-shaped capture file)
raises `UserError`, which `fica_jax.commands.main.main` prints as one `error: ...` line with exit code 2;
every writer is atomic, so a failed command leaves no partial output.
"""

from __future__ import annotations

import argparse
import dataclasses


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="create, convert and inspect capture datasets")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("synth", help="generate a synthetic dataset")
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--identities", type=int, required=True, help="number of identities")
    p.add_argument("--frames", type=int, default=None, help="dome frames per identity")
    p.add_argument("--resolution", type=int, default=None, help="UV map resolution R")
    p.add_argument("--image-size", type=int, default=None, help="image side H = W")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default min(2, cpus))")
    p.add_argument("--records-per-shard", type=int, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_synth)

    p = sub.add_parser("inspect", help="write a labelled contact sheet PNG of one identity")
    p.add_argument("data_dir", help="dataset directory")
    p.add_argument("--png", required=True, help="output PNG file")
    p.add_argument("--identity", default=None, help="record index in the split, or identity id")
    p.add_argument("--split", default=None, help="default: first split with records")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("convert", help="convert real captures (SCHEMA.md, Ava-256, Multiface)")
    p.add_argument("--src", required=True, help="capture folder: SRC/<identity>/... (folder), "
                   "SRC/<capture>/decoder/ (ava256) or SRC/<subject>/KRT (multiface)")  # fmt: skip
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--format", default="folder", choices=("folder", "ava256", "multiface"))
    p.add_argument("--topology", default=None,
                   help="ava256/multiface: the meshes' topology OBJ with UVs (the template; "
                   "default: the one the capture ships, Multiface's tracked-mesh OBJ)")  # fmt: skip
    p.add_argument("--landmarks", default=None,
                   help="optional: >= 68 topology vertex ids, iBUG-68 order (keypoints)")  # fmt: skip
    p.add_argument("--frames", type=int, default=None, help="dome views per identity (4)")
    p.add_argument("--resolution", type=int, default=None, help="UV map resolution R (64)")
    p.add_argument("--image-size", type=int, default=None, help="square crop side H = W (64)")
    p.add_argument("--expression-dims", type=int, default=None,
                   help="PCA expression components kept (16)")  # fmt: skip
    p.add_argument("--portrait-camera", default=None, help="default: the most frontal camera")
    p.add_argument("--align", action="store_true",
                   help="folder: crop each portrait by the face detector's rule (fica generate's)")  # fmt: skip
    p.add_argument("--process-index", type=int, default=0, help="this host, of --process-count")
    p.add_argument("--process-count", type=int, default=1)
    p.add_argument("--records-per-shard", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_convert)

    p = sub.add_parser("tfds", help="re-emit a dataset as a tensorflow_datasets dataset")
    p.add_argument("data_dir", help="dataset directory (shards + metadata.json)")
    p.add_argument("--out", required=True, help="tfds data_dir root")
    p.set_defaults(func=_tfds)

    p = sub.add_parser("cache", help="encode a dataset into the DiT's latent + condition cache")
    p.add_argument("--data", required=True, help="capture dataset directory")
    p.add_argument("--vae", required=True, help="a `fica train vae` run dir, or SDXL VAE weights")
    p.add_argument(
        "--dense", default=None, help="a `fica train dense` run dir (control + embedding)"
    )
    p.add_argument("--clip", default=None, help="local CLIP vision weights for the image embedding")
    p.add_argument("--out", required=True, help="output cache directory")
    p.add_argument(
        "--control",
        choices=("dense", "gt"),
        default=None,
        help="partial UV maps from the dense predictor (default with --dense) or the stored ground-truth unwrap",
    )
    p.add_argument(
        "--unshuffle",
        type=int,
        default=2,
        help="pixel-unshuffle of the latents onto the DiT grid (paper: 2)",
    )
    p.add_argument(
        "--latent-scale",
        choices=("auto", "vae"),
        default="auto",
        help="auto: 1/std of training latents; vae: the VAE's own scaling factor (SDXL weights)",
    )
    p.add_argument(
        "--train-views",
        type=int,
        default=1,
        help="views of each training identity used as its portrait, one row each (0: all; "
        "needs --control dense); held-out identities keep their portrait only",
    )
    p.add_argument(
        "--process-index", type=int, default=None, help="this host (default: jax.process_index())"
    )
    p.add_argument("--process-count", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cache)


def _shard_kw(args: argparse.Namespace) -> dict:
    return {} if args.records_per_shard is None else {"records_per_shard": args.records_per_shard}


def _synth(args: argparse.Namespace, extra: list[str]) -> int:
    from data_pipelines.synth import synthesize
    from data_pipelines.synthetic import generator

    overrides = {
        "n_frames": args.frames,
        "uv_resolution": args.resolution,
        "image_size": args.image_size,
    }
    cfg = dataclasses.replace(
        generator.SynthConfig(), **{k: v for k, v in overrides.items() if v is not None}
    )
    synthesize(
        args.out,
        args.identities,
        cfg,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        make_fn=generator.make_identity,
        template=generator.template_metadata(cfg),
        **_shard_kw(args),
    )
    print(f"wrote {args.identities} identities to {args.out}")
    return 0


def _inspect(args: argparse.Namespace, extra: list[str]) -> int:
    from data_pipelines.contact_sheet import write_contact_sheet

    png = write_contact_sheet(args.data_dir, args.png, args.identity, args.split)
    print(f"wrote {png}")
    return 0


def _convert(args: argparse.Namespace, extra: list[str]) -> int:
    if args.format == "folder":
        from data_pipelines.convert import convert_capture

        n = convert_capture(args.src, args.out, overwrite=args.overwrite, align=args.align,
                            **_shard_kw(args))  # fmt: skip
        print(f"converted {n} identities from {args.src} to {args.out}")
        return 0
    import pathlib

    from data_pipelines import multiview
    from fica_jax.errors import UserError

    if not 0 <= args.process_index < args.process_count:
        raise UserError(f"--process-index {args.process_index}: expected 0.."
                        f"{args.process_count - 1} (--process-count {args.process_count})")  # fmt: skip
    src = pathlib.Path(args.src)
    template = multiview.load_topology(args.format, src, args.topology, args.landmarks)
    given = {"n_frames": args.frames, "uv_resolution": args.resolution,
             "image_size": args.image_size, "expression_dims": args.expression_dims,
             "portrait_camera": args.portrait_camera}  # fmt: skip
    opts = dataclasses.replace(
        multiview.MultiviewOptions(), **{k: v for k, v in given.items() if v is not None}
    )
    res = multiview.convert_multiview(
        args.format, src, args.out, template, opts, overwrite=args.overwrite,
        process_index=args.process_index, process_count=args.process_count, **_shard_kw(args),
    )  # fmt: skip
    if not res["written"]:
        print(f"converted {res['converted_here']} identities; waiting for "
              f"{len(res['missing'])} from other hosts (rerun once they finish)")  # fmt: skip
        return 0
    fit = res["expression_basis"]
    held = fit["heldout"]
    tail = (f"; held-out frames {held['pca_mm']:.2f} mm rebuilt vs {held['neutral_mm']:.2f} mm "
            "at neutral" if held else "")  # fmt: skip
    print(f"converted {res['identities']} {args.format} identities to {args.out} "
          f"({fit['dims']} PCA expression codes{tail})")  # fmt: skip
    return 0


def _tfds(args: argparse.Namespace, extra: list[str]) -> int:
    from data_pipelines.tfds_builder import build_tfds

    print(f"prepared {build_tfds(args.data_dir, args.out)}")
    return 0


def _cache(args: argparse.Namespace, extra: list[str]) -> int:
    import jax

    from fica_jax.infer.latent_cache import build_cache

    pi = jax.process_index() if args.process_index is None else args.process_index
    pc = jax.process_count() if args.process_count is None else args.process_count
    out = build_cache(
        args.data,
        args.vae,
        args.out,
        dense_run=args.dense,
        clip_path=args.clip,
        control=args.control,
        unshuffle=args.unshuffle,
        latent_scale=args.latent_scale,
        train_views=args.train_views,
        process_index=pi,
        process_count=pc,
        overwrite=args.overwrite,
    )
    print(f"wrote latent cache {out}")
    return 0
