"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache for the session and the subprocesses it starts (exports, CLI runs):
# many tests compile the same tiny programs, and a fresh folder keeps every run alike.
from fica_jax.commands.main import use_compilation_cache  # noqa: E402  (imports no framework)

_XLA_CACHE = tempfile.mkdtemp(prefix="fica-test-xla-")
use_compilation_cache(_XLA_CACHE)
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic capture dataset shared by the stage tests: 9 identities at 32 px / 32
    UV texels with one dome frame (identity 7 is the held-out test identity)."""
    from data_pipelines.synth import synthesize
    from data_pipelines.synthetic.generator import SynthConfig

    out = tmp_path_factory.mktemp("synth") / "data"
    cfg = SynthConfig(uv_resolution=32, image_size=32, n_frames=1)
    synthesize(out, 9, cfg, seed=0, workers=1, progress=False)
    return out


@pytest.fixture(scope="session")
def pipeline(synth_dir, tmp_path_factory):
    """Untrained runs of every stage saved on the 8-device mesh, exported by a 1-device process
    (tests/pipeline_fixture.py): dict(root, runs, models, stdout)."""
    from tests.pipeline_fixture import export_all, pipeline_runs

    root = tmp_path_factory.mktemp("pipeline")
    runs, _ = pipeline_runs(root, synth_dir)
    stdout = export_all(root, runs)
    return {"root": root, "runs": runs, "models": root / "models", "stdout": stdout}


def pytest_collection_modifyitems(items):
    """A test on the `pipeline` fixture starts a process (the 1-device export): `multiprocess`."""
    for item in items:
        if "pipeline" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.multiprocess)
