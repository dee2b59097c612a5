"""fica_jax/files.py (atomic writes, output-path errors) and fica_jax/preview.py (the one
labelled image grid, a training run's step preview)."""

import json

import numpy as np
import pytest
from PIL import Image
from tb_events import tb_images

from fica_jax import files, preview
from fica_jax.errors import UserError


def _blocked(tmp_path):
    """A path no one can write, root included: its parent is a regular file."""
    (tmp_path / "afile").write_text("")
    return tmp_path / "afile" / "deeper" / "x.png"


def test_atomic_file_renames_at_the_end_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "new" / "a.json"  # missing parents are made
    files.write_json(path, {"k": 1})
    assert json.loads(path.read_text()) == {"k": 1} and oct(path.stat().st_mode)[-3:] == "644"
    with pytest.raises(RuntimeError), files.atomic_file(path) as tmp:
        assert tmp.parent == path.parent and tmp.suffix == ".json" and tmp.name.startswith(".")
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert json.loads(path.read_text()) == {"k": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"], "no temp file left"


def test_atomic_dir_replaces_the_folder_only_when_complete(tmp_path):
    out = tmp_path / "bundle"
    with files.atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), files.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("writer failed")
    assert [p.name for p in out.iterdir()] == ["a"]
    with files.atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in out.iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_unwritable_locations_name_the_path_and_write_nothing(tmp_path):
    path = _blocked(tmp_path)
    want = f"cannot write {path}: {tmp_path / 'afile'} is not a folder"
    for write in (
        lambda: files.check_writable(path),
        lambda: files.write_text(path, "x"),
        lambda: files.atomic_dir(path).__enter__(),
        lambda: preview.write_sheet([[("a", np.zeros((4, 4, 3)))]], path),
    ):
        with pytest.raises(UserError, match="^" + want.replace("/", ".")):
            write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == ""
    # a fine path: checked, nothing created
    assert files.check_writable(tmp_path / "new" / "deep" / "x") == tmp_path / "new" / "deep" / "x"
    assert not (tmp_path / "new").exists()


def test_tile_image_takes_floats_bytes_greys_and_pil(tmp_path):
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    rgb = np.stack([ramp] * 3, -1)
    want = np.asarray(preview.tile_image(rgb, 8))
    assert want.shape == (8, 8, 3) and want[0, 0, 0] == 0 and want[-1, -1, 0] == 255
    assert (want[::2, ::2] == want[1::2, 1::2]).all(), "enlarged with nearest neighbour"
    for same in (ramp, ramp[..., None], (rgb * 255).astype(np.uint8)):
        got = np.asarray(preview.tile_image(same, 8)).astype(int)
        assert np.abs(got - want).max() <= 1  # uint8 is taken as is, floats are x 255
    assert np.asarray(preview.tile_image(Image.fromarray(want), 8)).tolist() == want.tolist()
    small = np.asarray(preview.tile_image(np.full((32, 32, 3), 0.5), 8))
    assert small.shape == (8, 8, 3)


def test_sheet_layout_with_title(tmp_path):
    rows = [[("a", np.ones((8, 8, 3))), ("b", np.zeros((8, 8, 3)))], [("c", np.ones((8, 8, 3)))]]
    got = preview.write_sheet(rows, tmp_path / "s.png", tile=16, title="t")
    lab = preview.LABEL_H
    assert got.shape == (lab + 2 * (16 + lab), 32, 3)
    assert (np.asarray(Image.open(tmp_path / "s.png")) == got).all()
    assert (got[2 * lab : 2 * lab + 16, :16] == 255).all() and (
        got[2 * lab :, 16:32][:16] == 0
    ).all()
    assert preview.write_sheet(rows, tmp_path / "n.png", tile=16).shape[0] == 2 * (16 + lab)


def test_step_sheet_writes_the_png_and_a_tensorboard_image(tmp_path):
    sheet = preview.write_step_sheet([[("x", np.full((4, 4, 3), 0.5))]], tmp_path, 12)
    png = tmp_path / "samples" / "step_0000012.png"
    assert (np.asarray(Image.open(png)) == sheet).all()
    assert tb_images(tmp_path / "tb") == [(12, "samples", *sheet.shape[:2])]
