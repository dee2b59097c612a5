"""Config loading and `--config.key=value` overrides."""

import pytest

from fica_jax.config import apply_overrides, load_config
from fica_jax.errors import UserError

CONFIG = """
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.variant = arg or "base"
    c.train = ml_collections.ConfigDict(dict(steps=10, lr=1e-3, bf16=False, mesh=(1, 2)))
    return c
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "demo.py"
    path.write_text(CONFIG)
    return path


def test_load_with_arg_and_typed_overrides(cfg_file):
    cfg = load_config(
        f"{cfg_file}:tiny",
        [
            "--config.train.steps=5",
            "--config.train.lr=1",
            "--config.train.bf16=true",
            "--config.train.mesh=(2,4)",
        ],
    )
    assert cfg.variant == "tiny"
    assert cfg.train.steps == 5 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.bf16 is True
    assert cfg.train.mesh == (2, 4)


def test_unknown_key_names_key_and_suggests(cfg_file):
    with pytest.raises(UserError, match=r"unknown config key 'train\.step'.*train\.steps"):
        load_config(str(cfg_file), ["--config.train.step=3"])


def test_wrong_type_is_a_clear_error(cfg_file):
    with pytest.raises(UserError, match=r"train\.steps=abc: expected a int"):
        load_config(str(cfg_file), ["--config.train.steps=abc"])


def test_missing_config_file_lists_shipped_configs():
    with pytest.raises(UserError, match="not found"):
        load_config("does/not/exist.py")


def test_group_override_rejected(cfg_file):
    cfg = load_config(str(cfg_file))
    with pytest.raises(UserError, match="is a group"):
        apply_overrides(cfg, ["--config.train=1"])


# The training schedule every shipped config ends with (configs/common.py apply_schedule), as the
# configs set it by hand before it was shared: batch, steps, lr, warm-up, log / checkpoint / eval
# intervals, compute dtype, remat policy.
SCHEDULES = {
    "dense:base": (64, 50000, 1e-4, 500, 100, 1000, 0, "bfloat16", "full"),
    "dense:paper": (512, 50000, 5e-05, 500, 100, 1000, 0, "bfloat16", "full"),
    "dense:tiny": (8, 400, 1e-3, 40, 25, 100, 0, "float32", "none"),
    "dit:base": (64, 50000, 1e-4, 1000, 100, 1000, 0, "bfloat16", "full"),
    "dit:paper": (128, 50000, 1e-4, 1000, 100, 1000, 0, "bfloat16", "dots_saveable"),
    "dit:paper1024": (128, 50000, 1e-4, 1000, 100, 1000, 0, "bfloat16",
                      "dots_with_no_batch_dims_saveable"),
    "dit:tiny": (8, 300, 1e-3, 30, 20, 100, 0, "float32", "none"),
    "refiner:paper": (128, 50000, 1e-4, 500, 100, 5000, 5000, "bfloat16", "none"),
    "refiner:tiny": (8, 300, 1e-3, 30, 25, 100, 100, "float32", "none"),
    "toy:tiny": (16, 200, 3e-3, 5, 10, 50, 0, "float32", "none"),
    "toy:wide": (16, 200, 3e-3, 5, 10, 50, 0, "float32", "none"),
    "upm:paper": (128, 800000, 5e-4, 500, 100, 5000, 0, "bfloat16", "none"),
    "upm:tiny": (8, 300, 1e-3, 30, 25, 100, 0, "float32", "none"),
    "vae:base": (64, 50000, 1e-4, 100, 100, 1000, 0, "float32", "none"),
    "vae:paper": (128, 50000, 1e-5, 100, 100, 1000, 0, "bfloat16", "full"),
    "vae:tiny": (8, 300, 1e-3, 30, 25, 100, 0, "float32", "none"),
}  # fmt: skip


@pytest.mark.parametrize("name", [*SCHEDULES, "dit:tiny-rgb", "dit:paper-maps"])
def test_shipped_config_schedules(name):
    stage, arg = name.split(":")
    c = load_config(f"configs/{stage}.py:{arg}")
    got = (c.data.batch_size, c.train.steps, c.optim.lr, c.optim.warmup_steps,
           c.train.log_every, c.train.ckpt_every, c.train.eval_every, c.train.compute_dtype,
           c.train.remat)  # fmt: skip
    assert got == SCHEDULES[name.partition("-")[0]]
