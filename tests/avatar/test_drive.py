"""`fica avatar` / `fica render` (fica_jax/avatar/drive.py): cameras, frame programs, GIF and PNG output,
bad input. The trained path (`fica avatar` on a UPM run) is in tests/stages/test_upm_trained.py."""

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_pipelines.pipeline import open_source
from fica_jax.avatar import drive
from fica_jax.avatar.bundle import Avatar
from fica_jax.commands.main import main
from fica_jax.config import load_config
from fica_jax.errors import UserError
from fica_jax.models.upm import view_direction
from fica_jax.stages import upm as upm_stage


@pytest.fixture(scope="module")
def avatar_dir(synth_dir, tmp_path_factory):
    rec = open_source(synth_dir, "test")[0]
    cfg = load_config("configs/upm.py:tiny", [f"--config.data.dir={synth_dir}"])
    model = upm_stage.make_model(cfg, nnx.Rngs(0))
    info = {"expression_names": [f"name{k}" for k in range(cfg.data.expression_dim)]}
    av = Avatar.create(model, rec["uv_texture"] / 255.0, rec["uv_geometry"], rec["uv_mask"], info)
    return av.save(tmp_path_factory.mktemp("avatar") / "av")


def test_orbit_camera_looks_at_the_head_from_yaw():
    for yaw, want in ((0, [0, 0, 1]), (90, [1, 0, 0]), (180, [0, 0, -1])):
        viewmat, K = drive.orbit_camera(yaw, 0, 64)
        d = np.asarray(view_direction(viewmat))
        np.testing.assert_allclose(d, want, atol=0.05)  # the target sits ~2 cm off the origin
        centre = viewmat[:3, :3] @ np.asarray(drive.TARGET) + viewmat[:3, 3]
        np.testing.assert_allclose((K @ centre)[:2] / centre[2], [32, 32], atol=1e-3)
    assert K[0, 0] == pytest.approx(64 * 0.7 / 0.36)


def test_sweep_moves_one_blendshape_at_a_time_then_the_gaze():
    frames = drive.sweep(["a", "b"], 3)
    n = drive.SWEEP_FRAMES
    assert len(frames) == 3 * n + 4 * n
    assert [f["label"] for f in frames[:: n]] == ["a", "b", "e2", "gaze left", "gaze right",
                                                 "gaze up", "gaze down"]  # fmt: skip
    for k in range(3):
        codes = np.stack([f["expression"] for f in frames[k * n : (k + 1) * n]])
        assert np.all(np.delete(codes, k, axis=1) == 0) and codes[:, k].max() == pytest.approx(1)
        assert codes[0, k] == 0
    gaze = np.stack([f["gaze"] for f in frames[3 * n :]])
    assert np.abs(gaze).max() == pytest.approx(np.radians(drive.GAZE_DEG))


def test_render_turntable_gif_and_codes_sheet(avatar_dir, tmp_path, capsys):
    gif = tmp_path / "turn.gif"
    assert main(["render", "--avatar", str(avatar_dir), "--out", str(gif), "--turntable",
                 "--size", "32"]) == 0  # fmt: skip
    with Image.open(gif) as im:
        assert im.n_frames == 36 and im.size == (32, 32)
        first = np.asarray(im.convert("RGB"))
        im.seek(18)  # the back
        back = np.asarray(im.convert("RGB"))
    assert np.abs(first.astype(int) - back).mean() > 1  # the orbit moves
    assert (first != 128).any(axis=-1).mean() > 0.2  # the head covers the frame's centre
    codes = tmp_path / "codes.npy"
    np.save(codes, np.random.RandomState(0).uniform(0, 1, (3, 18)).astype(np.float32))
    sheet = tmp_path / "codes.png"
    argv = ["render", "--avatar", str(avatar_dir), "--out", str(sheet), "--expressions", str(codes)]
    assert main([*argv, "--size", "32"]) == 0
    assert Image.open(sheet).size == (3 * 32, 32 + 14)
    assert "3 frames at 32 px" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_render_avatar_checks_its_output_before_rendering(avatar_dir, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    monkeypatch.setattr(drive, "render_frames", lambda *a, **k: pytest.fail("rendered"))
    with pytest.raises(UserError, match="cannot write .*afile/x.gif: .*afile is not a folder"):
        drive.render_avatar(avatar_dir, tmp_path / "afile" / "x.gif", mode="turntable")


@pytest.mark.parametrize(
    "case, expect",
    [
        ("codes", "expected [T, 18]"),
        ("suffix", "expected a .gif, .mp4 or .png"),
        ("no_avatar", "holds no avatar.json"),
        ("not_upm", "expected a `upm` run"),
    ],
)
def test_bad_input_is_one_line(case, expect, avatar_dir, tmp_path, capsys):
    if case == "codes":
        np.save(tmp_path / "c.npy", np.zeros((4, 5), np.float32))
        argv = ["render", "--avatar", str(avatar_dir), "--out", str(tmp_path / "x.gif"),
                "--expressions", str(tmp_path / "c.npy")]  # fmt: skip
    elif case == "suffix":
        argv = ["render", "--avatar", str(avatar_dir), "--out", str(tmp_path / "x.mkv"),
                "--turntable"]  # fmt: skip
    elif case == "no_avatar":
        argv = ["render", "--avatar", str(tmp_path), "--out", str(tmp_path / "x.gif"),
                "--turntable"]  # fmt: skip
    else:
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"stage": "dit"}))
        argv = ["avatar", "--run", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "a")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "x.gif").exists() and not (tmp_path / "a").exists()
