"""Shard writer/reader: atomic writes, metadata, round trip, clear errors on broken inputs."""

import json
import os
import pickle

import numpy as np
import pytest
from fake_records import fake_record, write_fake_dataset

from data_pipelines import schema
from data_pipelines.shards import DatasetWriter, read_metadata
from data_pipelines.source import CaptureSource
from fica_jax.commands.main import main
from fica_jax.errors import UserError


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "ds"
    write_fake_dataset(d, n=10, records_per_shard=3)
    return d


def test_layout_and_metadata(data_dir):
    meta = read_metadata(data_dir)
    assert meta["schema_version"] == schema.SCHEMA_VERSION
    assert (meta["uv_resolution"], meta["image_size"], meta["n_views"]) == (8, [16, 16], 3)
    assert (meta["landmark_dim"], meta["expression_dim"], meta["shape_dim"]) == (5, 4, 3)
    assert meta["splits"]["train"]["num_records"] == 8  # fake split: every 5th is test
    assert meta["splits"]["test"]["num_records"] == 2
    files = [s["file"] for s in meta["splits"]["train"]["shards"]]
    assert files == [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    assert meta["generator"]["name"] == "fake_records" and meta["template"] == {"note": "fake"}
    on_disk = sorted(os.listdir(data_dir))
    assert on_disk == sorted(files + ["test-00000-of-00001.array_record", "metadata.json"])
    assert not [p for p in os.listdir(data_dir.parent) if p.startswith(".")]  # no temp dirs


def test_round_trip_and_pickle(data_dir):
    src = CaptureSource(data_dir, "train")
    want = [fake_record(i) for i in range(10) if i % 5 != 4]
    assert len(src) == len(want)
    for i, rec in enumerate(want):
        got = src[i]
        for k in schema.FIELDS:
            assert got[k].dtype == rec[k].dtype and np.array_equal(got[k], rec[k]), k
    clone = pickle.loads(pickle.dumps(src))
    assert str(clone[3]["identity"]) == str(want[3]["identity"])


def test_existing_output_needs_overwrite_and_failure_leaves_nothing(data_dir, tmp_path):
    with pytest.raises(UserError, match="--overwrite"):
        DatasetWriter(data_dir)
    before = sorted(os.listdir(data_dir))
    with pytest.raises(RuntimeError, match="boom"):
        with DatasetWriter(data_dir, overwrite=True) as w:
            w.add(fake_record(0))
            raise RuntimeError("boom")
    assert sorted(os.listdir(data_dir)) == before  # old data untouched
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
    with DatasetWriter(data_dir, overwrite=True, records_per_shard=100) as w:
        w.add(fake_record(0, split="train"))
    assert read_metadata(data_dir)["splits"]["train"]["num_records"] == 1
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError, match="differ"):
        with DatasetWriter(fresh) as w:
            w.add(fake_record(0))
            w.add(fake_record(1, res=4))
    assert not fresh.exists()


def test_unwritable_output_is_a_user_error_before_writing(tmp_path):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "ds"
    with pytest.raises(UserError, match=f"cannot write {out}: .*afile is not a folder"):
        DatasetWriter(out)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def _shard(data_dir):
    return data_dir / read_metadata(data_dir)["splits"]["train"]["shards"][1]["file"]


def test_flipped_bytes_name_file_and_record(data_dir, capsys):
    shard = _shard(data_dir)
    b = bytearray(shard.read_bytes())
    for j in range(2000, 2100):  # inside the first record's chunk
        b[j] ^= 0xFF
    shard.write_bytes(bytes(b))
    src = CaptureSource(data_dir, "train")
    with pytest.raises(UserError, match=rf"{shard.name} record 0: corrupt"):
        src[3]  # global index 3 = shard 1, record 0
    png = data_dir.parent / "sheet.png"
    assert main(["data", "inspect", str(data_dir), "--png", str(png), "--identity", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(shard) in err and "record 0" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not png.exists()


def test_truncated_shard(data_dir, capsys):
    shard = _shard(data_dir)
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(UserError, match=str(shard)):
        CaptureSource(data_dir, "train")
    assert main(["data", "inspect", str(data_dir), "--png", str(data_dir / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(shard) in err and "truncated" in err


def test_wrong_version_missing_dir_missing_metadata(data_dir, tmp_path, capsys):
    meta_path = data_dir / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["schema_version"] = 99
    meta_path.write_text(json.dumps(meta))
    assert main(["data", "inspect", str(data_dir), "--png", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert str(meta_path) in err and "schema_version 99" in err
    missing = tmp_path / "nope"
    assert main(["data", "inspect", str(missing), "--png", str(tmp_path / "a.png")]) == 2
    assert f"error: {missing}: dataset directory does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="metadata.json: missing"):
        CaptureSource(empty, "train")


def test_record_with_old_schema_version_in_shard(tmp_path):
    rec = fake_record(0)
    rec["schema_version"] = np.int32(0)  # bypass encode's validation: write raw npz bytes
    import io

    buf = io.BytesIO()
    np.savez(buf, **rec)
    with pytest.raises(UserError, match="r.bin: schema version 0, expected 2"):
        schema.decode(buf.getvalue(), where="r.bin")
