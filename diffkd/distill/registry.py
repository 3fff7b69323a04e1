"""The loss registry: every distillation loss registers itself by name, and is only ever built from here.

A loss is an ``nn.Module`` subclass of :class:`DistillLoss`, decorated with :func:`register_loss`.
The student stage builds the terms its config names (``distill.terms``) with :func:`build_loss` and
hands each one the same :class:`DistillBatch` every step; the loss picks what it needs from it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn


@dataclass(frozen=True)
class FeatureWidths:
    """Channel widths of the student's and the teacher's last feature maps (what projectors map between)."""

    student: int
    teacher: int


@dataclass
class DistillBatch:
    """Everything a loss may read in one training step; every tensor is float32.

    The student's rows and the teacher's rows are different images in pairing-free mode (their
    labels tell the class groups apart) and the same images when paired. ``pairs`` indexes instance
    pairs (student row ``pairs[0][i]`` goes with teacher row ``pairs[1][i]``): the identity when
    paired, random same-class pairs when pairing-free, possibly empty.
    """

    student_logits: torch.Tensor  # [Bs, K]
    teacher_logits: torch.Tensor  # [Bt, K], no gradient
    student_features: torch.Tensor  # [Bs, Cs, H, W], last feature map
    teacher_features: torch.Tensor  # [Bt, Ct, H', W'], no gradient
    student_labels: torch.Tensor  # [Bs]
    teacher_labels: torch.Tensor  # [Bt]
    pairs: tuple[torch.Tensor, torch.Tensor]

    @property
    def has_pairs(self) -> bool:
        return len(self.pairs[0]) > 0


class DistillLoss(nn.Module):
    """Base of every registered loss.

    Subclasses implement :meth:`term` and may override the class attributes:

    - ``needs_pairs``: the loss compares images one to one (instance KD). Pairing-free runs feed it
      random same-class pairs, and a step without a pair skips it.
    - ``blends_with_ce``: the term's weight is taken from cross-entropy's share, as Hinton's α:
      ``(1 - Σ w_blended)·CE + Σ w_blended·term``. Other terms add on top: ``+ w·term``.
    - ``default_warmup_epochs``: epochs the term stays off at the start of training, unless the
      config's ``warmup_epochs`` says otherwise.
    """

    name: ClassVar[str] = ""
    needs_pairs: ClassVar[bool] = False
    blends_with_ce: ClassVar[bool] = False
    default_warmup_epochs: ClassVar[int] = 0

    @classmethod
    def build(cls, widths: FeatureWidths, **kwargs: Any) -> "DistillLoss":
        """Construct from the config's keyword arguments; losses with projectors also take the widths."""
        return cls(**kwargs)

    def term(self, batch: DistillBatch) -> torch.Tensor | None:
        """The (unweighted) loss of one step, or None when this batch gives the term nothing to compare."""
        raise NotImplementedError


class FeatureLoss(DistillLoss):
    """A loss whose constructor takes ``student_channels`` and ``teacher_channels`` first."""

    @classmethod
    def build(cls, widths: FeatureWidths, **kwargs: Any) -> "DistillLoss":
        return cls(widths.student, widths.teacher, **kwargs)


LOSSES: dict[str, type[DistillLoss]] = {}

L = TypeVar("L", bound=type[DistillLoss])


def register_loss(name: str) -> Callable[[L], L]:
    """Class decorator: make the loss buildable as ``name`` (the key under ``distill.terms``)."""

    def add(cls: L) -> L:
        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
            raise TypeError(f"register_loss({name!r}): {cls!r} is not a DistillLoss subclass")
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"distillation loss {name!r} is already registered by "
                             f"{LOSSES[name].__module__}.{LOSSES[name].__qualname__}")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return add


def loss_class(name: str) -> type[DistillLoss]:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown distillation loss {name!r}; known: {', '.join(sorted(LOSSES))}") from None


def _config_parameters(name: str) -> list[inspect.Parameter]:
    """The keyword arguments of loss `name` that a config sets (the feature widths come from the models)."""
    signature = inspect.signature(loss_class(name).__init__)
    return [p for p in list(signature.parameters.values())[1:]
            if p.name not in ("student_channels", "teacher_channels")]


def loss_defaults(name: str) -> dict[str, Any]:
    """The config options of loss `name` that have defaults, with them (what a search may vary)."""
    return {p.name: p.default for p in _config_parameters(name) if p.default is not inspect.Parameter.empty}


def check_loss_options(name: str, options: dict[str, Any], where: str) -> None:
    """Fail early, naming the config field, when `options` are not keyword arguments of loss `name`."""
    accepted = [p.name for p in _config_parameters(name)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {', '.join(unknown)} for loss {name!r}; "
                         f"it takes: weight, warmup_epochs{''.join(', ' + a for a in accepted)}")


def build_loss(name: str, widths: FeatureWidths | None = None, **options: Any) -> DistillLoss:
    """The registered loss `name`, built with its config options (widths needed by feature losses)."""
    cls = loss_class(name)
    if widths is None:
        if issubclass(cls, FeatureLoss):
            raise ValueError(f"distillation loss {name!r} works on feature maps: pass widths=FeatureWidths(...)")
        widths = FeatureWidths(0, 0)
    return cls.build(widths, **options)
