"""Tiny captures in the Ava-256 and Multiface layouts, written with the real file formats, plus
their ground truth in our conventions (`data_pipelines/formats/common.py`).

Both fixtures show one UV-mapped ellipsoid patch (a stand-in head, head-local millimetres: x right,
y up, z out of the face) over a few frames with a known jaw-like deformation and head pose, seen by
cameras on an arc 1 m away. Images are smooth per-camera gradients with a magenta disc centred on
the projection of the head origin (so a test can check a projection against the pixels); UV
textures have a blue top row and a red bottom row (v_obj = 1 and 0). Layout details and the
upstream files they follow are in `data_pipelines/formats/ava256.py` and `multiface.py`.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipelines.formats.ply import write_ply_vertices

AVA_SENSOR = (2668, 4096)  # W, H of the Ava-256 calibration (portrait)
MULTIFACE_NATIVE = (1334, 2048)  # W, H of released Multiface images
MARKER = (255, 0, 255)
TEX_TOP, TEX_BOTTOM = (0, 0, 255), (255, 0, 0)


def head_mesh(n_u: int = 12, n_v: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ellipsoid patch: positions [N, 3] mm, OBJ UVs [N, 2] (v up), triangles [F, 3]."""
    u, v = np.meshgrid(np.linspace(0, 1, n_u), np.linspace(0, 1, n_v))  # [n_v, n_u]
    az, el = (u - 0.5) * np.radians(140), (v - 0.5) * np.radians(100)
    pos = np.stack([80 * np.sin(az) * np.cos(el), 110 * np.sin(el), 95 * np.cos(az) * np.cos(el)])
    a = (np.arange(n_v - 1)[:, None] * n_u + np.arange(n_u - 1)[None]).reshape(-1)
    faces = np.concatenate(
        [np.stack([a, a + 1, a + n_u + 1], 1), np.stack([a, a + n_u + 1, a + n_u], 1)]
    )
    return pos.reshape(3, -1).T, np.stack([u, v], -1).reshape(-1, 2), faces


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return ry @ rx


def _scene(n_frames: int, n_cams: int, seed: int):
    """Head-local vertices and head->world poses per frame, world->camera per camera (all mm)."""
    rng = np.random.default_rng(seed)
    base, vt, faces = head_mesh()
    verts, poses = [], []
    for k in range(n_frames):
        v = base.copy()
        v[:, 2] += 3.0 * k * np.clip(-base[:, 1] / 110, 0, None)  # jaw opens with k
        verts.append(v + rng.normal(scale=0.5, size=v.shape))
        pose = np.eye(4)
        pose[:3, :3] = _rotation(np.radians(4 * k - 5), np.radians(2 * (-1) ** k))
        pose[:3, 3] = [10 + 3 * k, -20 + k, 30 - 2 * k]
        poses.append(pose)
    target = np.array([10.0, -20.0, 30.0])
    w2c = []
    for i, yaw in enumerate(np.radians(np.linspace(-35, 35, n_cams))):
        el = np.radians(5 + 2 * i)
        eye = target + 1000 * np.array(
            [np.sin(yaw) * np.cos(el), np.sin(el), np.cos(yaw) * np.cos(el)]
        )
        fwd = (target - eye) / np.linalg.norm(target - eye)
        right = np.cross(fwd, [0, 1, 0])
        right /= np.linalg.norm(right)
        r = np.stack([right, np.cross(fwd, right), fwd])  # OpenCV rows: x right, y down, z fwd
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = r, -r @ eye
        w2c.append(m)
    return base, vt, faces, verts, poses, w2c


def _k(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])


def _render(k: np.ndarray, w2c: np.ndarray, pose: np.ndarray, size, ci: int, fi: int) -> np.ndarray:
    """Gradient + magenta disc (radius 3 px) at the head origin's projection (centres at +0.5)."""
    w, h = size
    xs, ys = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    img = np.stack([40 + 120 * xs / w, 60 + 30 * ci + 0 * xs, 50 + 100 * ys / h + 10 * fi], -1)
    p = k @ (w2c @ pose[:, 3])[:3]
    disc = (xs - p[0] / p[2]) ** 2 + (ys - p[1] / p[2]) ** 2 <= 9
    img[disc] = MARKER
    return np.clip(img, 0, 255).astype(np.uint8)


