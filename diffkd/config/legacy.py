"""Section layouts of the previous release, still read for one release: each is rewritten into the current
layout with a `LayoutDeprecationWarning` that names the new form. Delete an entry when its release ends.

- the student's flat `distill` section (`temperature`, `alpha`, `pro_weight`, ...) -> `distill.terms`;
  search spaces' flat `distill.*` paths likewise.

The experiment file's own old layout (the diffusion section) is rewritten by `diffkd.experiments.legacy`.
"""
from __future__ import annotations

from typing import Any

from diffkd.config import ConfigError, deprecated_layout

# ---- the student's distillation section ------------------------------------------------------------

# flat key -> (term, option) of `distill.terms`
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
FLAT_DISTILL_WEIGHT_KEYS = {term: key for key, (term, option) in FLAT_DISTILL_KEYS.items() if option == "weight"}
# What the flat layout meant when a key was left out (only the logit term was on by default).
FLAT_DISTILL_DEFAULTS = {"alpha": 0.9, "temperature": 4.0}


def is_flat_distill(section: dict[str, Any]) -> bool:
    return bool(set(section) & set(FLAT_DISTILL_KEYS))


def upgrade_distill(section: dict[str, Any], where: str) -> dict[str, Any]:
    """A `distill` section in the current layout; a flat one is converted, with a warning naming the result.

    A term is kept when its weight is positive or was written out (so a search space can still
    address it); options of a term that is not kept are dropped.
    """
    if not is_flat_distill(section):
        return section
    if "terms" in section:
        raise ConfigError(f"{where}: mixes `terms` with the old flat keys "
                          f"{', '.join(sorted(set(section) & set(FLAT_DISTILL_KEYS)))}; use `terms` only")
    unknown = sorted(set(section) - set(FLAT_DISTILL_KEYS))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in config section {where} (old flat layout); "
                          f"write the section as `terms: {{name: {{weight: ..., ...}}}}`")
    values = {**FLAT_DISTILL_DEFAULTS, **section}
    terms: dict[str, dict[str, Any]] = {}
    for key, (term, option) in FLAT_DISTILL_KEYS.items():
        if key in values:
            terms.setdefault(term, {})[option] = values[key]
    terms = {name: options for name, options in terms.items()
             if options.get("weight", 0) > 0 or FLAT_DISTILL_WEIGHT_KEYS[name] in section}
    deprecated_layout(f"{where}: the flat layout ({', '.join(section)}) is deprecated and will not be read in "
                      f"the next release; write it as `terms: {terms}`")
    return {"terms": terms}


def upgrade_space_path(path: str, where: str) -> str:
    """A search-space parameter's path in the current layout (flat `distill.<key>` paths with a warning)."""
    prefix, _, key = path.partition(".")
    if prefix != "distill" or key not in FLAT_DISTILL_KEYS:
        return path
    term, option = FLAT_DISTILL_KEYS[key]
    upgraded = f"distill.terms.{term}.{option}"
    deprecated_layout(f"{where}: parameter {path!r} uses the old flat distill layout and will not be read in the "
                      f"next release; write it as {upgraded!r}")
    return upgraded
