"""Knowledge-distillation losses, as modules (their learnable parts train with the student).

- ``logit``: :class:`LogitKD`, Hinton KD with temperature and the T² factor, blended with CE.
- ``feature``: :class:`FeatureKD`, projector + MSE (FitNets) or attention transfer; needs pairs.
- ``gkd_pro``: :class:`GroupPrototypeKD`, PaGKD's group prototype distillation; pairing-free.
- ``gkd_den``: :class:`GroupDenseKD`, PaGKD's group dense distillation; pairing-free.
"""
from __future__ import annotations

from torch import nn

from diffkd.distill.feature import FeatureKD
from diffkd.distill.group import GroupDenseKD, GroupPrototypeKD
from diffkd.distill.logit import LogitKD

LOSSES: dict[str, type[nn.Module]] = {
    "logit": LogitKD,
    "feature": FeatureKD,
    "gkd_pro": GroupPrototypeKD,
    "gkd_den": GroupDenseKD,
}

# Losses that compare groups and so need no image-level pairing.
PAIRING_FREE = frozenset({"gkd_pro", "gkd_den"})


def build_loss(name: str, **kwargs) -> nn.Module:
    try:
        cls = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown distillation loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None
    return cls(**kwargs)


__all__ = ["LOSSES", "PAIRING_FREE", "build_loss", "LogitKD", "FeatureKD", "GroupPrototypeKD", "GroupDenseKD"]
