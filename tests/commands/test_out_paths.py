"""Every `fica` verb's output path (`--out`, `inspect --png`) that cannot be written: one
`error: ...` line naming it, exit code 2, no traceback, nothing written.

The path is checked before the verb reads any input (`fica_jax.commands.main.run`), so the
inputs here need not exist: the error has to be about the output, not about the missing run,
models or data, which is also what proves no slow work (loading models, training) came first.
The unwritable locations hold as root too: a path under a regular file fails for everyone,
while a read-only folder is skipped where permission bits do not bind.
"""

import os
import subprocess
import sys

import pytest

from fica_jax.commands.main import main

# verb -> argv with {out} for the output path and {x} for an input that does not exist
VERBS = {
    "render": ["render", "--avatar", "{x}", "--out", "{out}.gif", "--turntable"],
    "avatar": ["avatar", "--run", "{x}", "--data", "{x}", "--out", "{out}"],
    "generate": ["generate", "--image", "{x}.png", "--models", "{x}", "--out", "{out}"],
    "export": ["export", "--run", "{x}", "--out", "{out}"],
    "eval": ["eval", "--models", "{x}", "--data", "{x}", "--out", "{out}"],
    "sample": ["sample", "--run", "{x}", "--data", "{x}", "--out", "{out}"],
    "plan": ["plan", "--config", "configs/toy.py", "--mesh", "data=1", "--out", "{out}.json"],
    "demo": ["demo", "--quick", "--out", "{out}"],
    "data synth": ["data", "synth", "--identities", "2", "--out", "{out}"],
    "data convert": ["data", "convert", "--src", "{x}", "--out", "{out}"],
    "data cache": ["data", "cache", "--data", "{x}", "--vae", "{x}", "--out", "{out}"],
    "data tfds": ["data", "tfds", "{x}", "--out", "{out}"],
    "data inspect": ["data", "inspect", "{x}", "--png", "{out}.png"],
}


def _unwritable(tmp_path, kind: str):
    if kind == "under_file":
        (tmp_path / "afile").write_text("not a folder")
        return tmp_path / "afile" / "sub" / "out"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "out"


def _tree(root):
    return {p: p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


@pytest.mark.parametrize("kind", ["under_file", "read_only"])
@pytest.mark.parametrize("verb", VERBS)
def test_unwritable_output_is_one_line(verb, kind, tmp_path, capsys):
    out = _unwritable(tmp_path, kind)
    argv = [a.format(out=out, x=tmp_path / "missing") for a in VERBS[verb]]
    path = next(a for a in argv if a.startswith(str(out)))
    before = _tree(tmp_path)
    try:
        assert main(argv) == 2
    finally:
        if kind == "read_only":
            out.parent.chmod(0o755)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: cannot write {path}: ") and "Traceback" not in err, err
    assert _tree(tmp_path) == before, "nothing written"


@pytest.mark.multiprocess
def test_render_to_unwritable_gif_exits_2_from_the_entry_point(tmp_path):
    """The reported case end to end: the `fica` process, not just `main()`."""
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "x.gif"
    code = "import sys; from fica_jax.commands.main import main; sys.exit(main())"
    argv = ["render", "--avatar", str(tmp_path / "missing"), "--out", str(out), "--turntable"]
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        f"error: cannot write {out}: {out.parent} is not a folder; expected a writable output "
        "location"
    ]
