"""Logit distillation of the teacher's ranking, not its scale (binary tasks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffkd.distill.registry import DistillBatch, DistillLoss, register_loss


def standardized_margins(logits: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each image's margin z₁ − z₀, z-scored over the batch: mean 0, standard deviation 1."""
    if logits.ndim != 2 or logits.shape[1] != 2:
        raise ValueError(f"standardised logit KD is for 2-class logits [B, 2], got {tuple(logits.shape)}")
    margin = logits[:, 1] - logits[:, 0]
    return (margin - margin.mean()) / (margin.std(unbiased=False) + eps)


@register_loss("logit_standardized")
class StandardizedLogitKD(DistillLoss):
    r"""Hinton's soft term on batch-standardised margins: the student keeps the teacher's ordering of
    images without having to copy the size of its logits.

    .. math::
        L = T^2\,\overline{\mathrm{KL}\big(\sigma(\hat m_t/T)\,\|\,\sigma(\hat m_s/T)\big)},\qquad
        \hat m = \frac{m - \bar m}{\operatorname{sd}(m)},\quad m = z_1 - z_0 \text{ over the batch}

    Why: Hinton's term matches the teacher's logit *scale*. A teacher early-stopped on a small cohort is
    nearly constant on its own training images (the demo's: margin sd 0.19, soft targets 0.49–0.55 at
    T = 4), so with α = 0.7 the plain term pulls the student's outputs toward a constant and crowds out
    the labels, while the little the teacher does know, its ranking, is what a rank-scored (AUC) task
    needs. Standardising removes the scale, as logit standardisation does (Sun et al., CVPR 2024, who
    z-score each image's logits); two logits have no spread within an image, so the batch is the
    population here. For large T the term tends to (1 − corr(m_s, m_t)) / 4: it rewards agreement in
    order only. Weight: α, blended with cross-entropy as the plain logit term's.
    """

    needs_pairs = True
    blends_with_ce = True

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def soft_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        student = standardized_margins(student_logits) / t
        teacher = standardized_margins(teacher_logits.detach()) / t
        # the 2-class KL(p_t || p_s) of sigmoid probabilities, from logits for stability
        p_teacher = torch.sigmoid(teacher)
        kl = (p_teacher * (F.logsigmoid(teacher) - F.logsigmoid(student))
              + (1 - p_teacher) * (F.logsigmoid(-teacher) - F.logsigmoid(-student)))
        return kl.mean() * t * t

    def term(self, batch: DistillBatch) -> torch.Tensor | None:
        s_index, t_index = batch.pairs
        if len(s_index) < 2:  # one image has no batch spread to standardise by
            return None
        return self.soft_loss(batch.student_logits[s_index], batch.teacher_logits[t_index])
