"""Pairing-free group-level distillation (PaGKD, Hu et al. 2026): GKD-Pro and GKD-Den.

Neither loss pairs a student image with a teacher image. Each compares the *class group* of the
student's batch (all images with label c, e.g. B-mode) with the teacher's class group (its own
images with label c, e.g. Doppler of other patients). Every per-group computation is a function of
the *set* of tokens, so the losses are invariant to the order of images within a group and to
which particular images were drawn. Implemented from the paper's description (its code carries no
licence).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffkd.distill.common import (Projector, activation_map, check_feature_map, check_labels,
                                   shared_classes, tokens)
from diffkd.distill.registry import DistillBatch, FeatureLoss, register_loss


@register_loss("gkd_pro")
class GroupPrototypeKD(FeatureLoss):
    r"""GKD-Pro: learnable lesion-aware queries, shared by both modalities, pool each class group
    into prototypes; the student's prototypes are pulled onto the teacher's.

    Tokens: the student map is projected to the teacher's width (1×1 P) and every spatial token is
    layer-normalised; group c on side m is the token set :math:`X^m_c` of all its images.
    Prototypes by multi-head attention pooling with K shared queries :math:`Q`, shared key map
    :math:`W_k`, h heads (head slices ·^{(h)}):

    .. math::
        \pi^m_{c,k} = \big\Vert_h \sum_{x \in X^m_c}
            \mathrm{softmax}_x\Big(\frac{q_k^{(h)} \cdot (W_k x)^{(h)}}{\sqrt{d_h}}\Big)\, x^{(h)}

    .. math::
        L = \frac{1}{|C|K} \sum_{c,k} \big(1 - \cos(\pi^s_{c,k}, \operatorname{sg}[\pi^t_{c,k}])\big)
            + \lambda \frac{1}{|C_{pairs}|K} \sum_{c \ne c', k} \frac{1 + \cos(\pi^t_{c,k}, \pi^t_{c',k})}{2}

    over the classes C present in both batches. Values are the modality's own (normalised) tokens,
    not a learned value map: the teacher's prototypes stay in the frozen teacher's feature space, so
    the alignment cannot be satisfied by collapsing both sides onto a learned constant. The second
    term (weight λ, on the teacher side only) is what makes the queries lesion-aware: it rewards
    queries that find where the teacher's classes differ. Pairs of teacher prototypes within a
    class are not pushed apart. The alignment term is zero when the student's tokens equal the
    teacher's.
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_queries: int = 8,
                 num_heads: int = 4, attn_dim: int = 64, distinct_weight: float = 0.1):
        super().__init__()
        for name, width in (("teacher width", teacher_channels), ("attn_dim", attn_dim)):
            if width % num_heads:
                raise ValueError(f"GKD-Pro: {name} {width} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.distinct_weight = distinct_weight
        self.projector = Projector(student_channels, teacher_channels)
        self.queries = nn.Parameter(torch.randn(num_queries, attn_dim) / math.sqrt(attn_dim))
        self.key = nn.Linear(teacher_channels, attn_dim)

    def prototypes(self, group_tokens: torch.Tensor) -> torch.Tensor:
        """[N, D] tokens of one group -> [K, D] prototypes (order of the N tokens does not matter)."""
        n, width = group_tokens.shape
        h = self.num_heads
        keys = self.key(group_tokens).view(n, h, -1)                    # [N, h, dk]
        queries = self.queries.view(self.queries.shape[0], h, -1)        # [K, h, dk]
        logits = torch.einsum("khd,nhd->hkn", queries, keys) / math.sqrt(keys.shape[-1])
        weights = logits.softmax(dim=-1)                                  # over the group's tokens
        values = group_tokens.view(n, h, width // h)                      # [N, h, D/h]
        return torch.einsum("hkn,nhd->khd", weights, values).reshape(-1, width)

    def terms(self, student_feats: torch.Tensor, student_labels: torch.Tensor,
              teacher_feats: torch.Tensor, teacher_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        check_feature_map(student_feats, "student features")
        check_feature_map(teacher_feats, "teacher features")
        check_labels(student_feats, student_labels, "student")
        check_labels(teacher_feats, teacher_labels, "teacher")
        s_tokens = tokens(self.projector(student_feats))
        t_tokens = tokens(teacher_feats.detach())
        zero = s_tokens.sum() * 0.0  # keeps the graph (and DeepSpeed's grads) alive when no group matches
        classes = shared_classes(student_labels, teacher_labels)
        if not classes:
            return {"align": zero, "distinct": zero}
        width = t_tokens.shape[-1]
        s_protos, t_protos = [], []
        for c in classes:
            s_protos.append(self.prototypes(s_tokens[student_labels == c].reshape(-1, width)))
            t_protos.append(self.prototypes(t_tokens[teacher_labels == c].reshape(-1, width)))
        s_protos, t_protos = torch.stack(s_protos), torch.stack(t_protos)  # [|C|, K, D]
        align = (1.0 - F.cosine_similarity(s_protos, t_protos.detach(), dim=-1)).mean()
        if len(classes) < 2:
            return {"align": align, "distinct": zero}
        unit = F.normalize(t_protos, dim=-1)
        cos = torch.einsum("akd,bkd->kab", unit, unit)                     # [K, |C|, |C|]
        off_diagonal = ~torch.eye(len(classes), dtype=torch.bool, device=cos.device)
        distinct = ((1.0 + cos[:, off_diagonal]) / 2.0).mean()
        return {"align": align, "distinct": distinct}

    def forward(self, student_feats: torch.Tensor, student_labels: torch.Tensor,
                teacher_feats: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
        parts = self.terms(student_feats, student_labels, teacher_feats, teacher_labels)
        return parts["align"] + self.distinct_weight * parts["distinct"]

    def term(self, batch: DistillBatch) -> torch.Tensor:
        return self(batch.student_features, batch.student_labels, batch.teacher_features, batch.teacher_labels)


@register_loss("gkd_den")
class GroupDenseKD(FeatureLoss):
    r"""GKD-Den: every student token attends to the teacher tokens of its own class group, guided by
    activation-derived relation maps, and is aligned by cosine to what it attends to.

    With s_i the projected, normalised student tokens of class c, t_j the teacher tokens of class c
    (any images), and CAM-like activations a(p) = mean_ch F(p)² (teacher: divided by its image's
    maximum; student: divided by its image's sum, so every image weighs the same), the relation map
    :math:`R_{ij} = a_s(i)\,a_t(j)` enters twice: its teacher factor biases the attention towards
    activated (lesion) teacher regions, its student factor weights each student token's loss:

    .. math::
        \hat t_i = \sum_j \mathrm{softmax}_j\Big(\frac{\cos(s_i, t_j)}{\tau} + \log a_t(j)\Big)\, t_j,
        \qquad
        L = \frac{1}{|C|} \sum_c \frac{1}{n^s_c} \sum_{i \in c} \operatorname{sg}[a_s(i)]\,
            \big(1 - \cos(s_i, \hat t_i)\big)

    (the teacher's tokens are constants; gradients reach the student through s_i and through the
    attention weights, which it steers towards the teacher tokens it can match). No image
    correspondence is used: the student token is matched to whatever teacher tokens of the same class
    resemble it. The loss is small, not exactly zero, when student and teacher tokens coincide (the
    softmax still mixes neighbours; it tends to zero as τ → 0). The task switches it on after a
    warm-up of ``warmup_epochs`` (PaGKD: dense alignment is meaningful once features have formed).
    """

    default_warmup_epochs = 1

    def __init__(self, student_channels: int, teacher_channels: int, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"GKD-Den temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.projector = Projector(student_channels, teacher_channels)

    def forward(self, student_feats: torch.Tensor, student_labels: torch.Tensor,
                teacher_feats: torch.Tensor, teacher_labels: torch.Tensor) -> torch.Tensor:
        check_feature_map(student_feats, "student features")
        check_feature_map(teacher_feats, "teacher features")
        check_labels(student_feats, student_labels, "student")
        check_labels(teacher_feats, teacher_labels, "teacher")
        teacher_feats = teacher_feats.detach()
        s_tokens = F.normalize(tokens(self.projector(student_feats)), dim=-1)    # [B, P, D]
        t_tokens = F.normalize(tokens(teacher_feats), dim=-1)
        s_act = activation_map(student_feats).detach()
        s_weight = s_act / s_act.sum(dim=1, keepdim=True).clamp_min(1e-12)      # sums to 1 per image
        t_act = activation_map(teacher_feats)
        t_prior = torch.log(t_act / t_act.amax(dim=1, keepdim=True).clamp_min(1e-12) + 1e-6)
        width = t_tokens.shape[-1]
        losses = []
        for c in shared_classes(student_labels, teacher_labels):
            s_mask, t_mask = student_labels == c, teacher_labels == c
            s = s_tokens[s_mask].reshape(-1, width)
            t = t_tokens[t_mask].reshape(-1, width)
            attention = (s @ t.T / self.temperature + t_prior[t_mask].reshape(1, -1)).softmax(dim=-1)
            target = attention @ t
            mismatch = 1.0 - F.cosine_similarity(s, target, dim=-1)
            losses.append((s_weight[s_mask].reshape(-1) * mismatch).sum() / s_mask.sum())
        if not losses:
            return s_tokens.sum() * 0.0
        return torch.stack(losses).mean()

    def term(self, batch: DistillBatch) -> torch.Tensor:
        return self(batch.student_features, batch.student_labels, batch.teacher_features, batch.teacher_labels)
