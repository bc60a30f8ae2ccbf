"""Configs: dataclasses filled from a YAML file, then ``key=value`` overrides from the command line.

Field names follow what users of TRL and the dLLM codebases already know (``learning_rate``,
``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``num_generations``, ``beta``, ...).
Unknown keys are errors, never silently ignored; values are parsed as YAML scalars (``1e-6``, ``true``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

ConfigT = TypeVar("ConfigT")


def _coerce(name: str, value: Any, annotation) -> Any:
    """Check a value against a field's annotation (int/float/str/bool/Optional/list/tuple)."""
    origin = get_origin(annotation)
    if origin is Union:
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, options[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config `{name}` must be a list, got {value!r}")
        return origin(value)
    if annotation is float:
        # YAML 1.1 (PyYAML) reads `1e-5` (no dot) as a string: accept any text float() parses.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError(f"config `{name}` must be float, got {value!r}")
    if annotation in (int, str, bool) and not (isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))):
        raise TypeError(f"config `{name}` must be {annotation.__name__}, got {value!r}")
    return value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["learning_rate=1e-5", "gamma=50"]`` → ``{"learning_rate": 1e-05, "gamma": 50}``."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return parsed


def build_config(cls: type[ConfigT], path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> ConfigT:
    """Instantiate ``cls`` from a YAML file (optional) and ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of field: value")
        values.update(loaded)
    values.update(parse_overrides(overrides))
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")
    return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})


def save_config(config, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True) + "\n")
