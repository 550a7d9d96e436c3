import dataclasses
import pickle
import subprocess
import sys

import pytest
import yaml

from vitcae_ray.config import (
    MODEL_PRESETS,
    PROJECT_ROOT,
    Config,
    ConfigError,
    ModelConfig,
    TrainConfig,
    build_config,
    dump_yaml,
    from_dict,
    reference_markdown,
    resolve,
)


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
    assert build_config(yaml.safe_load(dump_yaml(cfg))) == cfg


@pytest.mark.parametrize(
    "item, key",
    [
        ("model.depht=3", "model.depht"),
        ("nope.x=1", "nope.x"),
        ("model.depth=three", "model.depth"),
        ("train.gpu=2", "train.gpu"),
        ("loss.mmd_scales=4", "loss.mmd_scales"),
        ("model.embed_dim=65", "model.embed_dim"),
        ("model.preset=huge", "model.preset"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors_naming_the_key(item, key):
    with pytest.raises(ConfigError) as e:
        resolve(None, {}, [item])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_cli_bad_key_exits_2_with_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "vitcae_ray.train", "--set", "optim.lrr=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lrr" in lines[0], proc.stderr


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve(str(tmp_path / "missing.yaml"), {}, [])


@pytest.mark.parametrize(
    "item, value",
    [
        ("optim.lr=1e-3", 1e-3),  # YAML 1.1 reads 1e-3 as a string
        ("optim.lr=3", 3.0),
        ("train.run_name=2024", "2024"),
        ("data.root=null", None),
        ("loss.mmd_scales=[1, 2e-1]", (1.0, 0.2)),
        ("train.gpu=true", True),
    ],
)
def test_values_are_converted_where_the_type_allows(item, value):
    dotted, _ = item.split("=")
    section, name = dotted.split(".")
    got = getattr(getattr(resolve(None, {}, [item]), section), name)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "item, message",
    [
        ("train.epochs=0", "config key 'train.epochs' must be > 0, got 0"),
        ("train.gpu=1", "config key 'train.gpu' expects bool, got 1"),
        ("model.depth=3.0", "config key 'model.depth' expects int, got 3.0"),
        ("model.depth='3'", "config key 'model.depth' expects int, got '3'"),
        ("optim.lr=true", "config key 'optim.lr' expects float, got True"),
        ("train.output=null", "config key 'train.output' expects str, got None"),
        ("data.val_fraction=1", "config key 'data.val_fraction' must be in (0, 1), got 1.0"),
        ("optim.lr=nan", "config key 'optim.lr' must be > 0, got nan"),
        ("data.channels=2", "config key 'data.channels' must be 0, 1 or 3, got 2"),
        ("data.channels=true", "config key 'data.channels' expects int, got True"),
        (
            "freeze.mode=detach",
            "config key 'freeze.mode' was removed (a frozen head always runs its forward without "
            "autograd; see docs/freezing.md): drop it",
        ),
        (
            "freeze.drift_threshold=0.1",
            "config key 'freeze.drift_threshold' was renamed: use 'freeze.drift_ratio'",
        ),
        ("loss.mmd_scales=[]", "config key 'loss.mmd_scales' must be non-empty, each > 0, got []"),
        (
            "loss.mmd_scales=[1, 0]",
            "config key 'loss.mmd_scales' must be non-empty, each > 0, got [1.0, 0.0]",
        ),
        ("loss.mmd_scales=4", "config key 'loss.mmd_scales' expects list of float, got 4"),
        ("train.max_failures=-2", "config key 'train.max_failures' must be >= -1, got -2"),
        ("model.variant=vae", "config key 'model.variant' must be vitcae or vitvae, got 'vae'"),
        ("loss.elbo_samples=0", "config key 'loss.elbo_samples' must be >= 1, got 0"),
        (
            "train.select_metric=val/loss",
            "config key 'train.select_metric' must be val/elbo or val/mse, got 'val/loss'",
        ),
        (
            "data.image_size=30",
            "config key 'data.image_size' (30) must be a multiple of model.patch_size (4)",
        ),
    ],
)
def test_bad_values_say_what_the_key_expects(item, message):
    with pytest.raises(ConfigError) as e:
        resolve(None, {}, [item])
    assert str(e.value) == message


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"scheduler.alpha": 1.0}, "config key 'scheduler.alpha' was renamed: use 'temperature.alpha'"),
        (
            {"scheduler": {"enabled": False}},
            "config key 'scheduler.enabled' was renamed: use 'temperature.enabled'",
        ),
        (
            {"loss": {"warmup_epochs": 2}},
            "config key 'loss.warmup_epochs' was renamed: use 'loss.kl_warmup_epochs'",
        ),
    ],
)
def test_renamed_keys_name_the_new_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config(overrides)
    assert str(e.value) == message
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(overrides))
    with pytest.raises(ConfigError, match="was renamed"):
        resolve(str(path), {}, [])
    assert build_config({"optim.warmup_epochs": 2}).optim.warmup_epochs == 2.0  # the LR warm-up kept its name


