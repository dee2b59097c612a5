"""`fica data convert --format ava256|multiface`: a published multi-view capture -> capture shards.

The readers (`data_pipelines/formats/`) give each identity's cameras, tracked meshes, head poses,
images and UV textures in our conventions (metres, OpenCV cameras, pixel centres at +0.5, UV v
down). This module turns them into schema records (SCHEMA.md) on the dataset's own topology:

- the template is the dataset's topology OBJ with UVs (`--topology`; landmarks optional);
- the **neutral** frame (Ava-256: `EXP_neutral_peak`) gives the identity's UV geometry (its
  tracked mesh rasterised into the atlas), normals and UV texture;
- view 0, the portrait, is the neutral frame seen by the most frontal camera (the one looking
  most directly along the head's -z, i.e. at its face; `portrait_camera` overrides); views 1..
  are `n_frames` (frame, camera) pairs spread over the capture;
- every image is cropped to a square around the projected head (its extent is `head_fill` of
  the side, as the synthetic portraits frame their heads) and resized, K adjusted; the mask and
  the dense maps (per-pixel UV, posed vertex, normal, depth) are the tracked mesh rendered into
  that crop, the posed UV geometry its UV position map; landmarks are projected template
  landmark vertices, visible where the depth test passes;
- expression codes are PCA coefficients (`fica_jax.geometry.expression_pca`) fitted to the
  training identities' frames, stored as the template's expression basis; gaze is absent
  (`metadata.json` `gaze_available: false`, zeros in `view_gaze`).

Each identity is converted into `OUT.parts/IDENTITY.npz` (atomically; a rerun skips the ones
already there, so a killed conversion resumes), hosts split the identities by
`process_index/process_count`; once every identity's part exists the basis is fitted and the
dataset written through `DatasetWriter` (atomic), and the parts are removed.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

from data_pipelines import schema
from data_pipelines.convert import read_split
from data_pipelines.crops import crop_box, crop_image, crop_intrinsics
from data_pipelines.shards import DEFAULT_RECORDS_PER_SHARD, DatasetWriter
from fica_jax.errors import UserError
from fica_jax.files import atomic_file, ensure_dir
from fica_jax.geometry import capture, expression_pca
from fica_jax.geometry.template import HeadTemplate
from fica_jax.geometry.unwrap import unwrap_partial
from fica_jax.geometry.uvmaps import normal_map, position_map, uv_raster, vertex_normals


@dataclasses.dataclass(frozen=True)
class MultiviewOptions:
    uv_resolution: int = 64
    image_size: int = 64
    n_frames: int = 4  # dome views per identity
    expression_dims: int = 16  # PCA components kept
    pca_frames: int = 48  # frames per identity the basis is fitted on (evenly spaced)
    head_fill: float = 0.8  # projected head extent / crop side
    portrait_camera: str = ""  # default: the most frontal camera
    seed: int = 0


# ----------------------------------------------------------------------------- finding captures
def open_capture(fmt: str, path: Path):
    from data_pipelines.formats import ava256, multiface

    opener = {"ava256": ava256.open_ava256, "multiface": multiface.open_multiface}[fmt]
    return opener(path)


def find_captures(fmt: str, src: Path) -> dict[str, Path]:
    """identity -> capture folder: SRC itself when it is one capture, else its sub-folders that
    are (Ava-256: holding `decoder/`; Multiface: holding a KRT file)."""
    if fmt not in ("ava256", "multiface"):
        raise UserError(f"--format {fmt!r}: expected folder, ava256 or multiface")
    if not src.is_dir():
        raise UserError(f"--src {src}: capture folder does not exist")
    is_one = (lambda d: (d / "decoder").is_dir()) if fmt == "ava256" else (
        lambda d: (d / "KRT").is_file())  # fmt: skip
    if is_one(src):
        return {src.name: src}
    found = {d.name: d for d in sorted(src.iterdir()) if d.is_dir() and is_one(d)}
    if not found:
        want = "<capture>/decoder/" if fmt == "ava256" else "<subject>/KRT"
        raise UserError(f"--src {src}: no {fmt} captures found (expected {want})")
    return found


# ----------------------------------------------------------------------------- one view
def render_view(template: HeadTemplate, verts: np.ndarray, cam: capture.Camera) -> dict:
    """The tracked mesh's dense maps in one view (mask, uv, vtx, nrm, depth) and its landmarks."""
    v = jnp.asarray(verts, jnp.float32)
    n = vertex_normals(v, template.faces, template.weld)
    out = capture.render_capture(v, template.faces, jnp.asarray(template.uvs),
                                 jnp.zeros((4, 4, 3)), cam, capture.Light(np.array([0, 0, 1.0])),
                                 jnp.zeros(3), normals=n)  # fmt: skip
    m = np.asarray(out["mask"])
    maps = {k: np.asarray(out[k], np.float32) * (m[..., None] if out[k].ndim == 3 else m)
            for k in ("uv", "vtx", "nrm", "depth")}  # fmt: skip
    lm = jnp.asarray(verts[template.landmark_ids], jnp.float32)
    maps["kpts"] = np.asarray(capture.project_points(lm, cam), np.float32).reshape(-1, 2)
    maps["kpts_visible"] = np.asarray(capture.points_visible(lm, cam, out["depth"]), np.uint8)
    return maps | {"mask": m.astype(np.uint8)}


