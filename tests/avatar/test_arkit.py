"""`fica render --arkit`: an ARKit-52 track (Live Link Face CSV) -> our template's expression
codes and gaze, by the documented name table (fica_jax/avatar/arkit.py)."""

import csv

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data_pipelines.pipeline import open_source
from fica_jax.avatar import arkit
from fica_jax.avatar.bundle import Avatar
from fica_jax.commands.main import main
from fica_jax.config import load_config
from fica_jax.errors import UserError
from fica_jax.geometry.template import make_head_template
from fica_jax.stages import upm as upm_stage

ARKIT_52 = """EyeBlinkLeft EyeLookDownLeft EyeLookInLeft EyeLookOutLeft EyeLookUpLeft EyeSquintLeft
EyeWideLeft EyeBlinkRight EyeLookDownRight EyeLookInRight EyeLookOutRight EyeLookUpRight
EyeSquintRight EyeWideRight JawForward JawRight JawLeft JawOpen MouthClose MouthFunnel MouthPucker
MouthRight MouthLeft MouthSmileLeft MouthSmileRight MouthFrownLeft MouthFrownRight MouthDimpleLeft
MouthDimpleRight MouthStretchLeft MouthStretchRight MouthRollLower MouthRollUpper MouthShrugLower
MouthShrugUpper MouthPressLeft MouthPressRight MouthLowerDownLeft MouthLowerDownRight
MouthUpperUpLeft MouthUpperUpRight BrowDownLeft BrowDownRight BrowInnerUp BrowOuterUpLeft
BrowOuterUpRight CheekPuff CheekSquintLeft CheekSquintRight NoseSneerLeft NoseSneerRight
TongueOut""".split()
TAIL = ["HeadYaw", "HeadPitch", "HeadRoll", "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll"]
NAMES = list(make_head_template(48).expr_names)


def _write(path, frames: list[dict]):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Timecode", "BlendShapeCount", *ARKIT_52, *TAIL])
        for i, fr in enumerate(frames):
            w.writerow([f"00:00:00:{i:02d}.000", 61, *(fr.get(n, 0.0) for n in ARKIT_52),
                        *([0.3] * len(TAIL))])  # fmt: skip
    return path


def test_table_covers_the_template_and_names_real_arkit_blendshapes():
    assert set(arkit.TABLE) == set(NAMES)
    used = {n for _, src in arkit.TABLE.values() for n in src} | set(arkit.GAZE)
    assert used <= set(ARKIT_52) and len(ARKIT_52) == 52


def test_codes_and_gaze_follow_the_table(tmp_path):
    frames = [
        {"JawOpen": 0.8, "MouthSmileLeft": 0.5, "MouthStretchLeft": 0.2, "MouthStretchRight": 0.6,
         "BrowInnerUp": 0.7, "BrowOuterUpLeft": 0.1, "EyeBlinkRight": 1.0, "TongueOut": 1.0},
        {"EyeLookOutLeft": 1.0, "EyeLookInRight": 1.0, "EyeLookUpLeft": 0.5, "EyeLookUpRight": 0.5},
    ]  # fmt: skip
    codes, gaze = arkit.read_arkit_csv(_write(tmp_path / "t.csv", frames), NAMES)
    c = dict(zip(NAMES, codes[0], strict=True))
    assert c["jaw_open"] == pytest.approx(0.8) and c["smile_left"] == pytest.approx(0.5)
    assert c["lips_stretch"] == pytest.approx(0.4)  # mean of left/right
    assert c["brow_up_left"] == pytest.approx(0.7) and c["brow_up_right"] == pytest.approx(0.7)
    assert c["blink_right"] == 1.0 and c["smile_right"] == 0.0
    assert np.count_nonzero(codes[1]) == 0  # eye looks move only the gaze
    np.testing.assert_allclose(gaze[0], 0.0)
    np.testing.assert_allclose(gaze[1], [arkit.GAZE_MAX, 0.5 * arkit.GAZE_MAX], rtol=1e-6)


def test_bad_tracks_are_one_clear_error(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("Timecode,JawOpen\n00:00,0.5\n")
    with pytest.raises(UserError, match="no column 'BrowDownLeft'"):
        arkit.read_arkit_csv(p, NAMES)
    _write(p, [{"JawOpen": "wide"}])
    with pytest.raises(UserError, match="line 2, column JawOpen: not a number"):
        arkit.read_arkit_csv(p, NAMES)


@pytest.mark.heavy
def test_render_arkit_track_to_gif(synth_dir, tmp_path):
    rec = open_source(synth_dir, "test")[0]
    cfg = load_config("configs/upm.py:tiny", [f"--config.data.dir={synth_dir}"])
    model = upm_stage.make_model(cfg, nnx.Rngs(0))
    assert cfg.data.expression_dim == len(NAMES)
    info = {"expression_names": NAMES}
    av = Avatar.create(model, rec["uv_texture"] / 255.0, rec["uv_geometry"], rec["uv_mask"], info)
    av.save(tmp_path / "av")
    track = _write(tmp_path / "t.csv", [{"JawOpen": w} for w in (0.0, 0.5, 1.0)])
    gif = tmp_path / "t.gif"
    argv = ["render", "--avatar", str(tmp_path / "av"), "--out", str(gif), "--arkit", str(track)]
    assert main([*argv, "--size", "32"]) == 0
    with Image.open(gif) as im:
        assert im.n_frames == 3
