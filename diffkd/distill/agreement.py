"""How closely a student matches its teacher: the measures the student stage records every epoch.

    agreement(student_logits, teacher_logits) -> {"agree_corr": ..., "agree_kl": ..., "agree_top1": ...}

- ``agree_corr``: Pearson correlation of the two models' logits over the images. For two classes it
  is the correlation of the margins z₁ − z₀ (what ranks cases, so what AUC scores); for more classes,
  of each model's logits centred per image and flattened.
- ``agree_kl``: KL(teacher ‖ student) at temperature 1, averaged over images: how far the student's
  probabilities are from the teacher's, scale included.
- ``agree_top1``: the share of images both models put in the same class.

A correlation near 1 with a large KL is a student that ranks cases as its teacher does at another
scale (what the standardised logit term asks for); a high top-1 agreement with a low correlation is a
student that copies the teacher's decision but not its ranking.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AGREEMENT_KEYS = ("agree_corr", "agree_kl", "agree_top1")


def _ranking_scores(logits: torch.Tensor) -> torch.Tensor:
    if logits.shape[1] == 2:
        return logits[:, 1] - logits[:, 0]
    return (logits - logits.mean(dim=1, keepdim=True)).flatten()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation; NaN when either side is constant (no ranking to compare)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """The three agreement measures of one set of images, [N, C] logits each (see the module's docstring)."""
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(f"agreement needs two [N, C] logit tensors of one shape, got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")
    if len(student_logits) == 0:
        return {key: math.nan for key in AGREEMENT_KEYS}
    student, teacher = student_logits.double(), teacher_logits.double()
    kl = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), reduction="batchmean",
                  log_target=True)
    return {"agree_corr": pearson(_ranking_scores(student), _ranking_scores(teacher)),
            "agree_kl": float(kl),
            "agree_top1": float((student.argmax(dim=1) == teacher.argmax(dim=1)).double().mean())}
