"""Config loading and `--config.key=value` overrides."""

import pytest

from fica_jax.config import apply_overrides, load_config
from fica_jax.errors import UserError

CONFIG = '''
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.variant = arg or "base"
    c.train = ml_collections.ConfigDict(dict(steps=10, lr=1e-3, bf16=False, mesh=(1, 2)))
    return c
'''


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "demo.py"
    path.write_text(CONFIG)
    return path


def test_load_with_arg_and_typed_overrides(cfg_file):
    cfg = load_config(
        f"{cfg_file}:tiny",
        ["--config.train.steps=5", "--config.train.lr=1", "--config.train.bf16=true",
         "--config.train.mesh=(2,4)"],
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
