"""Configs from YAML + ``key=value`` overrides (agdo/config.py), exercised on ``SFTConfig``."""

from __future__ import annotations

import json

import pytest

from agdo.config import build_config, parse_overrides, save_config
from agdo.training.sft import SFTConfig


def _yaml(tmp_path, text: str):
    path = tmp_path / "sft.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_then_defaults(tmp_path):
    path = _yaml(tmp_path, "method: random\nlearning_rate: 0.0001\nper_device_train_batch_size: 8\ngamma: 50\n")
    config = build_config(SFTConfig, path, ["learning_rate=2e-5", "max_steps=7", "resume_from_checkpoint=latest"])
    assert config.method == "random"  # from the file
    assert config.learning_rate == 2e-5 and isinstance(config.learning_rate, float)  # override beats the file
    assert config.per_device_train_batch_size == 8 and config.max_steps == 7
    assert config.gamma == 50.0 and isinstance(config.gamma, float)  # YAML int into a float field
    assert config.resume_from_checkpoint == "latest"
    assert config.seed == SFTConfig().seed  # untouched fields keep their defaults
    assert build_config(SFTConfig, path, ["method=agdo"]).method == "agdo"


def test_later_override_wins_and_none():
    config = build_config(SFTConfig, None, ["max_steps=3", "max_steps=5", "block_size=", "max_steps_per_sample=null"])
    assert config.max_steps == 5 and config.block_size is None and config.max_steps_per_sample is None
    assert build_config(SFTConfig, None, ["block_size=4"]).block_size == 4  # Optional[int]


@pytest.mark.parametrize("text", ["1e-5", "1E-5", "1.0e-5", "0.00001"])
def test_scientific_notation_is_a_float(tmp_path, text):
    # PyYAML follows YAML 1.1, where `1e-5` (no dot) is a STRING: it must still become a float.
    assert build_config(SFTConfig, None, [f"learning_rate={text}"]).learning_rate == pytest.approx(1e-5)
    assert build_config(SFTConfig, _yaml(tmp_path, f"learning_rate: {text}\n")).learning_rate == pytest.approx(1e-5)


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown SFTConfig field\(s\) \['lr'\]"):
        build_config(SFTConfig, None, ["lr=1e-5"])
    with pytest.raises(ValueError, match="num_epochs"):
        build_config(SFTConfig, _yaml(tmp_path, "num_epochs: 3\n"))


@pytest.mark.parametrize(
    "override",
    [
        "per_device_train_batch_size=abc",
        "per_device_train_batch_size=2.5",
        "per_device_train_batch_size=true",  # a bool is not an int here
        "learning_rate=fast",
        "learning_rate=true",
        "learning_rate=[1, 2]",
        "method=3",
    ],
)
def test_type_errors(override):
    with pytest.raises(TypeError, match=f"config `{override.split('=')[0]}` must be"):
        build_config(SFTConfig, None, [override])


def test_malformed_inputs(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["learning_rate"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["=3"])
    with pytest.raises(ValueError, match="mapping"):
        build_config(SFTConfig, _yaml(tmp_path, "- a\n- b\n"))
    assert build_config(SFTConfig, _yaml(tmp_path, "")) == SFTConfig()  # an empty file is all defaults


def test_validation_runs_after_building():
    with pytest.raises(ValueError, match="block_size"):
        build_config(SFTConfig, None, ["method=blockwise"])


def test_saved_config_round_trips(tmp_path):
    config = build_config(SFTConfig, None, ["method=blockwise", "block_size=4", "learning_rate=3e-6"])
    save_config(config, tmp_path / "config.json")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert build_config(SFTConfig, None, [f"{k}={json.dumps(v)}" for k, v in saved.items()]) == config