def frontal_camera(raw, frame: str) -> str:
    """The camera whose optical axis points most directly at the face (head -z in its frame)."""
    h2w = np.asarray(raw.head_to_world(frame))
    best, score = "", -np.inf
    for name, c in sorted(raw.cameras.items()):
        head_to_cam = np.asarray(c.world_to_cam) @ h2w
        s = -head_to_cam[2, 2]  # camera z axis . head +z: -1 when it looks at the face
        if s > score:
            best, score = name, s
    return best


def view_plan(raw, portrait: str, neutral: str, opts: MultiviewOptions, identity: str):
    """[(camera, frame)] of views 0..n_frames: the portrait, then frames spread over the capture,
    each on the next camera of a per-identity permutation that has an image of it."""
    if not raw.has_image(portrait, neutral):
        raise UserError(f"{identity}: camera {portrait} has no image of the neutral frame "
                        f"{neutral} (pass --portrait-camera)")  # fmt: skip
    rng = np.random.default_rng([opts.seed, zlib.crc32(identity.encode())])
    others = [c for c in sorted(raw.cameras) if c != portrait] or [portrait]
    cams = [str(c) for c in rng.permutation(others)]
    frames = list(raw.frames)
    plan, k = [(portrait, neutral)], 0
    for i in range(opts.n_frames):
        f = frames[int((i + 1) * len(frames) / (opts.n_frames + 1)) % len(frames)]
        have = [c for c in cams[k:] + cams[:k] if raw.has_image(c, f)]
        if not have:
            raise UserError(f"{identity}: frame {f} has an image in none of its cameras")
        plan.append((have[0], f))
        k = (cams.index(have[0]) + 1) % len(cams)
    return plan


def load_topology(fmt: str, src: Path, topology: str | None, landmarks: str | None):
    """The dataset's template: `topology` (an OBJ with UVs), else the topology the first capture
    ships (Multiface: its tracked-mesh OBJ)."""
    from fica_jax.geometry.obj import load_obj_template

    if not topology:
        first = next(iter(find_captures(fmt, src).values()))
        raw = open_capture(fmt, first)
        try:
            found = raw.topology_obj()
        finally:
            raw.close()
        if found is None:
            raise UserError(f"--format {fmt}: {first} ships no topology OBJ; pass --topology OBJ "
                            "(the tracked meshes' topology with UVs)")  # fmt: skip
        topology = str(found)
    return load_obj_template(topology, landmarks, name=f"{fmt}-{Path(topology).stem}")


# ----------------------------------------------------------------------------- one identity
def _mesh(raw, template: HeadTemplate, frame: str, where: str) -> np.ndarray:
    v = np.asarray(raw.vertices(frame), np.float64)
    n_pos = int(template.weld.max()) + 1
    if v.ndim != 2 or v.shape != (n_pos, 3):
        raise UserError(f"{where} frame {frame}: tracked mesh has {list(v.shape)} vertices, the "
                        f"topology {template.name!r} has [{n_pos}, 3]")  # fmt: skip
    return v[template.weld]