def test_configs_are_frozen_hashable_dataclasses():
    cfg = build_config({"model.preset": "small"})
    assert hash(cfg) == hash(build_config({"model.preset": "small"}))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert [f.default for f in dataclasses.fields(TrainConfig)][:2] == [30, 32]
    assert dataclasses.replace(cfg.train, epochs=3).epochs == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3  # type: ignore[misc]
    for name, values in MODEL_PRESETS.items():
        assert build_config({"model.preset": name}).model == ModelConfig(preset=name, **values)


def test_docs_config_md_is_the_generated_reference():
    text = (PROJECT_ROOT / "docs" / "config.md").read_text()
    assert text == reference_markdown(), (
        "docs/config.md is out of date: regenerate it with `python -m vitcae_ray.config > docs/config.md`"
    )
    for f in dataclasses.fields(Config):
        for name in dataclasses.fields(f.default_factory):
            assert f"`{f.name}.{name.name}`" in text


def test_select_metric_default_is_the_exported_constant():
    from vitcae_ray.config import SELECT_METRIC, build_config

    assert build_config({}).train.select_metric == SELECT_METRIC == "val/elbo"


def test_a_saved_config_without_a_newer_key_rebuilds_what_it_trained(tmp_path):
    """A model saved before ``model.dec_conv`` existed had the linear head: its config
    rebuilds with 0, not today's default, and its weights load; a run directory holding such
    a run refuses today's default by name instead of failing on the weights."""
    import yaml

    from vitcae_ray import checkpoints
    from vitcae_ray.config import SAVED_WITHOUT, ConfigError, from_dict
    from vitcae_ray.model import build_model
    from vitcae_ray.outputs import CONFIG_FILE, check_run_dir

    assert build_config({}).model.dec_conv > 0
    old = build_config({"model.dec_conv": 0}).to_dict()
    del old["model"]["dec_conv"]
    assert from_dict(old).model.dec_conv == SAVED_WITHOUT["model.dec_conv"] == 0
    assert from_dict({**old, "model": {**old["model"], "dec_conv": 8}}).model.dec_conv == 8
    model = build_model(from_dict(old).model, 32, 1)
    state = {"config": old, "model": model.state_dict(), "model_args": {"img_size": 32, "in_chans": 1}}
    assert checkpoints.model_from_state(state).dec_conv is None
    (tmp_path / CONFIG_FILE).write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="model.dec_conv=0 \\(now 16\\)"):
        check_run_dir(str(tmp_path), build_config({}))


def test_one_line_errors_keep_the_line_a_colon_announces():
    from vitcae_ray.errors import first_line

    assert first_line(ValueError("bad key 'x'\nmore detail")) == "bad key 'x'"
    assert first_line(RuntimeError("")) == "RuntimeError"
    torch_style = (
        "Error(s) in loading state_dict for ViTCAE:\n\tsize mismatch for dec_pred.weight: a, b.\n\tmore"
    )
    assert first_line(RuntimeError(torch_style)) == (
        "Error(s) in loading state_dict for ViTCAE: size mismatch for dec_pred.weight: a, b."
    )
