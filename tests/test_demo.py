"""`fica demo`, the README's main job, at a few steps per stage."""

import json

from fica_jax.cli import main


def test_demo_runs_every_available_stage_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--identities", "9", "--steps", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"vae", "dense"}
    for stage in report["stages"].values():
        assert any(k.startswith("eval/baseline_") for k in stage)
    assert report["conditioning"]["embedding"] == "dense-vit-pooled"
    assert (out / "conditioning.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "embedding = dense-vit-pooled" in printed and "texture PSNR" in printed
    # Re-running resumes every stage from its final checkpoint instead of training again.
    assert main(["demo", "--out", str(out), "--identities", "9", "--steps", "2"]) == 0


def test_demo_rejects_too_few_identities(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--identities", "3"]) == 2
    assert "--identities must be >= 9" in capsys.readouterr().err