def convert_identity(raw, template: HeadTemplate, opts: MultiviewOptions, identity: str,
                     split: str, where: str) -> dict[str, np.ndarray]:  # fmt: skip
    """One identity -> {record fields (view_expression empty: filled once the basis is fitted),
    "pca_uv" [T, R, R, 3], "pca_vertices" [T, V, 3]: deltas from neutral for the basis}."""
    r, s = opts.uv_resolution, opts.image_size
    uvr = uv_raster(template.uvs, template.faces, r)
    uv_map = lambda v: np.asarray(position_map(uvr, jnp.asarray(v, jnp.float32)), np.float32)
    neutral = raw.neutral_frame()
    vn = _mesh(raw, template, neutral, where)
    geom, uv_mask = uv_map(vn), uvr.mask.astype(np.uint8)
    tex = np.asarray(Image.fromarray(raw.uv_texture(neutral)).resize((r, r), Image.Resampling.BOX))
    portrait = opts.portrait_camera or frontal_camera(raw, neutral)
    if portrait not in raw.cameras:
        raise UserError(f"--portrait-camera {portrait!r}: {where} has cameras "
                        f"{sorted(raw.cameras)[:8]}...")  # fmt: skip
    views = {k: [] for k in ("image", "mask", "uv", "vtx", "nrm", "depth", "kpts", "kpts_visible",
                             "K", "viewmat", "uv_geometry")}  # fmt: skip
    for cam_name, frame in view_plan(raw, portrait, neutral, opts, identity):
        c = raw.cameras[cam_name]
        verts = vn if frame == neutral else _mesh(raw, template, frame, where)
        viewmat = np.asarray(c.world_to_cam) @ np.asarray(raw.head_to_world(frame))
        full = capture.Camera(np.asarray(c.K, np.float32), viewmat.astype(np.float32), c.width,
                              c.height)  # fmt: skip
        box = crop_box(np.asarray(capture.project_points(jnp.asarray(verts, jnp.float32), full)),
                       opts.head_fill)  # fmt: skip
        cam = capture.Camera(crop_intrinsics(full.K, box, s), full.viewmat, s, s)
        maps = render_view(template, verts, cam)
        views["image"].append(crop_image(raw.image(cam_name, frame), box, s))
        views["K"].append(cam.K)
        views["viewmat"].append(cam.viewmat)
        views["uv_geometry"].append(uv_map(verts))
        for k in ("mask", "uv", "vtx", "nrm", "depth", "kpts", "kpts_visible"):
            views[k].append(maps[k])
    v = {k: np.stack(x) for k, x in views.items()}
    partial = unwrap_partial(v["image"][0] / 255.0, v["mask"][0], v["uv"][0], v["nrm"][0],
                             v["vtx"][0], resolution=r)  # fmt: skip
    n_views = len(v["image"])
    rec = {
        "schema_version": np.int32(schema.SCHEMA_VERSION), "identity": np.str_(identity),
        "split": np.str_(split), "id_coeffs": np.zeros((0,), np.float32), "uv_texture": tex,
        "uv_geometry": geom, "uv_normal": np.asarray(normal_map(uvr, jnp.asarray(vn, jnp.float32),
                                                                template.weld), np.float16),
        "uv_mask": uv_mask, "partial_uv": np.asarray(partial, np.float16),
        "view_image": v["image"], "view_mask": v["mask"], "view_uv": v["uv"].astype(np.float16),
        "view_vtx": v["vtx"].astype(np.float16), "view_nrm": v["nrm"].astype(np.float16),
        "view_depth": v["depth"].astype(np.float16), "view_kpts": v["kpts"],
        "view_kpts_visible": v["kpts_visible"], "view_K": v["K"], "view_viewmat": v["viewmat"],
        "view_expression": np.zeros((n_views, 0), np.float32),
        "view_gaze": np.zeros((n_views, 2), np.float32),
        "view_uv_geometry": v["uv_geometry"].astype(np.float16),
    }  # fmt: skip
    frames = list(raw.frames)
    pick = sorted({frames[int(i)] for i in np.linspace(0, len(frames) - 1, opts.pca_frames)})
    meshes = [_mesh(raw, template, f, where) for f in pick]
    rec["pca_uv"] = np.stack([uv_map(m) - geom for m in meshes]).astype(np.float16)
    rec["pca_vertices"] = np.stack([m - vn for m in meshes]).astype(np.float32)
    rec["pca_neutral"] = vn.astype(np.float32)
    return rec


# ----------------------------------------------------------------------------- the dataset
def _part_path(parts: Path, identity: str) -> Path:
    return parts / f"{identity}.npz"


