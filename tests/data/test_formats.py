"""Raw capture readers (data_pipelines/formats) against the fixtures of capture_fixtures.py.

The projection tests recompute pixels from the raw numbers as the files store them (Ava-256: K and
T transposed in JSON, calibrated at the 2668 x 4096 sensor; Multiface: KRT text rows) with scalar
formulas, independent of the readers' matrix code, and check them against the readers' K, the
world_to_cam and head_to_world, and against the marker painted in the stored images.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from capture_fixtures import (
    MARKER,
    TEX_BOTTOM,
    TEX_TOP,
    write_ava256_fixture,
    write_multiface_fixture,
)

from data_pipelines.formats import (
    open_ava256,
    open_multiface,
    read_ply_vertices,
    write_ply_vertices,
)
from fica_jax.errors import UserError
from fica_jax.geometry.obj import load_obj_template

OPEN = {"ava256": open_ava256, "multiface": open_multiface}
WRITE = {"ava256": write_ava256_fixture, "multiface": write_multiface_fixture}


@pytest.fixture(scope="module", params=["ava256", "multiface"])
def capture(request, tmp_path_factory):
    truth = WRITE[request.param](tmp_path_factory.mktemp(request.param))
    cap = OPEN[request.param](truth["path"])
    yield request.param, cap, truth
    cap.close()


def _raises(fn, *needles: str) -> str:
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _rewrite(path: Path, edit) -> None:
    """Rewrites a zip through edit(name, data) -> (name, data) or None (drop the member)."""
    with zipfile.ZipFile(path) as z:
        items = [(n, z.read(n)) for n in z.namelist()]
    with zipfile.ZipFile(path, "w") as z:
        for item in items:
            out = edit(*item)
            if out is not None:
                z.writestr(*out)


def _floats(text: str) -> list[list[float]]:
    return [[float(t) for t in line.split()] for line in text.splitlines() if line.strip()]


def _raw_ava(truth, cam: str, frame: str):
    """(K as fx, fy, cx, cy, skew; world->cam rows; head pose rows; vertex 0) from the files."""
    dec = truth["path"] / "decoder"
    item = next(
        c
        for c in json.loads((dec / "camera_calibration.json").read_text())["KRT"]
        if c["cameraId"] == cam
    )
    kj, tj = item["K"], item["T"]  # both transposed: K[i][j] = kj[j][i], translation = tj[3]
    intr = (kj[0][0], kj[1][1], kj[2][0], kj[2][1], kj[1][0])
    rt = [[tj[0][i], tj[1][i], tj[2][i], tj[3][i]] for i in range(3)]
    with zipfile.ZipFile(dec / "head_pose" / "head_pose.zip") as z:
        pose = _floats(z.read(f"{int(frame):06d}.txt").decode())
    with zipfile.ZipFile(dec / "kinematic_tracking" / "registration_vertices.zip") as z:
        data = z.read(f"{int(frame):06d}.ply")
    v0 = np.frombuffer(data[data.index(b"end_header\n") + 11 :], "<f4")[:3].tolist()
    return intr, rt, pose, v0


def _raw_multiface(truth, cam: str, frame: str):
    lines = (truth["path"] / "KRT").read_text().splitlines()
    i = lines.index(cam)
    k, rt = _floats("\n".join(lines[i + 1 : i + 4])), _floats("\n".join(lines[i + 5 : i + 8]))
    mesh = truth["path"] / "tracked_mesh" / truth["segment"][frame]
    pose = _floats((mesh / f"{frame}_transform.txt").read_text())
    v0 = np.fromfile(mesh / f"{frame}.bin", "<f4")[:3].tolist()
    return (k[0][0], k[1][1], k[0][2], k[1][2], k[0][1]), rt, pose, v0


def _project(intr, rt, p):
    fx, fy, cx, cy, s = intr
    x, y, z = (sum(r[j] * p[j] for j in range(3)) + r[3] for r in rt)
    return fx * x / z + s * y / z + cx, fy * y / z + cy


def test_projection_matches_raw_calibration(capture):
    kind, cap, truth = capture
    frame = cap.neutral_frame()
    for cam in cap.cameras.values():
        raw = (_raw_ava if kind == "ava256" else _raw_multiface)(truth, cam.name, frame)
        intr, rt, pose, v0 = raw
        p_world = [sum(pose[i][j] * v0[j] for j in range(3)) + pose[i][3] for i in range(3)]
        u, v = _project(intr, rt, p_world)
        if kind == "ava256":  # calibrated at the sensor, stored downscaled, no half-pixel shift
            u, v = u * cam.width / 2668, v * cam.height / 4096
        vert = np.append(cap.vertices(frame)[0], 1.0)
        q = cam.K @ (cam.world_to_cam @ (cap.head_to_world(frame) @ vert))[:3]
        np.testing.assert_allclose(q[:2] / q[2], [u, v], atol=1e-3)
        # The head origin's projection is painted magenta in the stored image.
        origin = [pose[i][3] for i in range(3)]
        u0, v0_ = _project(intr, rt, origin)
        if kind == "ava256":
            u0, v0_ = u0 * cam.width / 2668, v0_ * cam.height / 4096
        pixel = cap.image(cam.name, frame)[int(v0_), int(u0)].astype(int)
        assert np.abs(pixel - MARKER).max() < 40, (cam.name, pixel)


def test_round_trip(capture):
    kind, cap, truth = capture
    assert cap.identity == truth["identity"]
    assert cap.frames == truth["frames"] and cap.segment == truth["segment"]
    assert cap.neutral_frame() == truth["neutral"] != cap.frames[0]
    assert sorted(cap.cameras) == sorted(truth["cameras"])
    for name, cam in cap.cameras.items():
        gt = truth["cameras"][name]
        assert (cam.width, cam.height) == (gt["width"], gt["height"])
        np.testing.assert_allclose(cam.K, gt["K"], rtol=1e-7)
        np.testing.assert_allclose(cam.world_to_cam, gt["world_to_cam"], atol=1e-9)
    for f in cap.frames:
        np.testing.assert_allclose(cap.vertices(f), truth["vertices"][f], atol=1e-6)
        np.testing.assert_allclose(cap.head_to_world(f), truth["head_to_world"][f], atol=1e-8)
        for name in cap.cameras:
            assert cap.has_image(name, f)
            img, want = cap.image(name, f), truth["images"][name, f]
            assert img.dtype == np.uint8 and img.shape == want.shape
            err = np.abs(img.astype(int) - want)
            assert err.mean() < 2 and (kind == "ava256" or err.max() == 0)  # AVIF is lossy
        tex = cap.uv_texture(f)
        assert np.abs(tex.astype(int) - truth["textures"][f]).mean() < 2


def test_uv_texture_bottom_row_is_v0(capture, tmp_path):
    """Stored bottom row = OBJ v 0 = our v 1 = last row; a template vertex at OBJ v 0 samples it."""
    _, cap, truth = capture
    tex = cap.uv_texture(cap.frames[0])
    t = len(tex)
    assert np.abs(tex[-1].astype(int) - TEX_BOTTOM).max() < 8
    assert np.abs(tex[0].astype(int) - TEX_TOP).max() < 8
    obj = cap.topology_obj() or truth["topology_obj"]
    (tmp_path / "lm.json").write_text(json.dumps(list(range(68))))
    uvs = load_obj_template(obj, tmp_path / "lm.json").uvs  # our convention: v down
    for k, colour in ((np.argmax(uvs[:, 1]), TEX_BOTTOM), (np.argmin(uvs[:, 1]), TEX_TOP)):
        row, col = (min(int(c * t), t - 1) for c in uvs[k, ::-1])
        assert np.abs(tex[row, col].astype(int) - colour).max() < 8


def test_ava_goliath_member_names(tmp_path):
    """Goliath prefixes members with a folder (`registration_vertices/001010.ply`)."""
    truth = write_ava256_fixture(tmp_path, n_frames=2, n_cams=1)
    path = truth["path"] / "decoder" / "kinematic_tracking" / "registration_vertices.zip"
    _rewrite(path, lambda n, d: (f"registration_vertices/{n}", d))
    with open_ava256(truth["path"]) as cap:
        f = cap.frames[0]
        np.testing.assert_allclose(cap.vertices(f), truth["vertices"][f], atol=1e-6)


def _ava(tmp_path):
    truth = write_ava256_fixture(tmp_path, n_frames=2, n_cams=2)
    return truth, truth["path"] / "decoder", truth["frames"][0]


def test_ava_bad_inputs(tmp_path):
    truth, dec, f = _ava(tmp_path / "a")
    cam, g = next(iter(truth["cameras"])), truth["frames"][1]
    member = f"cam{cam}/{int(g):06d}.avif"  # the first frame's image gives the camera's size
    _rewrite(dec / "image" / f"cam{cam}.zip", lambda n, d: (n, d[:40] if n == member else d))
    ply = f"{int(f):06d}.ply"
    _rewrite(
        dec / "kinematic_tracking" / "registration_vertices.zip",
        lambda n, d: (n, d[:-20] if n == ply else d),
    )
    pose = f"{int(f):06d}.txt"
    _rewrite(
        dec / "head_pose" / "head_pose.zip",
        lambda n, d: (n, b"1 0 0 0\n0 1 0 0\n" if n == pose else d),
    )
    with open_ava256(truth["path"]) as cap:
        _raises(lambda: cap.image(cam, g), f"cam{cam}.zip", member, "cannot decode image")
        _raises(lambda: cap.vertices(f), "registration_vertices.zip", ply, "truncated")
        _raises(lambda: cap.head_to_world(f), "head_pose.zip", pose, "[2, 4]")
        _raises(lambda: cap.image("999", f), "no camera '999'")
        _raises(lambda: cap.vertices("77"), "frame_list.csv", "'77'")

    truth, dec, f = _ava(tmp_path / "b")  # a listed frame missing from a zip
    _rewrite(
        dec / "kinematic_tracking" / "registration_vertices.zip",
        lambda n, d: None if n == ply else (n, d),
    )
    _raises(lambda: open_ava256(truth["path"]), "registration_vertices.zip", f"first {f}", ply)

    truth, dec, f = _ava(tmp_path / "c")  # K of the wrong shape
    calib = json.loads((dec / "camera_calibration.json").read_text())
    calib["KRT"][1]["K"] = calib["KRT"][1]["K"][:2]
    (dec / "camera_calibration.json").write_text(json.dumps(calib))
    _raises(
        lambda: open_ava256(truth["path"]),
        "camera_calibration.json",
        calib["KRT"][1]["cameraId"],
        "[3, 2]",
    )

    truth, dec, f = _ava(tmp_path / "d")  # missing files
    (dec / "head_pose" / "head_pose.zip").unlink()
    _raises(lambda: open_ava256(truth["path"]), "head_pose.zip", "file not found")
    (dec / "camera_calibration.json").unlink()
    _raises(lambda: open_ava256(truth["path"]), "camera_calibration.json", "file not found")
    (dec / "frame_list.csv").write_text("frame,segment\n1,x\n")
    _raises(lambda: open_ava256(truth["path"]), "frame_list.csv", "'seg_id' and 'frame_id'")

    truth, dec, f = _ava(tmp_path / "e")  # no neutral segment; a calibrated camera without images
    (dec / "frame_list.csv").write_text(f"seg_id,frame_id\nEXP_jaw_open,{f}\n")
    dropped = sorted(truth["cameras"])[1]
    (dec / "image" / f"cam{dropped}.zip").unlink()
    with open_ava256(truth["path"]) as cap:
        _raises(cap.neutral_frame, "frame_list.csv", "EXP_neutral_peak")
        assert sorted(cap.cameras) == sorted(set(truth["cameras"]) - {dropped})


def test_multiface_bad_inputs(tmp_path):
    truth = write_multiface_fixture(tmp_path / "a", n_frames=2, n_cams=2)
    sub, (f, g) = truth["path"], truth["frames"]
    cam = next(iter(truth["cameras"]))
    mesh = sub / "tracked_mesh" / truth["segment"][f]
    (mesh / f"{f}.bin").write_bytes((mesh / f"{f}.bin").read_bytes()[:-4])
    (mesh / f"{f}_transform.txt").write_text("1 0 0\n0 1 0\n0 0 1\n")
    img = sub / "images" / truth["segment"][g] / cam / f"{g}.png"
    img.write_bytes(img.read_bytes()[:60])
    with open_multiface(sub) as cap:
        _raises(lambda: cap.vertices(f), f"{f}.bin", "12 bytes")
        _raises(lambda: cap.head_to_world(f), f"{f}_transform.txt", "[3, 3]")
        _raises(lambda: cap.image(cam, g), f"{g}.png", "cannot decode image")

    (sub / "KRT").write_text((sub / "KRT").read_text().replace(f"{cam}\n", f"{cam}\n1 2\n", 1))
    _raises(lambda: open_multiface(sub), "KRT", "line 1", repr(cam))
    (sub / "KRT").unlink()
    _raises(lambda: open_multiface(sub), "KRT", "file not found")

    truth = write_multiface_fixture(tmp_path / "b", n_frames=2, n_cams=1)
    sub, f = truth["path"], truth["frames"][1]
    (sub / "tracked_mesh" / truth["segment"][f] / f"{f}.bin").unlink()
    (sub / "tracked_mesh" / truth["segment"][f] / f"{f}.obj").unlink()
    _raises(lambda: open_multiface(sub), truth["segment"][f], f"{f}.bin")
    (sub / "frame_list.txt").write_text("E001_Neutral_Eyes_Open\n")
    _raises(lambda: open_multiface(sub), "frame_list.txt", "line 1")


def test_ply_ascii_binary_and_extra_properties():
    v = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    np.testing.assert_array_equal(read_ply_vertices(write_ply_vertices(v), "b.ply"), v)
    np.testing.assert_allclose(
        read_ply_vertices(write_ply_vertices(v, binary=False), "a.ply"), v, rtol=1e-7
    )
    # Normals and colours around x y z, then a face element: only positions come back.
    dtype = np.dtype([("nx", "<f4"), ("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("red", "u1")])
    rec = np.zeros(len(v), dtype)
    rec["x"], rec["y"], rec["z"] = v.T
    head = "ply\nformat binary_little_endian 1.0\ncomment x\nelement vertex 7\nproperty float nx\n"
    head += "property double x\nproperty double y\nproperty double z\nproperty uchar red\n"
    head += "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    face = np.array([3], "u1").tobytes() + np.array([0, 1, 2], "<i4").tobytes()
    np.testing.assert_array_equal(
        read_ply_vertices(head.encode() + rec.tobytes() + face, "c.ply"), v
    )
    _raises(lambda: read_ply_vertices(b"not a ply", "d.ply", "m/1.ply"), "d.ply [m/1.ply]", "magic")
    no_z = write_ply_vertices(v).replace(b"property float z\n", b"")
    _raises(lambda: read_ply_vertices(no_z, "e.ply"), "e.ply", "x, y and z")
