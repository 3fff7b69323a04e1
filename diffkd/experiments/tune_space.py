"""Search spaces as YAML (`tune_spaces/*.yaml`): distributions over dotted config paths, scheduler, searcher.

Kept apart from `diffkd/experiments/tune.py` so the CLI and tests can read and check a space without importing Ray.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from diffkd.config import ConfigError, from_dict, load_yaml
from diffkd.config.legacy import upgrade_space_path

DISTRIBUTIONS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None}
SCHEDULERS = ("asha", "fifo")
SEARCHERS = ("optuna", "random")
# Only internal-validation metrics can be objectives; the test split never reaches a trial anyway.
OBJECTIVE_PREFIX = "val_"


@dataclass(frozen=True)
class Distribution:
    kind: str
    args: tuple

    @classmethod
    def parse(cls, name: str, spec: Any, where: str) -> "Distribution":
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{where}: parameter {name!r} must be one mapping like {{loguniform: [1, 10]}}, "
                              f"got {spec!r}")
        (kind, args), = spec.items()
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: parameter {name!r} has unknown distribution {kind!r}; "
                              f"known: {', '.join(DISTRIBUTIONS)}")
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: parameter {name!r}: {kind} needs a list of values, got {args!r}")
        arity = DISTRIBUTIONS[kind]
        if arity is not None and len(args) != arity:
            raise ConfigError(f"{where}: parameter {name!r}: {kind} takes {arity} numbers, got {args!r}")
        if kind != "choice":
            if not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{where}: parameter {name!r}: {kind} bounds must be numbers, got {args!r}")
            low, high = args[0], args[1]
            if not low < high:
                raise ConfigError(f"{where}: parameter {name!r}: low {low} must be below high {high}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: parameter {name!r}: loguniform needs low > 0, got {low}")
        return cls(kind, tuple(args))

    def to_ray(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.args
        low, high = self.args[0], self.args[1]
        return low <= value < high if self.kind == "randint" else low - 1e-12 <= value <= high + 1e-12

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    @property
    def highest(self) -> Any:
        """The largest value a draw can take."""
        if self.kind == "choice":
            return max(self.args)
        return self.args[1] - 1 if self.kind == "randint" else self.args[1]


@dataclass
class SchedulerSpec:
    name: str = "asha"
    grace_period: int = 1  # epochs every trial runs before ASHA may stop it
    reduction_factor: float = 2.0


@dataclass
class SearchSpec:
    name: str = "optuna"
    seed: int = 0


@dataclass
class TuneSpace:
    params: dict[str, Distribution]
    objective: str = "val_auc"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent_trials: int | str = "auto"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    source: str = ""

    def ray_param_space(self) -> dict[str, Any]:
        return {name: dist.to_ray() for name, dist in self.params.items()}

    def max_epochs(self, base_epochs: int) -> int:
        """The most epochs a trial can run: the base config's, or more where the space searches `loop.epochs`."""
        searched = self.params.get("loop.epochs")
        return int(max(base_epochs, searched.highest)) if searched is not None else base_epochs


def load_space(path: str) -> TuneSpace:
    """Read and check a search-space YAML; every error names the file and the field."""
    data = load_yaml(path)
    where = str(path)
    raw_params = data.pop("params", None)
    if not isinstance(raw_params, dict) or not raw_params:
        raise ConfigError(f"{where}: needs a non-empty `params` mapping of dotted config paths to distributions")
    params = {upgrade_space_path(str(name), where): Distribution.parse(str(name), spec, where)
              for name, spec in raw_params.items()}
    for section, cls in (("scheduler", SchedulerSpec), ("search", SearchSpec)):
        data[section] = from_dict(cls, data.get(section), f"{where}: {section}")
    space = from_dict(TuneSpace, {**data, "params": params, "source": where}, where)
    _check(space, where)
    return space


def _check(space: TuneSpace, where: str) -> None:
    if not space.objective.startswith(OBJECTIVE_PREFIX):
        raise ConfigError(f"{where}: objective {space.objective!r} is not an internal-validation metric "
                          f"(it must start with {OBJECTIVE_PREFIX!r}); external results never guide a search")
    if space.mode not in ("min", "max"):
        raise ConfigError(f"{where}: mode must be 'min' or 'max', got {space.mode!r}")
    if not isinstance(space.num_samples, int) or space.num_samples < 1:
        raise ConfigError(f"{where}: num_samples must be a positive integer, got {space.num_samples!r}")
    concurrent = space.max_concurrent_trials
    if concurrent != "auto" and (not isinstance(concurrent, int) or concurrent < 1):
        raise ConfigError(f"{where}: max_concurrent_trials must be 'auto' or a positive integer, got {concurrent!r}")
    if space.scheduler.name not in SCHEDULERS:
        raise ConfigError(f"{where}: scheduler.name must be one of {', '.join(SCHEDULERS)}")
    if space.scheduler.grace_period < 1 or space.scheduler.reduction_factor <= 1:
        raise ConfigError(f"{where}: scheduler needs grace_period >= 1 and reduction_factor > 1")
    if space.search.name not in SEARCHERS:
        raise ConfigError(f"{where}: search.name must be one of {', '.join(SEARCHERS)}")


def apply_params(base: dict[str, Any], params: dict[str, Any], where: str = "search space") -> dict[str, Any]:
    """A deep copy of the nested config `base` with each dotted path in `params` set.

    A path must name a key that exists in `base` (the stage's full config, defaults included), so a
    typo in a space fails before any trial starts.
    """
    out = copy.deepcopy(base)
    for path, value in params.items():
        node, keys = out, path.split(".")
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
                raise ConfigError(f"{where}: {path!r} does not name a config field "
                                  f"({'.'.join(keys[:depth + 1])!r} unknown; known here: {known})")
            if depth == len(keys) - 1:
                node[key] = value
            else:
                node = node[key]
    return out


def plain(value: Any) -> Any:
    """Numpy scalars -> Python numbers; floats rounded to 6 significant digits for readable YAML."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return float(f"{value:.6g}")
    return value
