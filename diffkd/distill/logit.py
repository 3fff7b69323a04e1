"""Logit distillation (Hinton et al., 2015)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffkd.distill.registry import DistillBatch, DistillLoss, register_loss


@register_loss("logit")
class LogitKD(DistillLoss):
    r"""Cross-entropy on the labels blended with temperature-softened teacher matching.

    .. math::
        L = (1-\alpha)\,\mathrm{CE}(z_s, y)
            + \alpha\, T^2\, \mathrm{KL}\big(\mathrm{softmax}(z_t/T)\,\|\,\mathrm{softmax}(z_s/T)\big)

    The T² factor keeps the soft term's gradient scale independent of T (its gradients shrink as
    1/T²). In a 2-class task this is already all of DKD: DKD's non-target term is identically zero
    there (docs/design.md), so no decoupled variant is offered.

    As a registered term (``distill.terms.logit``) its weight is α: it blends with cross-entropy,
    and only the soft term is computed here (the student stage computes the class-weighted CE).
    """

    needs_pairs = True
    blends_with_ce = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.temperature = temperature
        self.alpha = alpha

    def soft_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """T² · KL(teacher ‖ student) over softened distributions, averaged over the batch; 0 iff equal."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} must have the same shape")
        t = self.temperature
        log_p_student = F.log_softmax(student_logits / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
        kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
        return kl * t * t

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(student_logits, labels)
        return (1.0 - self.alpha) * hard + self.alpha * self.soft_loss(student_logits, teacher_logits)

    def term(self, batch: DistillBatch) -> torch.Tensor | None:
        if not batch.has_pairs:
            return None
        s_index, t_index = batch.pairs
        return self.soft_loss(batch.student_logits[s_index], batch.teacher_logits[t_index])
