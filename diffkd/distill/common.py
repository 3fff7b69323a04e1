"""Pieces the feature-level and group-level losses share: the width projector, tokens, class groups."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """A 1×1 convolution from the student's channel width to the teacher's (the FitNets regressor)."""

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.conv(feats)

    @torch.no_grad()
    def set_identity(self) -> None:
        """Map channels one to one (widths must match); lets tests put student and teacher in one space."""
        out_c, in_c = self.conv.weight.shape[:2]
        if out_c != in_c:
            raise ValueError(f"identity projector needs equal widths, got {in_c} -> {out_c}")
        self.conv.weight.copy_(torch.eye(in_c).view(in_c, in_c, 1, 1))
        self.conv.bias.zero_()


def check_feature_map(feats: torch.Tensor, name: str) -> None:
    if feats.dim() != 4:
        raise ValueError(f"{name} must be a feature map [B, C, H, W], got shape {tuple(feats.shape)}")


def tokens(feats: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H·W, C], each token layer-normalised over channels (no affine).

    Normalising makes the losses independent of each network's activation scale, so one weight
    range works for any teacher/student pair.
    """
    flat = feats.flatten(2).transpose(1, 2)
    return F.layer_norm(flat, flat.shape[-1:])


def activation_map(feats: torch.Tensor) -> torch.Tensor:
    """Activation-derived spatial relevance, CAM-like: a(p) = mean_c F_c(p)², shape [B, H·W]."""
    return feats.pow(2).mean(dim=1).flatten(1)


def shared_classes(student_labels: torch.Tensor, teacher_labels: torch.Tensor) -> list[int]:
    """Classes present in both the student's and the teacher's batch (a group needs both sides)."""
    present = set(student_labels.unique().tolist()) & set(teacher_labels.unique().tolist())
    return sorted(int(c) for c in present)


def check_labels(feats: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{name} labels must be [B={feats.shape[0]}], got shape {tuple(labels.shape)}")
