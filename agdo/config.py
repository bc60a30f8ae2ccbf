"""Configs: dataclasses filled from a YAML file, then ``key=value`` overrides from the command line.

Field names follow what users of TRL and the dLLM codebases already know (``learning_rate``,
``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``num_generations``, ``beta``, ...).
Unknown keys are errors, never silently ignored; values are parsed as YAML scalars (``1e-6``, ``true``).
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Any, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

ConfigT = TypeVar("ConfigT")


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(name: str, value: Any, annotation) -> Any:
    """Check a value against a field's annotation (int/float/str/bool/Optional/Union/list/tuple/Any).

    ``list[X]``/``tuple[X, ...]`` check every element against ``X`` (errors name ``field[i]``); a bare
    ``list``/``tuple`` only checks the container. A string, a dict or a scalar is never a list.
    """
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if origin is Union or origin is types.UnionType:
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            if len(options) == len(get_args(annotation)):
                raise TypeError(f"config `{name}` must be {_type_name(annotation)}, got None")
            return None
        errors = []
        for option in options:
            try:
                return _coerce(name, value, option)
            except TypeError as error:
                errors.append(str(error))
        if len(errors) == 1:
            raise TypeError(errors[0])
        raise TypeError(f"config `{name}` must be one of {[_type_name(o) for o in options]}, got {value!r}")
    if annotation in (list, tuple) or origin in (list, tuple):
        container = origin or annotation
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config `{name}` must be a list, e.g. {name}=[a, b]; got {type(value).__name__} {value!r}")
        args = get_args(annotation)
        if not args:
            return container(value)
        if container is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise TypeError(f"config `{name}` must be a list of {len(args)} items, got {value!r}")
            return tuple(_coerce(f"{name}[{i}]", item, arg) for i, (item, arg) in enumerate(zip(value, args)))
        return container(_coerce(f"{name}[{i}]", item, args[0]) for i, item in enumerate(value))
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


def coerce_fields(config) -> None:
    """Check (and convert, e.g. int → float) every field of a config dataclass against its annotation.

    For ``__post_init__``: a config built in Python gets the same type errors as one built from YAML.
    """
    hints = get_type_hints(type(config))
    for field in dataclasses.fields(config):
        if field.name in hints:
            object.__setattr__(config, field.name, _coerce(field.name, getattr(config, field.name), hints[field.name]))


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["learning_rate=1e-5", "gamma=50"]`` → ``{"learning_rate": 1e-05, "gamma": 50}``."""
    parsed = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: the value is not valid YAML ({error})") from None
    return parsed


def build_config(cls: type[ConfigT], path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> ConfigT:
    """Instantiate ``cls`` from a YAML file (optional) and ``key=value`` overrides."""
    values: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"config file not found: {path}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"config file {path} is not valid UTF-8: {error}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping of field: value")
        bad_keys = [key for key in loaded if not isinstance(key, str)]
        if bad_keys:
            raise ValueError(f"config file {path}: keys must be field names, got {bad_keys}")
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