def _texture(fi: int, t: int = 16) -> np.ndarray:
    tex = np.zeros((t, t, 3))
    tex[..., 0] = np.linspace(60, 180, t)[None]
    tex[..., 1] = np.linspace(60, 180, t)[:, None]
    tex[..., 2] = 90 + 20 * fi
    tex[0], tex[-1] = TEX_TOP, TEX_BOTTOM
    return tex.astype(np.uint8)


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": 95, "subsampling": "4:4:4"} if fmt == "AVIF" else {}
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _obj_text(pos: np.ndarray, vt: np.ndarray, faces: np.ndarray) -> str:
    lines = [f"v {x:.9g} {y:.9g} {z:.9g}" for x, y, z in pos]
    lines += [f"vt {u:.9g} {v:.9g}" for u, v in vt]
    lines += ["f " + " ".join(f"{i + 1}/{i + 1}" for i in f) for f in faces]
    return "\n".join(lines) + "\n"


def _truth(identity, path, frames, segment, neutral, verts, poses, vt, faces, topo) -> dict:
    metres = [p.copy() for p in poses]
    for m in metres:
        m[:3, 3] *= 1e-3
    return {
        "identity": identity,
        "path": path,
        "frames": frames,
        "segment": segment,
        "neutral": neutral,
        "vertices": {f: v * 1e-3 for f, v in zip(frames, verts, strict=True)},
        "head_to_world": dict(zip(frames, metres, strict=True)),
        "cameras": {},
        "images": {},
        "textures": {},
        "vt": vt,
        "faces": faces,
        "topology_obj": topo,
    }


def _camera_truth(name, k, w2c_mm, size) -> dict:
    m = w2c_mm.copy()
    m[:3, 3] *= 1e-3
    return {"name": name, "K": k, "world_to_cam": m, "width": size[0], "height": size[1]}


def write_ava256_fixture(
    root: str | Path, *, n_frames: int = 4, n_cams: int = 3, image_size=(42, 64), seed: int = 0
) -> dict:
    """Writes `<root>/20230405--1635--AAN112/decoder/...` (+ `<root>/face_topology.obj`).

    Frames: the first half in EXP_jaw_open, the rest in EXP_neutral_peak listed in descending id
    order (so the neutral frame, the lowest id, is not the segment's first row). image_size is the
    stored (W, H); calibration is written for the 2668 x 4096 sensor."""
    root = Path(root)
    identity = "20230405--1635--AAN112"
    dec = root / identity / "decoder"
    for sub in ("image", "head_pose", "kinematic_tracking", "uv_image"):
        (dec / sub).mkdir(parents=True, exist_ok=True)
    base, vt, faces, verts, poses, w2c = _scene(n_frames, n_cams, seed)
    half = n_frames // 2
    frames = [str(1010 + 3 * k) for k in range(half)]
    frames += [str(1021 + 3 * k) for k in range(n_frames - half)][::-1]
    segment = {f: "EXP_jaw_open" if i < half else "EXP_neutral_peak" for i, f in enumerate(frames)}
    neutral = min((f for f in frames if segment[f] == "EXP_neutral_peak"), key=int)
    topo = root / "face_topology.obj"
    topo.write_text(_obj_text(base, vt, faces))
    truth = _truth(identity, dec.parent, frames, segment, neutral, verts, poses, vt, faces, topo)

    rows = "".join(f"{segment[f]},{f}\n" for f in frames)
    (dec / "frame_list.csv").write_text("seg_id,frame_id\n" + rows)
    krt, scale = [], np.diag([image_size[0] / AVA_SENSOR[0], image_size[1] / AVA_SENSOR[1], 1])
    for i, m in enumerate(w2c):
        cam = str(400010 + 7 * i)
        k_sensor = _k(6800 + 37 * i, 6807 + 37 * i, 1355.3 + 5 * i, 2030.3 - 3 * i)
        krt.append(
            {"cameraId": cam, "K": k_sensor.T.tolist(), "T": m.T.tolist(), "distortion": [0.0] * 4}
        )
        truth["cameras"][cam] = _camera_truth(cam, scale @ k_sensor, m, image_size)
        with zipfile.ZipFile(dec / "image" / f"cam{cam}.zip", "w") as z:
            for fi, f in enumerate(frames):
                img = _render(scale @ k_sensor, m, poses[fi], image_size, i, fi)
                truth["images"][cam, f] = img
                z.writestr(f"cam{cam}/{int(f):06d}.avif", _encode(img, "AVIF"))
    (dec / "camera_calibration.json").write_text(json.dumps({"KRT": krt}))
    with (
        zipfile.ZipFile(dec / "head_pose" / "head_pose.zip", "w") as zp,
        zipfile.ZipFile(dec / "kinematic_tracking" / "registration_vertices.zip", "w") as zv,
        zipfile.ZipFile(dec / "uv_image" / "color.zip", "w") as zc,
    ):
        for fi, f in enumerate(frames):
            rows3 = "\n".join(" ".join(f"{x:.9g}" for x in r) for r in poses[fi][:3])
            zp.writestr(f"{int(f):06d}.txt", rows3 + "\n")
            zv.writestr(f"{int(f):06d}.ply", write_ply_vertices(verts[fi]))
            truth["textures"][f] = _texture(fi)
            zc.writestr(f"color/{int(f):06d}.avif", _encode(truth["textures"][f], "AVIF"))
    return truth


