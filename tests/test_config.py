import subprocess
import sys

import pytest

from vitcae_ray.config import ConfigError, build_config, dump_yaml, from_dict, resolve


def test_precedence_yaml_then_flags_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1.0e-2\ntrain:\n  epochs: 7\n  batch_size: 16\n")
    cfg = resolve(str(path), {"train.epochs": 9, "train.seed": None}, ["train.batch_size=8"])
    assert cfg.optim.lr == 1e-2 and cfg.train.epochs == 9 and cfg.train.batch_size == 8
    assert cfg.train.seed == 0  # a flag left as None keeps the lower layer's value


def test_preset_then_explicit_model_keys_and_roundtrip():
    cfg = resolve(None, {}, ["model.depth=3", "model.preset=small", "optim.lr=3e-4"])
    assert cfg.model.embed_dim == 384 and cfg.model.depth == 3 and cfg.optim.lr == 3e-4
    assert from_dict(cfg.to_dict()) == cfg
    import yaml
    assert build_config(yaml.safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize("item, key", [
    ("model.depht=3", "model.depht"),
    ("nope.x=1", "nope.x"),
    ("model.depth=three", "model.depth"),
    ("train.gpu=2", "train.gpu"),
    ("loss.mmd_scales=4", "loss.mmd_scales"),
    ("model.embed_dim=65", "model.embed_dim"),
    ("model.preset=huge", "model.preset"),
])
def test_bad_keys_and_values_are_one_line_errors_naming_the_key(item, key):
    with pytest.raises(ConfigError) as e:
        resolve(None, {}, [item])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_cli_bad_key_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "vitcae_ray.train", "--set", "optim.lrr=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lrr" in lines[0], proc.stderr


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(str(tmp_path / "missing.yaml"), {}, [])
