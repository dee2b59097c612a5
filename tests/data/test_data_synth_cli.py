"""`fica data synth` driver and `fica data inspect`: worker-count invariance, atomic output,
and (once the synthetic generator exists) the end-to-end CLI."""

import numpy as np
import pytest
from fake_records import fake_make_identity
from PIL import Image

from data_pipelines.shards import read_metadata
from data_pipelines.synth import synthesize
from fica_jax.commands.main import main
from fica_jax.errors import UserError

CFG = {"res": 8, "size": 16, "views": 2}


def _shards(d):
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.array_record"))}


def test_records_identical_for_any_worker_count(tmp_path):
    kw = dict(cfg=CFG, seed=5, make_fn=fake_make_identity, template={}, progress=False)
    synthesize(tmp_path / "w1", 6, workers=1, records_per_shard=4, **kw)
    synthesize(tmp_path / "w2", 6, workers=2, records_per_shard=4, **kw)
    a, b = _shards(tmp_path / "w1"), _shards(tmp_path / "w2")
    assert a.keys() == b.keys() and len(a) == 3 and a == b
    meta = read_metadata(tmp_path / "w2")
    assert meta["generator"]["seed"] == 5 and meta["generator"]["config"] == CFG
    assert meta["generator"]["name"] == "fake_records.fake_make_identity"
    with pytest.raises(UserError, match="--overwrite"):
        synthesize(tmp_path / "w2", 1, workers=1, **kw)


def test_inspect_contact_sheet_from_fake_data(tmp_path, capsys):
    synthesize(
        tmp_path / "ds",
        3,
        workers=1,
        cfg={"res": 8, "size": 16, "views": 4},
        make_fn=fake_make_identity,
        template={},
        progress=False,
    )
    png = tmp_path / "sheet.png"
    assert (
        main(["data", "inspect", str(tmp_path / "ds"), "--png", str(png), "--identity", "id0001"])
        == 0
    )
    im = np.asarray(Image.open(png))
    assert im.shape[0] > 3 * 192 and im.shape[1] == 5 * 192 and im.std() > 10
    assert (
        main(["data", "inspect", str(tmp_path / "ds"), "--png", str(png), "--identity", "zed"]) == 2
    )
    assert "no identity 'zed'" in capsys.readouterr().err


@pytest.mark.heavy
def test_synth_then_inspect_end_to_end(tmp_path):
    out = tmp_path / "synth"
    argv = [
        "data",
        "synth",
        "--out",
        str(out),
        "--identities",
        "2",
        "--resolution",
        "64",
        "--image-size",
        "64",
        "--frames",
        "2",
        "--workers",
        "1",
    ]
    assert main(argv) == 0
    meta = read_metadata(out)
    assert (meta["uv_resolution"], meta["image_size"], meta["n_views"]) == (64, [64, 64], 3)
    assert sum(s["num_records"] for s in meta["splits"].values()) == 2
    assert meta["template"]
    png = tmp_path / "sheet.png"
    assert main(["data", "inspect", str(out), "--png", str(png)]) == 0
    assert Image.open(png).size[0] >= 5 * 192
    assert main(argv) == 2  # exists, no --overwrite