def write_multiface_fixture(
    root: str | Path, *, n_frames: int = 4, n_cams: int = 3, image_size=(42, 64), seed: int = 0
) -> dict:
    """Writes `<root>/m--20180227--0000--6795937--GHS/...` in the Multiface layout.

    Frames: the first half in E002_Swallow, the rest in E001_Neutral_Eyes_Open in descending
    order. KRT holds K at the stored image_size (W, H), like the released 1334 x 2048 images."""
    identity = "m--20180227--0000--6795937--GHS"
    sub = Path(root) / identity
    sub.mkdir(parents=True, exist_ok=True)
    base, vt, faces, verts, poses, w2c = _scene(n_frames, n_cams, seed)
    half = n_frames // 2
    frames = [f"{210 + 3 * k:06d}" for k in range(half)]
    frames += [f"{102 + 3 * k:06d}" for k in range(n_frames - half)][::-1]
    segment = {
        f: "E002_Swallow" if i < half else "E001_Neutral_Eyes_Open" for i, f in enumerate(frames)
    }
    neutral = min((f for f in frames if segment[f] == "E001_Neutral_Eyes_Open"), key=int)
    topo = sub / "tracked_mesh" / segment[neutral] / f"{neutral}.obj"
    truth = _truth(identity, sub, frames, segment, neutral, verts, poses, vt, faces, topo)
    (sub / "frame_list.txt").write_text("".join(f"{segment[f]} {f}\n" for f in frames))

    scale = np.diag([image_size[0] / MULTIFACE_NATIVE[0], image_size[1] / MULTIFACE_NATIVE[1], 1])
    blocks = []
    for i, m in enumerate(w2c):
        cam = f"4000{2 * i + 2:02d}"
        k = scale @ _k(3400 + 29 * i, 3402 + 29 * i, 677.3 + 4 * i, 1015.1 - 2 * i)
        truth["cameras"][cam] = _camera_truth(cam, k, m, image_size)
        rows = [" ".join(f"{x:.9g}" for x in r) for r in (*k, np.zeros(5), *m[:3])]
        blocks.append("\n".join([cam, *rows]) + "\n\n")
        for fi, f in enumerate(frames):
            img = _render(k, m, poses[fi], image_size, i, fi)
            truth["images"][cam, f] = img
            path = sub / "images" / segment[f] / cam / f"{f}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_encode(img, "PNG"))
    (sub / "KRT").write_text("".join(blocks))
    for fi, f in enumerate(frames):
        mesh = sub / "tracked_mesh" / segment[f]
        mesh.mkdir(parents=True, exist_ok=True)
        verts[fi].astype("<f4").tofile(mesh / f"{f}.bin")
        (mesh / f"{f}.obj").write_text(_obj_text(verts[fi], vt, faces))
        rows3 = "\n".join(" ".join(f"{x:.9g}" for x in r) for r in poses[fi][:3])
        (mesh / f"{f}_transform.txt").write_text(rows3 + "\n")
        truth["textures"][f] = _texture(fi)
        uv = sub / "unwrapped_uv_1024" / segment[f] / "average" / f"{f}.png"
        uv.parent.mkdir(parents=True, exist_ok=True)
        uv.write_bytes(_encode(truth["textures"][f], "PNG"))
    return truth
