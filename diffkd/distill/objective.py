"""The distillation objective: which loss terms a student trains with, at what weights, and the
module that computes them on one batch.

`DistillConfig` names the terms (`distill.terms` in a config) and `combine` sums them with cross-entropy
as its docstring's equation says; `DistillationModel` is what the training loop optimises, the student
plus the learnable parts of its losses (projectors, queries), of which only the student is exported.
The losses themselves are the registered modules of this package.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.config.legacy import upgrade_distill
from diffkd.distill.registry import DistillBatch, FeatureWidths, build_loss, check_loss_options, loss_class
from diffkd.models.classifiers import run_classifier

SYNTHETIC_LABELS = ("condition", "teacher")
DEFAULT_TERMS = {"logit": {"weight": 0.9, "temperature": 4.0}}  # Hinton KD, torchdistill/mdistiller's T


@dataclass
class DistillConfig:
    """The distillation objective: the weighted sum of the named terms (see `diffkd.distill`).

    ``terms`` maps a registered loss name to ``{weight: w, warmup_epochs: e, <the loss's options>}``:
    L = (1 - Σ w_b)·CE + Σ w_b·L_b + Σ w·L over the terms that are on, where the b terms blend with
    cross-entropy (logit KD, whose weight is α). Weight 0 switches a term off.
    """

    terms: dict[str, dict[str, Any]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_TERMS))
    # Who labels the synthetic rows: "condition" (the class the generator was asked for, used by
    # cross-entropy) or "teacher" (no cross-entropy on them; the distillation terms alone teach, with
    # the teacher's class where a term groups by class). A generator whose label effect the audit
    # cannot show makes its condition a noisy label; the teacher's opinion is the natural target.
    synthetic_labels: str = "condition"

    def __post_init__(self) -> None:
        if self.synthetic_labels not in SYNTHETIC_LABELS:
            raise ValueError(f"student.distill.synthetic_labels must be one of {', '.join(SYNTHETIC_LABELS)}, "
                             f"got {self.synthetic_labels!r}")
        if not isinstance(self.terms, dict):
            raise ValueError(f"student.distill.terms must be a mapping of loss name to options, got {self.terms!r}")
        blended = 0.0
        for name, options in self.terms.items():
            where = f"student.distill.terms.{name}"
            try:
                cls = loss_class(name)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            if not isinstance(options, dict) or "weight" not in options:
                raise ValueError(f"{where} must be a mapping with a `weight`, e.g. {{weight: 0.5}}; got {options!r}")
            weight, warmup = options["weight"], options.get("warmup_epochs", 0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"{where}.weight = {weight!r} must be a number >= 0")
            if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
                raise ValueError(f"{where}.warmup_epochs = {warmup!r} must be an integer >= 0")
            check_loss_options(name, self.options(name), where)
            if cls.blends_with_ce:
                blended += weight
        if blended > 1.0:
            raise ValueError(f"student.distill.terms: the weights of the terms that share cross-entropy's budget "
                             f"sum to {blended:g} > 1 (each takes its weight from CE's, as Hinton's alpha)")

    @classmethod
    def upgrade_layout(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
        """Read the flat layout of the previous release (`temperature`, `alpha`, `pro_weight`, ...) with a warning."""
        return upgrade_distill(data, where)

    def weight(self, name: str) -> float:
        return float(self.terms[name]["weight"]) if name in self.terms else 0.0

    def warmup_epochs(self, name: str) -> int:
        return int(self.terms[name].get("warmup_epochs", loss_class(name).default_warmup_epochs))

    def options(self, name: str) -> dict[str, Any]:
        """The loss's own keyword arguments: the term's entries other than weight and warmup_epochs."""
        return {k: v for k, v in self.terms[name].items() if k not in ("weight", "warmup_epochs")}

    def active_terms(self) -> list[str]:
        """Names of the terms that are on (weight > 0), in config order."""
        return [name for name in self.terms if self.weight(name) > 0]


# ---- the model: the student plus the learnable parts of its losses ----------------------------------

class DistillationModel(nn.Module):
    """What the loop trains: the student and the loss modules of the configured terms (`.losses`).

    Only `.student` is exported; the loss modules (projectors, queries) exist for training.
    """

    def __init__(self, student: nn.Module, cfg: DistillConfig | None, student_channels: int,
                 teacher_channels: int, class_weights: tuple[float, float] | None = None):
        super().__init__()
        self.student = student
        # A buffer, not a parameter: moves with the model, never trained, not in the exported student.
        self.register_buffer("class_weights", None if class_weights is None else torch.tensor(class_weights),
                             persistent=False)
        widths = FeatureWidths(student_channels, teacher_channels)
        names = cfg.active_terms() if cfg is not None else []
        self.losses = nn.ModuleDict({name: build_loss(name, widths, **cfg.options(name)) for name in names})
        self.synthetic_labels = cfg.synthetic_labels if cfg is not None else "condition"

    def teacher_labelled_rows(self, view: dict[str, Any]) -> torch.Tensor | None:
        """Rows whose label comes from the teacher (synthetic rows, when so configured), else None."""
        if self.synthetic_labels != "teacher" or "synthetic" not in view:
            return None
        return torch.as_tensor(view["synthetic"], dtype=torch.bool, device=view["label"].device)

    def forward(self, student_view: dict[str, Any], teacher_view: dict[str, Any] | None = None,
                teacher: nn.Module | None = None, paired: bool = True,
                active: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one batch: ``ce`` and ``kd_<name>`` for each `active` term (default: all of them).

        Runs inside DeepSpeed's forward, so mixed precision covers it all. ``_anchor`` is a zero that
        touches every loss parameter: each of them gets a gradient on every step and rank, even when a
        term is off (warm-up) or a batch lacks a group; ranks whose gradient sets differ would stall
        the all-reduce.
        """
        out = run_classifier(self.student, student_view)
        labels = student_view["label"]
        teacher_labelled = self.teacher_labelled_rows(student_view) if teacher is not None else None
        terms = {"ce": weighted_cross_entropy(out.logits.float(), labels, self.class_weights,
                                              None if teacher_labelled is None else ~teacher_labelled)}
        loss_params = list(self.losses.parameters())
        if loss_params:
            terms["_anchor"] = sum(p.sum() for p in loss_params) * 0.0
        if teacher is None:
            return terms
        with torch.no_grad():
            taught = run_classifier(teacher, teacher_view)
        t_labels = teacher_view["label"]
        if teacher_labelled is not None and paired:  # the teacher's class stands in for the condition's
            labels = torch.where(teacher_labelled, taught.logits.argmax(dim=1), labels)
            t_labels = labels
        if paired:
            pairs = (torch.arange(len(labels), device=labels.device),) * 2
        else:
            pairs = same_class_pairs(labels, t_labels)
        batch = DistillBatch(student_logits=out.logits.float(), teacher_logits=taught.logits.float(),
                             student_features=out.features.float(), teacher_features=taught.features.float(),
                             student_labels=labels, teacher_labels=t_labels, pairs=pairs)
        active = set(self.losses) if active is None else set(active)
        for name, loss in self.losses.items():
            if name in active:
                value = loss.term(batch)
                if value is not None:
                    terms[f"kd_{name}"] = value
        return terms


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None,
                           rows: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy as F.cross_entropy computes it (class-weighted mean), over `rows` only when given;
    zero (still in the graph) when no row is left."""
    if rows is None:
        return F.cross_entropy(logits, labels, weight=class_weights)
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows], labels[rows], weight=class_weights)


def same_class_pairs(student_labels: torch.Tensor, teacher_labels: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random instance pairs for unpaired views: each student image gets a random teacher image of its class.

    Student images whose class the teacher's batch lacks are left out.
    """
    s_index, t_index = [], []
    for c in student_labels.unique().tolist():
        candidates = (teacher_labels == c).nonzero().flatten()
        if len(candidates) == 0:
            continue
        members = (student_labels == c).nonzero().flatten()
        draw = torch.randint(len(candidates), (len(members),), generator=generator).to(candidates.device)
        s_index.append(members)
        t_index.append(candidates[draw])
    if not s_index:
        empty = torch.zeros(0, dtype=torch.long, device=student_labels.device)
        return empty, empty
    return torch.cat(s_index), torch.cat(t_index)


def combine(terms: dict[str, torch.Tensor], cfg: DistillConfig | None) -> torch.Tensor:
    """Weighted total of the loss terms (the equation in DistillConfig's docstring).

    A term that is absent this step (warm-up, no teacher rows, no same-class pair) simply drops out;
    a term that blends with cross-entropy only takes CE's share when it is there.
    """
    total = terms.get("_anchor", 0.0)
    if cfg is None:
        return total + terms["ce"]
    present = [name for name in cfg.active_terms() if f"kd_{name}" in terms]
    blended = [name for name in present if loss_class(name).blends_with_ce]
    total = total + (1.0 - sum(cfg.weight(name) for name in blended)) * terms["ce"]
    for name in blended + [name for name in present if name not in blended]:
        total = total + cfg.weight(name) * terms[f"kd_{name}"]
    return total
