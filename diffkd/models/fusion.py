"""Clinical fusion: an image classifier (timm) plus a small head that adds the clinical attributes.

    fused logits = image logits (the timm model, unchanged) + ClinicalFusionHead(image embedding, clinical)

The timm model keeps its own classifier, so its saved weights alone are a complete image-only
classifier that `timm.create_model` restores; the head is a separate module saved in its own file
(`fusion_head.safetensors` + `fusion_head.json`). Its last layer starts at zero, so training
begins from the image-only model and the head learns only what the clinical values add.

Missing values: the clinical vector is `ClinicalEncoding`'s (value 0 plus a missing flag per
column). `column_dropout` hides whole columns at random during training (values 0, flag 1), so the
head also learns to predict when a center records fewer attributes than the training centers did.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from diffkd.data.schema import ClinicalEncoding


def clinical_columns() -> tuple[list[str], list[list[int]], list[int]]:
    """Encoded feature names, each column's value indices, and each column's missing-flag index."""
    names = ClinicalEncoding().names
    values, flags = [], []
    for column in ClinicalEncoding().columns:
        values.append([i for i, n in enumerate(names) if n == column or n.startswith(column + "=")])
        flags.append(names.index(column + "_missing"))
    return names, values, flags


@dataclass
class FusionHeadConfig:
    embed_dim: int
    clinical_names: list[str] = field(default_factory=lambda: clinical_columns()[0])
    num_classes: int = 2
    hidden: int = 64
    dropout: float = 0.1
    column_dropout: float = 0.1  # chance, per training sample and column, to hide the column

    @property
    def clinical_dim(self) -> int:
        return len(self.clinical_names)


class ClinicalFusionHead(nn.Module):
    def __init__(self, config: FusionHeadConfig):
        super().__init__()
        names, values, flags = clinical_columns()
        if list(config.clinical_names) != names:
            raise ValueError("this fusion head was trained on clinical features "
                             f"{config.clinical_names}, but diffkd now encodes {names}; retrain the model")
        self.config = config
        self.image = nn.Sequential(nn.LayerNorm(config.embed_dim), nn.Linear(config.embed_dim, config.hidden))
        self.clinical = nn.Sequential(nn.Linear(config.clinical_dim, config.hidden), nn.GELU())
        self.out = nn.Sequential(nn.GELU(), nn.Dropout(config.dropout), nn.Linear(2 * config.hidden, config.num_classes))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        # Column -> value positions as a 0/1 matrix, so hiding columns is one matmul.
        membership = torch.zeros(len(values), config.clinical_dim)
        for col, idx in enumerate(values):
            membership[col, idx] = 1.0
        self.register_buffer("value_membership", membership, persistent=False)
        self.register_buffer("missing_flags", torch.tensor(flags), persistent=False)

    def hide_columns(self, clinical: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """`clinical` with the columns marked in `hidden` [B, columns] (bool) encoded as missing."""
        value_mask = (hidden.to(clinical.dtype) @ self.value_membership).clamp(max=1.0)
        out = clinical * (1.0 - value_mask)
        out[:, self.missing_flags] = torch.maximum(out[:, self.missing_flags], hidden.to(clinical.dtype))
        return out

    def forward(self, embedding: torch.Tensor, clinical: torch.Tensor) -> torch.Tensor:
        if self.training and self.config.column_dropout > 0:
            hidden = torch.rand(clinical.shape[0], len(self.missing_flags), device=clinical.device) \
                < self.config.column_dropout
            clinical = self.hide_columns(clinical, hidden)
        return self.out(torch.cat([self.image(embedding), self.clinical(clinical.to(embedding.dtype))], dim=1))


class ClinicalFusionClassifier(nn.Module):
    """A timm classifier (`backbone`) with a clinical fusion head; forward(image, clinical) -> logits."""

    def __init__(self, backbone: nn.Module, head: ClinicalFusionHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: torch.Tensor, clinical: torch.Tensor, return_image_logits: bool = False):
        embedding = self.backbone.forward_head(self.backbone.forward_features(image), pre_logits=True)
        image_logits = self.backbone.get_classifier()(embedding)
        fused = image_logits + self.head(embedding, clinical)
        return (fused, image_logits) if return_image_logits else fused
