"""Avatars from a trained UPM, and the renders that show them driven (FiCA Sec. 2.4).

    fica avatar --run RUNS/upm --data DATA --out AVATAR [--split test] [--identity 0]
        runs the UPM's identity encoder once on one capture identity's ground-truth UV maps (on
        the test split: an identity the UPM never saw) and writes the avatar bundle
        (`Avatar.save`: arrays + avatar.json) with `preview.png` (front | side | back, neutral).
    fica render --avatar AVATAR --out FILE.gif|FILE.png [--turntable | --sweep |
                --expressions CODES.npy] [--size 256] [--fps 12]
        --turntable: one orbit at the neutral expression (36 frames);
        --sweep: the front view, every blendshape in turn 0 -> 1 -> 0, then the gaze left, right,
        up and down (a frame label names what moves);
        --expressions: one frame per row of a [T, E] array (the avatar's expression code).
        A .png writes the frames as one contact sheet instead of an animation.

Every file is written to a temp path and renamed; bad input is one `error:` line (exit 2).
Cameras orbit the head at the world origin as the synthetic dome does (0.7 m, 0.36 m across the
image); `orbit_camera` gives the same cameras to tests and other tools.
"""

from __future__ import annotations

import math
import pathlib
import time

import numpy as np

from fica_jax.errors import UserError
from fica_jax.files import atomic_dir, atomic_file, check_writable

TARGET = (0.0, -0.02, 0.01)  # head centre the synthetic cameras look at (data_pipelines/synthetic)
SWEEP_FRAMES = 8  # frames per blendshape ramp 0 -> 1 -> 0
GAZE_DEG = 20.0


def orbit_camera(yaw_deg: float, pitch_deg: float, size: int, distance=0.7, extent=0.36):
    """(viewmat [4, 4], K [3, 3]) of a camera `distance` m from the head at (yaw, pitch),
    looking at its centre, with `extent` m across the `size` px image. yaw 0 is frontal (+z)."""
    from fica_jax.geometry import capture

    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    target = np.asarray(TARGET)
    eye = target + distance * np.array(
        [math.cos(pitch) * math.sin(yaw), math.sin(pitch), math.cos(pitch) * math.cos(yaw)]
    )
    return capture.look_at(eye, target), capture.intrinsics(size * distance / extent, size, size)


# ----------------------------------------------------------------------------- frame programs
def turntable(n: int = 36) -> list[dict]:
    return [{"yaw": 360.0 * i / n, "label": f"yaw {360.0 * i / n:.0f}"} for i in range(n)]


def sweep(expression_names: list[str], e_dim: int) -> list[dict]:
    """Front view; blendshape k ramps 0 -> 1 -> 0 with the others at 0, then the gaze."""
    names = list(expression_names) or [f"e{k}" for k in range(e_dim)]
    ramp = np.sin(np.linspace(0, np.pi, SWEEP_FRAMES + 1)[:-1])  # 0 .. 1 .. ~0
    frames = []
    for k in range(e_dim):
        for w in ramp:
            code = np.zeros(e_dim, np.float32)
            code[k] = w
            frames.append({"expression": code, "label": names[k] if k < len(names) else f"e{k}"})
    g = math.radians(GAZE_DEG)
    for label, direction in (("gaze left", (g, 0)), ("gaze right", (-g, 0)),
                             ("gaze up", (0, g)), ("gaze down", (0, -g))):  # fmt: skip
        for w in ramp:
            frames.append({"gaze": np.asarray(direction, np.float32) * w, "label": label})
    return frames


def render_frame(avatar, viewmat, K, width: int, height: int, **render_kw) -> np.ndarray:
    """One frame of a JAX `Avatar` or a PyTorch `TorchAvatar` (`avatar.render`'s arguments:
    viewmat [4, 4], K [3, 3], expression, gaze, background, backend) -> [H, W, 3] float in
    [0, 1] on the host."""
    img, _, _ = avatar.render(viewmat, K, width, height, **render_kw)
    img = img.cpu().numpy() if hasattr(img, "cpu") else np.asarray(img)
    return np.clip(img, 0.0, 1.0)


