"""Experiment configs: YAML files whose sections fill the stages' dataclass configs.

Unknown keys are errors (a typo in a config must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def load_yaml(path: str | os.PathLike) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields."""
    data = dict(data or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in config section {where or cls.__name__}; "
                          f"allowed: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        sub = hints[name]
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            data[name] = from_dict(sub, value, f"{where}.{name}" if where else name)
    return cls(**data)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
