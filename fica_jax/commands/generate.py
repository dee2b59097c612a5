"""`fica generate`: one portrait in, a drivable avatar bundle out (FiCA Sec. 2, no optimisation).

The image is first framed like a training portrait: the largest face OpenCV's cascades find
decides the square (`data_pipelines.align`), `--no-align` keeps the centred square; either way
`avatar.json`'s info records `crop_box` and `aligned`. The maps come from
`fica_jax.infer.generate.generate_maps` (dense -> unwrap -> DiT -> VAE decode -> refiner); this
command puts them through the UPM's identity encoder and writes the bundle
(a temp folder renamed at the end): `avatar.safetensors` + `avatar.json` (`fica_jax.avatar.bundle`),
`avatar.ply` (the neutral frame, standard 3DGS layout), `maps.npz` (generated and refined UV
maps) and `preview.png` (portrait | front | side | back).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from fica_jax import __version__
from fica_jax.errors import UserError
from fica_jax.files import atomic_dir, check_writable, write_json
from fica_jax.geometry import template_store
from fica_jax.infer.generate import (
    Exported,
    Timer,
    cut_portrait,
    frame_portrait,
    generate_maps,
    load_models,
    template_key,
)


def generate_avatar(
    image: str | os.PathLike,
    models_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    steps: int = 50,
    cfg_scale: float | None = None,
    seed: int = 0,
    pose: str | os.PathLike | None = None,
    refine: bool = True,
    models: dict[str, Exported] | None = None,
    align: bool = True,
    transfer: bool = True,
    fit: bool = True,
) -> dict:
    """Writes the avatar bundle to `out`; returns its info (with per-stage seconds, and the
    portrait's `crop_box` [x0, y0, x1, y1] in the image's pixels, which may reach past the image
    where the aligned square was padded, and `aligned`). `align=False`: the centred square, for
    images already framed like the training portraits."""
    from fica_jax.avatar.bundle import Avatar
    from fica_jax.avatar.drive import write_preview

    out = check_writable(out)  # before loading the models
    timer = Timer()
    img, framing = frame_portrait(image, align=align)  # a bad image fails before the models load
    timer.lap("align")
    models = models or load_models(models_dir)
    timer.lap("load")
    upm = models["upm"]
    r = int(models["dit"].stats["uv_mask"].shape[0])
    if int(upm.model.cfg.uv_resolution) != r:
        raise UserError(
            f"--models: the DiT makes {r}^2 UV maps, the UPM takes {upm.model.cfg.uv_resolution}^2"
        )
    size = int(models["dense"].cfg.data.image_size)
    portrait = cut_portrait(img, framing, size)
    maps, info = generate_maps(
        portrait, models, steps=steps, cfg_scale=cfg_scale, seed=seed, pose=pose, refine=refine,
        transfer=transfer, fit=fit, timer=timer, where=f"--image {image}", framing=framing,
    )  # fmt: skip
    info |= {
        "crop_box": framing["crop_box"], "aligned": framing["aligned"],
        "source_image": str(pathlib.Path(image).resolve()), "models": str(models_dir),
        "pose": str(pose) if pose else ("regressor" if info["refined"] else None),
        "fica_jax_version": __version__,
        "expression_names": list(upm.meta.get("stats", {}).get("expression_names", [])),
    }  # fmt: skip
    avatar = Avatar.create(upm.model, maps["texture"], maps["geometry"], maps["mask"], info=info)
    timer.lap("upm")
    template = template_store.procedural(key := template_key(models)) or (
        template_store.resolve(key) if "@" in key else None)  # fmt: skip
    with atomic_dir(out) as tmp:
        avatar.save(tmp)
        if template is not None:  # what `fica render --meshes` fits expression codes with
            template_store.save(template, tmp)
        avatar.save_ply(tmp / "avatar.ply")
        np.savez(tmp / "maps.npz", **maps)
        tile = np.asarray(jax.image.resize(jnp.asarray(portrait), (256, 256, 3), "bilinear"))
        tile = (np.clip(tile, 0, 1) * 255).round().astype(np.uint8)
        write_preview(avatar, tmp / "preview.png", [("portrait", tile)])
        timer.lap("bundle")
        info["seconds"] = timer.seconds
        meta = json.loads((tmp / "avatar.json").read_text())
        write_json(tmp / "avatar.json", meta | {"info": info})
    return info


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="portrait -> drivable avatar bundle")
    p.add_argument("--image", required=True, help="the portrait (any PIL-readable image)")
    p.add_argument("--models", required=True, help="folder of exports: dense vae dit upm [refiner]")
    p.add_argument("--out", required=True, help="avatar folder to write")
    p.add_argument("--steps", type=int, default=50, help="Euler steps of the DiT (default 50)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the DiT's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pose", default=None,
        help="JSON with K, viewmat, expression, landmarks (fica_jax.infer.pose)",
    )  # fmt: skip
    p.add_argument("--no-refine", action="store_true", help="skip the refiner even if exported")
    p.add_argument(
        "--no-transfer", action="store_true",
        help="keep the refined texture as is (default: a smooth correction towards the "
        "portrait's de-lit colours where it shows the head, fica_jax/infer/transfer.py)",
    )  # fmt: skip
    p.add_argument(
        "--no-shape-fit", action="store_true",
        help="keep the DiT's geometry as is (default: fitted to the portrait's landmarks when "
        "--pose gives them, fica_jax/geometry/shape_fit.py)",
    )  # fmt: skip
    p.add_argument(
        "--no-align", action="store_true",
        help="take the centred square as is (default: find the face and frame it like training)",
    )  # fmt: skip

    def run_cmd(args, extra) -> int:
        info = generate_avatar(
            args.image, args.models, args.out, steps=args.steps, cfg_scale=args.cfg,
            seed=args.seed, pose=args.pose, refine=not args.no_refine, align=not args.no_align,
            transfer=not args.no_transfer, fit=not args.no_shape_fit,
        )  # fmt: skip
        secs = ", ".join(f"{k} {v:.2f} s" for k, v in info["seconds"].items())
        print(f"avatar -> {args.out} ({secs})")
        return 0

    p.set_defaults(func=run_cmd)