def render_frames(
    avatar, frames: list[dict], size: int, progress: bool = True, **render_kw
) -> list[np.ndarray]:
    """Each frame dict (yaw/pitch in degrees, expression [E], gaze [2]) -> [size, size, 3] u8
    over a grey background. `avatar`: a JAX `Avatar` or a PyTorch `TorchAvatar` (its
    `backend="cpu"|"gsplat"` in `render_kw`)."""
    from fica_jax.train.metrics import Progress

    bar, out = Progress(len(frames), 0, progress, "render", log_every=12), []
    for f in frames:
        viewmat, K = orbit_camera(f.get("yaw", 0.0), f.get("pitch", 0.0), size)
        img = render_frame(avatar, viewmat, K, size, size, expression=f.get("expression"),
                           gaze=f.get("gaze"), background=(0.5, 0.5, 0.5), **render_kw)  # fmt: skip
        out.append((img * 255).round().astype(np.uint8))
        bar.update()
    bar.close()
    return out


def write_frames(path: pathlib.Path, frames: list[np.ndarray], labels: list[str], fps: float):
    """GIF (looping, `fps`) or PNG contact sheet of labelled frames, atomically."""
    from PIL import Image

    from fica_jax.preview import write_sheet

    if path.suffix.lower() == ".png":
        cols = min(len(frames), 8)
        rows = [list(zip(labels[i : i + cols], frames[i : i + cols], strict=True))
                for i in range(0, len(frames), cols)]  # fmt: skip
        write_sheet(rows, path, frames[0].shape[0])  # uint8 frames: written as they are
        return
    if path.suffix.lower() == ".mp4":  # H.264 through imageio's ffmpeg plugin
        import imageio.v3 as iio

        with atomic_file(path) as tmp:
            iio.imwrite(tmp, np.stack(frames), fps=fps, codec="libx264", macro_block_size=1)
        return
    ims = [Image.fromarray(f) for f in frames]
    with atomic_file(path) as tmp:
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:],
                    duration=1000 / fps, loop=0)  # fmt: skip


def write_preview(avatar, path: pathlib.Path, lead=(), size: int = 256) -> None:
    """An avatar bundle's `preview.png`: the `lead` tiles ((label, [size, size, 3] u8), e.g.
    the portrait), then the neutral avatar from the front, side and back."""
    views = [{"yaw": y, "label": lab} for y, lab in ((0, "front"), (60, "side"), (180, "back"))]
    imgs = render_frames(avatar, views, size, progress=False)
    labels = [lab for lab, _ in lead] + [v["label"] for v in views]
    write_frames(path, [im for _, im in lead] + imgs, labels, 1)


# ----------------------------------------------------------------------------- commands
def make_avatar(run, data, out, *, split: str = "test", identity: str | None = None) -> dict:
    """`fica avatar`: the trained UPM of `run` on one identity of `data` -> the bundle in `out`."""
    from data_pipelines.contact_sheet import select_record
    from data_pipelines.pipeline import open_source
    from data_pipelines.shards import dataset_template, read_metadata
    from fica_jax.avatar.bundle import Avatar
    from fica_jax.geometry import template_store
    from fica_jax.train.checkpoint import load_model, load_run_config

    out = check_writable(out)
    cfg = load_run_config(run)
    if cfg.get("stage") != "upm":
        raise UserError(f"{run}/config.json: stage {cfg.get('stage')!r}, expected a `upm` run")
    rec = select_record(open_source(data, split), identity)
    r = int(cfg.data.uv_resolution)
    if rec["uv_texture"].shape[:2] != (r, r):
        raise UserError(
            f"{data}: UV maps are {rec['uv_texture'].shape[0]}^2, the UPM of {run} takes {r}^2"
        )
    step, model = load_model(cfg, run)
    names = read_metadata(data).get("template", {}).get("expression_names", [])
    info = {"identity": str(rec["identity"]), "split": split, "data": str(data), "run": str(run),
            "step": int(step), "expression_names": list(names)}  # fmt: skip
    av = Avatar.create(
        model, rec["uv_texture"] / 255.0, rec["uv_geometry"], rec["uv_mask"], info=info
    )
    template = dataset_template(data)
    with atomic_dir(out) as tmp:
        av.save(tmp)
        if template is not None:  # what `fica render --meshes` fits expression codes with
            template_store.save(template, tmp)
        write_preview(av, tmp / "preview.png")
    return info


def load_for_backend(avatar_dir, backend: str = "jax", device: str = "auto"):
    """(avatar, render kwargs): the JAX `Avatar`, or the PyTorch runtime's `TorchAvatar`
    rendering with gsplat on CUDA (`device` cuda, or auto with CUDA present) else its CPU path."""
    if backend == "jax":
        from fica_jax.avatar.bundle import Avatar

        return Avatar.load(avatar_dir), {}
    if backend != "torch":
        raise UserError(f"--backend {backend!r}: expected 'jax' or 'torch'")
    import torch

    from fica_jax.export.torch_runtime import TorchAvatar

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")
    use = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    av = TorchAvatar.load(avatar_dir, device=use)
    return av, {"backend": "gsplat" if use == "cuda" else "cpu"}


