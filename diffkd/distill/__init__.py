"""Knowledge-distillation losses, as modules (their learnable parts train with the student).

Registered losses (the keys of ``distill.terms`` in a student config):

- ``logit``: :class:`LogitKD`, Hinton KD with temperature and the T² factor; its weight is α,
  taken from cross-entropy's share.
- ``logit_standardized``: :class:`StandardizedLogitKD`, the same soft term on batch-standardised margins:
  the teacher's ranking without its logit scale (see its docstring for why); blends with CE like ``logit``.
- ``feature``: :class:`FeatureKD`, projector + MSE (FitNets) or attention transfer; needs pairs.
- ``gkd_pro``: :class:`GroupPrototypeKD`, PaGKD's group prototype distillation; pairing-free.
- ``gkd_den``: :class:`GroupDenseKD`, PaGKD's group dense distillation; pairing-free, warm-up 1 epoch.

How a config becomes a loss
---------------------------
A student config names its terms; every other key of a term is a keyword argument of the loss::

    student:
      distill:
        terms:
          logit: {weight: 0.7, temperature: 4.0}
          gkd_pro: {weight: 0.5, num_queries: 8}
          gkd_den: {weight: 0.2, warmup_epochs: 2}

The student's loss is ``(1 - Σ w_b)·CE + Σ w_b·term_b + Σ w·term`` where the b terms are those that
blend with cross-entropy (``blends_with_ce``: logit) and the others add on top. A term with weight 0
is off (not built), ``warmup_epochs`` keeps it off for the first epochs, and a term that has nothing
to compare in a step (no same-class pair) drops out of that step. Tune spaces address the options
by name: ``distill.terms.logit.temperature``, ``distill.terms.gkd_pro.weight``.

Adding a loss
-------------
Write one module in this package (it is imported automatically, so the decorator runs)::

    from diffkd.distill.registry import DistillBatch, FeatureLoss, register_loss

    @register_loss("my_loss")
    class MyLoss(FeatureLoss):          # FeatureLoss: the constructor takes the two widths first
        needs_pairs = True              # compares images one to one
        def __init__(self, student_channels, teacher_channels, margin: float = 1.0): ...
        def term(self, batch: DistillBatch): ...   # a scalar tensor, or None to sit this step out

plus its test; then ``distill.terms.my_loss: {weight: ..., margin: ...}`` in a config uses it.
Build losses only through :func:`build_loss` (the student stage does).
"""
from __future__ import annotations

import importlib
import pkgutil

from diffkd.distill.registry import (LOSSES, DistillBatch, DistillLoss, FeatureLoss, FeatureWidths, build_loss,
                                     check_loss_options, loss_class, loss_defaults, register_loss)

# Every module of the package is imported so that each loss registers itself: a new loss is one new file.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from diffkd.distill.feature import FeatureKD  # noqa: E402  (re-exported; already imported above)
from diffkd.distill.group import GroupDenseKD, GroupPrototypeKD  # noqa: E402
from diffkd.distill.logit import LogitKD  # noqa: E402

# Losses that compare class groups and so need no image-level pairing.
PAIRING_FREE = frozenset(name for name, cls in LOSSES.items() if not cls.needs_pairs)

__all__ = ["LOSSES", "PAIRING_FREE", "DistillBatch", "DistillLoss", "FeatureLoss", "FeatureWidths", "build_loss",
           "check_loss_options", "loss_class", "loss_defaults", "register_loss", "LogitKD", "FeatureKD",
           "GroupPrototypeKD", "GroupDenseKD"]
