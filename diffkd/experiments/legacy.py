"""The experiment file's layouts of the previous release, still read for one release: each is rewritten into
the current layout with a `LayoutDeprecationWarning` that names the new form. Delete an entry when its release
ends. (A single section's old layout is rewritten by its dataclass; see `diffkd.config.legacy`.)

- the diffusion section written as a DiffusionConfig beside a top-level `diffusion_loop` section ->
  `diffusion: {model: <DiffusionConfig>, loop: <LoopConfig>}`.
"""
from __future__ import annotations

from typing import Any

from diffkd.config import deprecated_layout
from diffkd.models.diffusion import DiffusionModelConfig

DIFFUSION_STAGE_KEYS = frozenset({"enabled", "model", "loop"})


def _is_old_diffusion(data: dict[str, Any]) -> bool:
    section = data.get("diffusion")
    if "diffusion_loop" in data:
        return True
    if not isinstance(section, dict):
        return False
    if set(section) - DIFFUSION_STAGE_KEYS:
        return True  # DiffusionConfig's own keys (cond_drop_prob, sampler, ...) at the section's top
    # `model` holds a DiffusionConfig now (whose own `model` is the network); then it held the network.
    model = section.get("model")
    network_keys = set(DiffusionModelConfig.__dataclass_fields__)
    return isinstance(model, dict) and bool(set(model) & network_keys) and "model" not in model


def upgrade_sections(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A whole config file's sections in the current layout (a shallow copy; `data` is not changed)."""
    data = dict(data)
    if _is_old_diffusion(data):
        section = dict(data.get("diffusion") or {})
        loop = data.pop("diffusion_loop", None) or {}
        enabled = section.pop("enabled", True)
        data["diffusion"] = {"enabled": enabled, "model": section, "loop": loop}
        deprecated_layout(f"{where}: `diffusion` written as a DiffusionConfig beside `diffusion_loop` is deprecated "
                          "and will not be read in the next release; write `diffusion: {model: <the old diffusion "
                          "section>, loop: <the old diffusion_loop section>}`")
    return data
