"""Configs from YAML + ``key=value`` overrides (agdo/config.py), exercised on ``SFTConfig``."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agdo.cli import AnalyzeConfig
from agdo.config import build_config, coerce_fields, parse_overrides, save_config
from agdo.eval import EvalConfig
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


# --- list fields: elements are checked; a scalar, a string or a mapping is never a list --------------


@dataclasses.dataclass
class _Lists:
    ints: list[int] = dataclasses.field(default_factory=list)
    floats: tuple[float, ...] = ()
    pair: tuple[int, str] = (0, "a")
    names: list[str] | None = None  # a types.UnionType annotation
    anything: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        coerce_fields(self)


@pytest.mark.parametrize(
    "override, error",
    [
        ("ints=3", r"config `ints` must be a list, e\.g\. ints=\[a, b\]; got int 3"),
        ("ints=abc", r"config `ints` must be a list, .*got str 'abc'"),
        ("ints={a: 1}", r"config `ints` must be a list, .*got dict"),
        ("ints=[1, two]", r"config `ints\[1\]` must be int, got 'two'"),
        ("ints=[1, true]", r"config `ints\[1\]` must be int, got True"),
        ("ints=[1, 2.5]", r"config `ints\[1\]` must be int, got 2\.5"),
        ("floats=[1, x]", r"config `floats\[1\]` must be float, got 'x'"),
        ("pair=[1]", r"config `pair` must be a list of 2 items"),
        ("pair=[1, 2]", r"config `pair\[1\]` must be str, got 2"),
        ("names=[a, [b]]", r"config `names\[1\]` must be str"),
        ("anything=7", r"config `anything` must be a list"),
    ],
)
def test_list_fields_check_their_elements(override, error):
    with pytest.raises(TypeError, match=error):
        build_config(_Lists, None, [override])


def test_list_fields_convert_and_accept():
    config = build_config(_Lists, None, ["ints=[1, 2]", "floats=[1, 2e-3]", "pair=[3, b]", "names=null", "anything=[1, x]"])
    assert config == _Lists(ints=[1, 2], floats=(1.0, 0.002), pair=(3, "b"), names=None, anything=[1, "x"])
    assert isinstance(config.floats[0], float)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"seeds": 3}, TypeError, r"config `seeds` must be a list"),
        ({"benchmarks": "gsm8k"}, TypeError, r"config `benchmarks` must be a list"),
        ({"algs": {"max_prob": 1}}, TypeError, r"config `algs` must be a list"),
        ({"seeds": [0, "1"]}, TypeError, r"config `seeds\[1\]` must be int"),
        ({"seeds": []}, ValueError, r"EvalConfig: `seeds` is empty"),
        ({"benchmarks": []}, ValueError, r"EvalConfig: `benchmarks` is empty"),
        ({"algs": []}, ValueError, r"EvalConfig: `algs` is empty"),
        ({"seeds": [0, 0]}, ValueError, r"EvalConfig: `seeds` repeats"),
        ({"benchmarks": ["mmlu"]}, ValueError, r"EvalConfig: unknown `benchmarks` \['mmlu'\]"),
        ({"algs": ["fastest"]}, ValueError, r"EvalConfig \(algs entry 'fastest'\): .*alg must be one of"),
        ({"limit": -1}, ValueError, r"EvalConfig: `limit` must be >= 1 or null"),
        ({"limit": 0}, ValueError, r"EvalConfig: `limit` must be >= 1 or null"),
        ({"batch_size": 0}, ValueError, r"EvalConfig: `batch_size` must be >= 1"),
        ({"gen_length": 0}, ValueError, r"gen_length must be >= 1"),
        ({"steps": 7, "gen_length": 16, "block_length": 4}, ValueError, r"steps must be a positive multiple"),
        ({"temperature": "hot"}, TypeError, r"config `temperature` must be float"),
    ],
)
def test_eval_config_validates_in_post_init(change, error, message):
    with pytest.raises(error, match=message):
        EvalConfig(**change)


def test_eval_config_defaults_and_conversion():
    config = EvalConfig(temperature=1, seeds=[3, 4], limit=None)
    assert config.temperature == 1.0 and isinstance(config.temperature, float)
    assert config.sampler_config("max_s").alg == "max_s"


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"benchmark": ["gsm8k"]}, TypeError, r"config `benchmark` must be str"),
        ({"benchmark": "mmlu"}, ValueError, r"AnalyzeConfig: unknown `benchmark` 'mmlu'"),
        ({"limit": 0}, ValueError, r"AnalyzeConfig: `limit` must be >= 1"),
        ({"limit": None}, TypeError, r"config `limit` must be int, got None"),
        ({"alg": "fastest"}, ValueError, r"AnalyzeConfig: .*alg must be one of"),
        ({"steps": 0}, ValueError, r"AnalyzeConfig: .*steps must be a positive multiple"),
    ],
)
def test_analyze_config_validates_in_post_init(change, error, message):
    with pytest.raises(error, match=message):
        AnalyzeConfig(**change)


def test_broken_yaml_file_is_named(tmp_path):
    path = _yaml(tmp_path, "learning_rate: [1, 2\n")
    with pytest.raises(ValueError, match=r"sft\.yaml is not valid YAML"):
        build_config(SFTConfig, path)
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*missing\.yaml"):
        build_config(SFTConfig, tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match=r"override 'seed=\[1': the value is not valid YAML"):
        parse_overrides(["seed=[1"])
