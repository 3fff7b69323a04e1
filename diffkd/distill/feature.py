"""Instance-level feature distillation: FitNets-style regression or attention transfer."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from diffkd.distill.common import Projector, activation_map, check_feature_map, tokens
from diffkd.distill.registry import DistillBatch, FeatureLoss, register_loss

FeatureKind = Literal["mse", "attention"]


@register_loss("feature")
class FeatureKD(FeatureLoss):
    r"""Match the student's last feature map to the teacher's, image by image.

    ``kind="mse"`` (FitNets): a 1×1 projector P maps the student's width to the teacher's, the map
    is resized to the teacher's grid, and each token is layer-normalised (LN) over channels:

    .. math::  L = \frac{1}{B\,HW} \sum_{b,p} \frac{1}{C_t} \big\| \mathrm{LN}(P F_s)_{b,p} - \mathrm{LN}(F_t)_{b,p} \big\|^2

    ``kind="attention"`` (Zagoruyko & Komodakis): spatial attention maps a(F) = vec(mean_c F_c²),
    L2-normalised; no projector is needed since channels are averaged out:

    .. math::  L = \frac{1}{B} \sum_b \Big\| \frac{a(F_s)_b}{\|a(F_s)_b\|} - \frac{a(F_t)_b}{\|a(F_t)_b\|} \Big\|^2

    Both are zero when the (projected) student map equals the teacher's. Both need image-level
    pairs: in pairing-free mode they run on random same-class pairs, the baseline group KD beats.
    """

    needs_pairs = True

    def __init__(self, student_channels: int, teacher_channels: int, kind: FeatureKind = "mse"):
        super().__init__()
        if kind not in ("mse", "attention"):
            raise ValueError(f"feature KD kind must be 'mse' or 'attention', got {kind!r}")
        self.kind = kind
        self.projector = Projector(student_channels, teacher_channels) if kind == "mse" else None

    def forward(self, student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
        check_feature_map(student_feats, "student features")
        check_feature_map(teacher_feats, "teacher features")
        if student_feats.shape[0] != teacher_feats.shape[0]:
            raise ValueError(f"feature KD pairs images one to one: student batch {student_feats.shape[0]} "
                             f"!= teacher batch {teacher_feats.shape[0]}")
        teacher_feats = teacher_feats.detach()
        grid = teacher_feats.shape[-2:]
        if self.kind == "mse":
            projected = self.projector(student_feats)
            if projected.shape[-2:] != grid:
                projected = F.interpolate(projected, size=grid, mode="bilinear", align_corners=False)
            return (tokens(projected) - tokens(teacher_feats)).pow(2).mean()
        if student_feats.shape[-2:] != grid:
            student_feats = F.interpolate(student_feats, size=grid, mode="bilinear", align_corners=False)
        a_s = F.normalize(activation_map(student_feats), dim=1)
        a_t = F.normalize(activation_map(teacher_feats), dim=1)
        return (a_s - a_t).pow(2).sum(dim=1).mean()

    def term(self, batch: DistillBatch) -> torch.Tensor | None:
        if not batch.has_pairs:
            return None
        s_index, t_index = batch.pairs
        return self(batch.student_features[s_index], batch.teacher_features[t_index])
