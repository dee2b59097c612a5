"""tfds builder over our shards: identical examples, Grain-readable without TensorFlow."""

import sys

import numpy as np
import tensorflow_datasets as tfds
from fake_records import write_fake_dataset

from data_pipelines import schema
from data_pipelines.pipeline import make_pipeline
from data_pipelines.source import CaptureSource
from data_pipelines.tfds_builder import TfdsRecordSource, build_tfds
from fica_jax.commands.main import main
from fica_jax.train.stage import get_stage


def test_tfds_and_array_record_sources_are_identical(tmp_path):
    assert "tensorflow" not in sys.modules  # the whole path runs without TF
    shards = tmp_path / "ds"
    write_fake_dataset(shards, n=7, records_per_shard=2)
    assert main(["data", "tfds", str(shards), "--out", str(tmp_path / "tfds")]) == 0
    prepared = build_tfds(shards, tmp_path / "tfds")  # reuses the prepared copy
    assert prepared == tmp_path / "tfds" / "fica_capture" / f"{schema.SCHEMA_VERSION}.0.0"
    for split in ("train", "test"):
        ours = CaptureSource(shards, split)
        theirs = TfdsRecordSource(prepared, split)
        a = {str(ours[i]["identity"]): ours[i] for i in range(len(ours))}
        b = {str(theirs[i]["identity"]): theirs[i] for i in range(len(theirs))}
        assert sorted(a) == sorted(b) and len(a) == len(ours)
        for ident, rec in a.items():
            assert rec.keys() == b[ident].keys() == set(schema.FIELDS)
            for k in rec:
                assert rec[k].dtype == b[ident][k].dtype, (ident, k)
                assert np.array_equal(rec[k], b[ident][k]), (ident, k)
    # the registered builder loads by name, and our stage pipelines take the tfds directory
    by_name = tfds.data_source("fica_capture", data_dir=str(tmp_path / "tfds"))
    assert {k: len(v) for k, v in by_name.items()} == {"train": 6, "test": 1}
    vae = get_stage("vae").example
    batch = next(iter(make_pipeline(prepared, vae, "train", global_batch_size=2, seed=0)))
    assert batch["uv_texture"].shape == (2, 8, 8, 3)
    assert "tensorflow" not in sys.modules


def test_tfds_cli_bad_input(tmp_path, capsys):
    assert main(["data", "tfds", str(tmp_path / "none"), "--out", str(tmp_path / "t")]) == 2
    assert "dataset directory does not exist" in capsys.readouterr().err
