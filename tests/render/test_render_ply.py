"""Standard 3DGS .ply export / import."""

import numpy as np
import pytest

from fica_jax.errors import UserError
from fica_jax.render.ply import PROPS, SH_C0, load_ply, save_ply


def gaussians(n=50, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 4)).astype(np.float32)
    return dict(
        means=rng.normal(size=(n, 3)).astype(np.float32),
        quats=q / np.linalg.norm(q, axis=1, keepdims=True),
        scales=np.exp(rng.uniform(-5, 0, (n, 3))).astype(np.float32),
        opacities=rng.uniform(0.01, 0.99, n).astype(np.float32),
        colors=rng.uniform(size=(n, 3)).astype(np.float32),
    )


def test_round_trip_and_standard_layout(tmp_path):
    g = gaussians()
    path = tmp_path / "sub" / "avatar.ply"
    save_ply(path, **g)
    back = load_ply(path)
    for k, v in g.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    raw = path.read_bytes()
    header, body = raw.split(b"end_header\n", 1)
    lines = header.decode().splitlines()
    assert lines[:3] == ["ply", "format binary_little_endian 1.0", "element vertex 50"]
    assert [ln.split()[2] for ln in lines[3:]] == PROPS  # order viewers expect
    assert len(body) == 50 * len(PROPS) * 4
    rec = np.frombuffer(body, "<f4").reshape(50, len(PROPS))
    np.testing.assert_allclose(rec[:, 6:9], (g["colors"] - 0.5) / SH_C0, rtol=1e-5, atol=1e-6)
    o = g["opacities"]
    np.testing.assert_allclose(rec[:, 9], np.log(o / (1 - o)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rec[:, 10:13], np.log(g["scales"]), rtol=1e-5)
    assert not [p for p in path.parent.iterdir() if p.name != "avatar.ply"]  # no temp left


def test_extra_sh_properties_are_ignored(tmp_path):
    g = gaussians(4)
    path = tmp_path / "a.ply"
    save_ply(path, **g)
    header, body = path.read_bytes().split(b"end_header\n", 1)
    rows = np.frombuffer(body, "<f4").reshape(4, -1)
    extra = np.concatenate([rows, np.ones((4, 2), "<f4")], 1)
    header += b"property float f_rest_0\nproperty float f_rest_1\n"
    path.write_bytes(header + b"end_header\n" + extra.tobytes())
    np.testing.assert_allclose(load_ply(path)["colors"], g["colors"], rtol=1e-5, atol=1e-6)


def test_bad_files_raise_user_error_naming_them(tmp_path):
    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"not a ply at all")
    with pytest.raises(UserError, match="bad.ply"):
        load_ply(bad)
    good = tmp_path / "g.ply"
    save_ply(good, **gaussians(3))
    cut = tmp_path / "cut.ply"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(UserError, match="cut.ply.*truncated"):
        load_ply(cut)
    with pytest.raises(UserError, match="missing.ply"):
        load_ply(tmp_path / "missing.ply")
    ascii_ply = tmp_path / "ascii.ply"
    ascii_ply.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n")
    with pytest.raises(UserError, match="ascii.ply.*binary_little_endian"):
        load_ply(ascii_ply)
