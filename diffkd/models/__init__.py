"""The networks: the conditional diffusion model, timm classifiers (+ clinical fusion), export and footprint."""
from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DeepSpeed engine or DDP wrapper, however deep (or the model itself)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model
