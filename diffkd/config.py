"""Experiment configs: YAML files whose sections fill the stages' dataclass configs.

Unknown keys are errors (a typo in a config must not silently fall back to a default). A dataclass
whose section once had another layout defines ``upgrade_layout(data, where) -> data``: `from_dict`
calls it first, and it rewrites the old layout into the current one with a `deprecated_layout` warning.
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


# The student's distillation section before the loss registry: flat keys -> (term, option) of `distill.terms`.
FLAT_DISTILL_KEYS: dict[str, tuple[str, str]] = {
    "alpha": ("logit", "weight"),
    "temperature": ("logit", "temperature"),
    "feature_weight": ("feature", "weight"),
    "feature_kind": ("feature", "kind"),
    "pro_weight": ("gkd_pro", "weight"),
    "pro_queries": ("gkd_pro", "num_queries"),
    "pro_heads": ("gkd_pro", "num_heads"),
    "pro_distinct_weight": ("gkd_pro", "distinct_weight"),
    "den_weight": ("gkd_den", "weight"),
    "den_temperature": ("gkd_den", "temperature"),
    "den_warmup_epochs": ("gkd_den", "warmup_epochs"),
}
# What the flat layout meant when a key was left out (only the logit term was on by default).
FLAT_DISTILL_DEFAULTS = {"alpha": 0.9, "temperature": 4.0}


def flat_distill_to_terms(flat: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """The `distill.terms` equivalent of an old flat `distill` section (see FLAT_DISTILL_KEYS).

    A term is kept when its weight is positive or was written out (so a search space can still
    address it); options of a term that is not kept are dropped.
    """
    unknown = sorted(set(flat) - set(FLAT_DISTILL_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in config section {where} (old flat layout); "
                          f"write the section as `terms: {{name: {{weight: ..., ...}}}}`")
    values = {**FLAT_DISTILL_DEFAULTS, **flat}
    terms: dict[str, dict[str, Any]] = {}
    for key, (term, option) in FLAT_DISTILL_KEYS.items():
        if key in values:
            terms.setdefault(term, {})[option] = values[key]
    return {name: options for name, options in terms.items()
            if options.get("weight", 0) > 0 or FLAT_DISTILL_KEYS_BY_TERM[name] in flat}


FLAT_DISTILL_KEYS_BY_TERM = {term: key for key, (term, option) in FLAT_DISTILL_KEYS.items() if option == "weight"}


def flat_distill_path(path: str) -> str | None:
    """`distill.terms.<term>.<option>` for an old dotted path `distill.<flat key>`, else None."""
    prefix, _, key = path.partition(".")
    if prefix != "distill" or key not in FLAT_DISTILL_KEYS:
        return None
    term, option = FLAT_DISTILL_KEYS[key]
    return f"distill.terms.{term}.{option}"


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