def mesh_frames(avatar_dir, folder, neutral=None, unit: float = 1e-3, r: int = 64) -> list[dict]:
    """Frames driven by a tracked mesh sequence in the avatar's template topology: each mesh's
    delta from `neutral` (a mesh file; default the sequence's first) as codes on the template's
    expression basis (`expression_pca.mesh_codes`). `unit`: metres per file unit (mm: 1e-3)."""
    from data_pipelines.formats.meshes import read_sequence, read_vertices
    from fica_jax.geometry import expression_pca, template_store

    path = pathlib.Path(avatar_dir) / template_store.TEMPLATE_FILE
    if not path.is_file():
        raise UserError(f"--avatar {avatar_dir}: no {path.name} (avatars from `fica avatar` or "
                        "`fica generate` on data with a stored template carry one)")  # fmt: skip
    template = template_store.load(path)
    names, meshes = read_sequence(pathlib.Path(folder))
    base = read_vertices(pathlib.Path(neutral)) if neutral else meshes[0]
    n_pos = int(template.weld.max()) + 1
    if meshes.shape[1] != n_pos or base.shape != (n_pos, 3):
        raise UserError(f"--meshes {folder}: {meshes.shape[1]} vertices (neutral {len(base)}), "
                        f"the avatar's template {template.name!r} has {n_pos}")  # fmt: skip
    codes = expression_pca.mesh_codes(template, meshes * unit, base * unit, r)
    return [{"expression": c, "label": n} for c, n in zip(codes, names, strict=True)]


def render_avatar(
    avatar_dir, out, *, mode: str, codes=None, size=256, fps=12.0, backend="jax", device="auto",
    neutral=None, mesh_unit: float = 1e-3,
) -> dict:  # fmt: skip
    out = pathlib.Path(out)
    if out.suffix.lower() not in (".gif", ".png", ".mp4"):
        raise UserError(f"--out {out}: expected a .gif, .mp4 or .png file")
    check_writable(out)  # before the slow part
    av, render_kw = load_for_backend(avatar_dir, backend, device)
    e_dim = int(av.cfg["expression_dim"] if isinstance(av.cfg, dict) else av.cfg.expression_dim)
    if mode == "turntable":
        frames = turntable()
    elif mode == "sweep":
        frames = sweep(av.info.get("expression_names", []), e_dim)
    elif mode == "meshes":
        r = int(av.cfg["uv_resolution"] if isinstance(av.cfg, dict) else av.cfg.uv_resolution)
        frames = mesh_frames(avatar_dir, codes, neutral, mesh_unit, r)
        if len(frames[0]["expression"]) != e_dim:
            raise UserError(f"--meshes: the template's basis has {len(frames[0]['expression'])} "
                            f"codes, the avatar's UPM takes {e_dim}")  # fmt: skip
    elif mode == "arkit":
        from fica_jax.avatar.arkit import read_arkit_csv

        names = list(av.info.get("expression_names", []))
        if len(names) != e_dim:
            raise UserError(
                f"--avatar {avatar_dir}: avatar.json names {len(names)} expressions for a "
                f"{e_dim}-dim code; --arkit needs the template's expression names"
            )
        arr, gaze = read_arkit_csv(codes, names)
        frames = [{"expression": c, "gaze": g, "label": f"frame {i}"}
                  for i, (c, g) in enumerate(zip(arr, gaze, strict=True))]  # fmt: skip
    else:
        try:
            arr = np.load(codes)
        except (OSError, ValueError) as e:
            raise UserError(f"--expressions {codes}: not a readable .npy array ({e})") from None
        if arr.ndim != 2 or arr.shape[1] != e_dim:
            raise UserError(f"--expressions {codes}: shape {arr.shape}, expected [T, {e_dim}]")
        frames = [{"expression": c.astype(np.float32), "label": f"frame {i}"}
                  for i, c in enumerate(arr)]  # fmt: skip
    t0 = time.perf_counter()
    imgs = render_frames(av, frames, size, **render_kw)
    dt = time.perf_counter() - t0
    write_frames(out, imgs, [f["label"] for f in frames], fps)
    return {"out": str(out), "frames": len(imgs), "size": size, "seconds": round(dt, 2),
            "backend": backend}  # fmt: skip
