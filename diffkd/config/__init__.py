"""Reading configs: YAML files whose sections fill the stages' dataclass configs.

This module is the bottom layer every stage may import: `load_yaml`, `from_dict` (unknown keys are
errors: a typo must not silently fall back to a default), `to_dict`, and the deprecation warning for
old layouts; sections' layouts of the previous release are in `diffkd.config.legacy`. Nothing here
knows a stage: the experiment schema that names the sections, and the one reader every command uses,
are a layer up in `diffkd.experiments.experiment`.

A dataclass whose section once had another layout defines ``upgrade_layout(data, where) -> data``:
`from_dict` calls it first, and it rewrites the old layout into the current one with a warning.
"""
from __future__ import annotations

import dataclasses
import os
import typing
import warnings
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


class LayoutDeprecationWarning(FutureWarning):
    """A config (or search space) uses a layout that is still read but will be dropped in the next release.

    A FutureWarning, so that users see it by default (DeprecationWarning is hidden outside __main__).
    """


def deprecated_layout(message: str) -> None:
    warnings.warn(message, LayoutDeprecationWarning, stacklevel=3)


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
    upgrade = getattr(cls, "upgrade_layout", None)
    if upgrade is not None:
        data = upgrade(data, where or cls.__name__)
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