def _save_part(path: Path, rec: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **rec)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _load_part(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable conversion part ({e}); delete it to redo it") from None


def _progress(items: list, enabled: bool):
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(items, desc="convert identities", unit="id")
    return items


def convert_multiview(
    fmt: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    template: HeadTemplate,
    opts: MultiviewOptions = MultiviewOptions(),
    *,
    overwrite: bool = False,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    process_index: int = 0,
    process_count: int = 1,
    progress: bool = True,
) -> dict:
    """Converts this host's identities into parts, then (once all parts exist) fits the
    expression basis and writes the dataset. Returns a summary (`written`: False while other
    hosts' parts are missing)."""
    src, out = Path(src), Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out}: output directory exists and is not empty; pass --overwrite")
    captures = find_captures(fmt, src)
    splits = read_split(src, list(captures))
    parts = ensure_dir(out.with_name(out.name + ".parts"))
    ids = list(captures)
    mine = [i for k, i in enumerate(ids) if k % process_count == process_index]
    todo = [i for i in mine if not _part_path(parts, i).is_file()]
    for k, identity in enumerate(_progress(todo, progress)):
        if progress and not sys.stderr.isatty():
            print(f"convert {fmt}: identity {k + 1}/{len(todo)} {identity}", file=sys.stderr)
        raw = open_capture(fmt, captures[identity])
        try:
            rec = convert_identity(raw, template, opts, identity, splits[identity],
                                   str(captures[identity]))  # fmt: skip
        finally:
            raw.close()
        _save_part(_part_path(parts, identity), rec)
    missing = [i for i in ids if not _part_path(parts, i).is_file()]
    summary = {"identities": len(ids), "converted_here": len(todo), "missing": missing}
    if missing:
        return summary | {"written": False}
    summary |= _write_dataset(fmt, src, out, template, opts, parts, ids, overwrite,
                              records_per_shard)  # fmt: skip
    return summary | {"written": True}


def _write_dataset(fmt, src, out, template, opts, parts, ids, overwrite, records_per_shard):
    recs = {i: _load_part(_part_path(parts, i)) for i in ids}
    train = [r for r in recs.values() if str(r["split"]) == "train"]
    if not train:
        raise UserError(f"--src {src}: every identity is held out; the expression basis needs "
                        "training identities")  # fmt: skip
    mask = train[0]["uv_mask"]
    basis = expression_pca.fit_basis(
        np.concatenate([r["pca_uv"] for r in train]).astype(np.float32),
        np.concatenate([r["pca_vertices"] for r in train]),
        mask,
        opts.expression_dims,
    )
    test = [r["pca_uv"].astype(np.float32) for r in recs.values() if str(r["split"]) == "test"]
    fit = {"dims": basis.dims, "explained": basis.explained.tolist(),
           "train_frames": int(sum(len(r["pca_uv"]) for r in train)),
           "heldout": expression_pca.reconstruction_rmse(np.concatenate(test), basis.uv, mask)
           if test else None}  # fmt: skip
    names = tuple(f"pca{k:02d}" for k in range(basis.dims))
    # the template's rest shape: the training identities' mean neutral mesh, in metres (the
    # topology OBJ's own positions may be in another unit or frame)
    rest = np.mean([r["pca_neutral"] for r in train], 0).astype(np.float32)
    eyes = np.stack([rest[m].mean(0) if m.any() else np.zeros(3) for m in template.eye_masks])
    head = dataclasses.replace(template, verts=rest, eye_centres=eyes.astype(np.float32),
                               expr_basis=basis.vertices, expr_names=names)  # fmt: skip
    gen = {"name": f"fica data convert --format {fmt}", "src": str(src.resolve()),
           "identities": len(ids), "options": dataclasses.asdict(opts)}  # fmt: skip
    info = {"expression_basis": fit, "gaze_available": False}
    with DatasetWriter(out, overwrite=overwrite, records_per_shard=records_per_shard,
                       generator=gen, head=head, info=info) as w:  # fmt: skip
        for i in ids:
            rec = {k: v for k, v in recs[i].items() if not k.startswith("pca_")}
            deltas = rec["view_uv_geometry"].astype(np.float32) - rec["uv_geometry"]
            rec["view_expression"] = expression_pca.project(deltas, basis.uv, rec["uv_mask"])
            schema.validate(rec, where=str(_part_path(parts, i)))
            w.add(rec, where=str(_part_path(parts, i)))
    for i in ids:
        _part_path(parts, i).unlink()
    parts.rmdir()
    return {"expression_basis": fit}
