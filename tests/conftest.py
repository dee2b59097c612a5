"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
