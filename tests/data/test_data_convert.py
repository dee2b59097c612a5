"""Real-capture converter: documented folder layout -> shards; clear errors for bad files."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines.convert import convert_capture
from data_pipelines.shards import read_metadata
from data_pipelines.source import CaptureSource
from fica_jax.commands.main import main

H, R, V, L, E = 12, 8, 3, 4, 5


def _sphere(res):
    v, u = (np.mgrid[0:res, 0:res] + 0.5) / res
    th, ph = (0.2 + 0.6 * v) * np.pi, (u - 0.5) * np.pi
    return 0.1 * np.stack([np.sin(th) * np.sin(ph), np.cos(th), np.sin(th) * np.cos(ph)], -1)


def _identity(d, rng, *, full):
    d.mkdir(parents=True)
    rgba = rng.integers(0, 256, (H, H, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[3:9, 3:9, 3] = 255
    Image.fromarray(rgba).save(d / "portrait.png")
    Image.fromarray(rng.integers(0, 256, (R, R, 3), dtype=np.uint8)).save(d / "uv_texture.png")
    np.save(d / "uv_geometry.npy", _sphere(R).astype(np.float32))
    (d / "frames").mkdir()
    for f in range(V - 1):
        Image.fromarray(rng.integers(0, 256, (H, H, 3), dtype=np.uint8)).save(
            d / "frames" / f"{f:03d}.png"
        )
    cams = {"views": [{"K": np.eye(3).tolist(), "viewmat": np.eye(4).tolist()} for _ in range(V)]}
    for i, c in enumerate(cams["views"]):
        c["K"][0][0] = 10.0 + i
        c["viewmat"][2][3] = 1.0
    (d / "cameras.json").write_text(json.dumps(cams))
    ann = {
        "expression": rng.standard_normal((V, E)).tolist(),
        "gaze": rng.standard_normal((V, 2)).tolist(),
        "kpts": (rng.random((V, L, 2)) * H).tolist(),
    }
    (d / "annotations.json").write_text(json.dumps(ann))
    if full:
        (d / "dense").mkdir()
        uv = np.zeros((H, H, 2), np.float32)
        uv[5, 6] = [0.3, 0.7]  # -> texel (row 5, col 2) of an 8x8 atlas
        np.save(d / "dense" / "000_uv.npy", uv)
        np.save(d / "dense" / "000_vtx.npy", np.full((H, H, 3), 0.25, np.float32))
        Image.fromarray(np.full((H, H), 255, np.uint8)).save(d / "frames" / "001_mask.png")
    return rgba, ann


@pytest.fixture
def capture(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "capture"
    a = _identity(src / "alice", rng, full=True)
    b = _identity(src / "bob", rng, full=False)
    (src / "split.json").write_text(json.dumps({"test": ["bob"]}))
    return src, a, b


def test_convert_capture(capture, tmp_path):
    src, (rgba, ann), _ = capture
    out = tmp_path / "out"
    assert main(["data", "convert", "--src", str(src), "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert (
        meta["splits"]["train"]["num_records"] == 1 and meta["splits"]["test"]["num_records"] == 1
    )
    assert (meta["n_views"], meta["landmark_dim"], meta["expression_dim"]) == (V, L, E)
    rec = CaptureSource(out, "train")[0]
    assert str(rec["identity"]) == "alice"
    np.testing.assert_array_equal(rec["view_image"][0], rgba[..., :3])
    np.testing.assert_array_equal(rec["view_mask"][0], rgba[..., 3] > 127)  # mask from alpha
    assert rec["view_mask"][1].all() and rec["view_mask"][2].all()
    assert [float(k[0, 0]) for k in rec["view_K"]] == [10.0, 11.0, 12.0]
    np.testing.assert_allclose(rec["view_expression"], ann["expression"], rtol=1e-6)
    assert rec["view_kpts_visible"].all()
    # partial UV: the one foreground pixel with a UV value lands on its texel
    p = rec["partial_uv"].astype(np.float32)
    assert p[..., 3].sum() >= 1 and p[5, 2, 3] == 1
    np.testing.assert_allclose(p[5, 2, :3], rgba[5, 6, :3] / 255, atol=2e-3)
    np.testing.assert_allclose(p[5, 2, 7:], 0.25, atol=1e-3)
    # depth from vertex map and viewmat (z + 1) on the mask only
    d = rec["view_depth"][0].astype(np.float32)
    np.testing.assert_allclose(d[rgba[..., 3] > 127], 1.25, atol=1e-3)
    assert (d[rgba[..., 3] <= 127] == 0).all()
    # uv_normal derived from the sphere-patch geometry points outward
    g = rec["uv_geometry"]
    n = rec["uv_normal"].astype(np.float32)
    cos = np.sum(n * g / np.linalg.norm(g, axis=-1, keepdims=True), -1)
    assert cos[1:-1, 1:-1].min() > 0.9
    test = CaptureSource(out, "test")[0]
    assert str(test["identity"]) == "bob" and not test["partial_uv"].any()
    assert not test["view_vtx"].any()  # no dense maps -> zeros, as documented


def _run(src, out, capsys):
    code = main(["data", "convert", "--src", str(src), "--out", str(out)])
    return code, capsys.readouterr().err


def test_missing_and_ill_shaped_files(capture, tmp_path, capsys):
    src = capture[0]
    out = tmp_path / "out"
    (src / "bob" / "uv_texture.png").unlink()
    code, err = _run(src, out, capsys)
    assert code == 2 and f"error: {src / 'bob' / 'uv_texture.png'}: required file is missing" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    Image.fromarray(np.zeros((R, R, 3), np.uint8)).save(src / "bob" / "uv_texture.png")
    np.save(src / "bob" / "uv_geometry.npy", np.zeros((R, R, 2), np.float32))
    code, err = _run(src, out, capsys)
    assert code == 2 and "bob/uv_geometry.npy: shape [8, 8, 2], expected [8x8x3]" in err

    (src / "bob" / "uv_geometry.npy").unlink()
    (src / "bob" / "uv_geometry.exr").write_bytes(b"not really")
    code, err = _run(src, out, capsys)
    assert code == 2 and "EXR is not supported" in err and "uv_geometry.npy" in err

    np.save(src / "bob" / "uv_geometry.npy", _sphere(R).astype(np.float32))
    cams = json.loads((src / "bob" / "cameras.json").read_text())
    (src / "bob" / "cameras.json").write_text(json.dumps({"views": cams["views"][:2]}))
    code, err = _run(src, out, capsys)
    assert code == 2 and "bob/cameras.json" in err and "3 entries" in err

    (src / "bob" / "cameras.json").write_text(json.dumps(cams))
    (src / "split.json").write_text(json.dumps({"test": ["carol"]}))
    code, err = _run(src, out, capsys)
    assert code == 2 and "split.json: identity 'carol'" in err
    assert not out.exists()
    code, err = _run(tmp_path / "nowhere", out, capsys)
    assert code == 2 and "capture folder does not exist" in err


def test_minimal_identity(tmp_path):
    d = tmp_path / "cap" / "x"
    d.mkdir(parents=True)
    Image.fromarray(np.zeros((H, H, 3), np.uint8)).save(d / "portrait.png")
    Image.fromarray(np.zeros((R, R, 3), np.uint8)).save(d / "uv_texture.png")
    np.save(d / "uv_geometry.npy", _sphere(R).astype(np.float32))
    (d / "cameras.json").write_text(
        json.dumps({"views": [{"K": np.eye(3).tolist(), "viewmat": np.eye(4).tolist()}]})
    )
    assert convert_capture(tmp_path / "cap", tmp_path / "out") == 1
    rec = CaptureSource(tmp_path / "out", "train")[0]
    assert rec["view_image"].shape == (1, H, H, 3) and rec["view_mask"].all()
    assert rec["view_kpts"].shape == (1, 0, 2) and rec["view_expression"].shape == (1, 0)
    assert rec["uv_mask"].all()  # non-zero geometry everywhere


def test_align_crops_a_real_portrait_like_fica_generate(tmp_path):
    """`--align`: the astronaut photo as a folder capture's portrait is re-cropped by the face
    detector's rule (the same square `fica generate` takes), its K and mask with it."""
    from data_pipelines.align import align_portrait

    photo = np.asarray(Image.open(Path(__file__).parent / "astronaut.jpg").convert("RGB"))
    s = min(photo.shape[:2])
    photo = np.ascontiguousarray(photo[:s, :s])
    src = tmp_path / "capture"
    _identity(src / "astro", np.random.default_rng(1), full=False)
    for v in range(V):  # every view the photo's size: views share H, W
        img = photo if v == 0 else np.zeros_like(photo)
        name = "portrait.png" if v == 0 else f"frames/{v - 1:03d}.png"
        Image.fromarray(img).save(src / "astro" / name)
    assert main(["data", "convert", "--src", str(src), "--out", str(tmp_path / "ds"),
                 "--align"]) == 0  # fmt: skip
    rec = CaptureSource(tmp_path / "ds", "train")[0]
    want, (x0, y0, x1, y1) = align_portrait(photo, s)
    np.testing.assert_array_equal(rec["view_image"][0], want)
    assert x1 - x0 < 0.6 * s  # a face-sized square, not the whole photo
    k = rec["view_K"][0]  # the raw portrait had fx = 10, cx = 0: scaled and shifted
    np.testing.assert_allclose(k[0, 0], 10 * s / (x1 - x0), rtol=1e-5)
    np.testing.assert_allclose(k[0, 2], -x0 * s / (x1 - x0), rtol=1e-5, atol=1e-3)
