"""What a training stage is: a small task object the one training loop (`diffkd/train/loop.py`) runs.

The loop owns everything generic — Ray Train workers, the DeepSpeed engine, data shards, epochs,
checkpoints, resume, metrics and progress. A task owns only what differs between stages: which
model to build, one step's loss on one batch, how to evaluate, and how to export the result.

`step` must stay a plain function of (model, batch) so that tests call it without Ray or DeepSpeed.

Batches are dicts of tensors produced by the Ray Data pipeline (`diffkd/data/pipeline.py`):
``image`` float32 [B, C, H, W] normalised, ``mask`` float32 [B, 1, H, W] (zeros where unknown),
``label`` int64 [B], ``clinical`` float32 [B, ClinicalEncoding().width], ``center_idx`` int64 [B],
``modality_idx`` int64 [B], ``synthetic`` bool [B]; evaluation batches also carry ``case_id`` (list[str]).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
from torch import nn


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar; the loop calls backward on it
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)  # detached scalars for logging


class Task(ABC):
    """One stage of the pipeline (teacher, student, diffusion, ...)."""

    name: ClassVar[str]
    objective: ClassVar[str] = "val_loss"  # the metric early stopping, checkpoint ranking and Tune use
    mode: ClassVar[str] = "min"

    config: Any  # the stage's dataclass config; must be picklable (it travels to Ray workers)

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The trainable module; the loop hands it to DeepSpeed."""

    def setup(self, device: torch.device) -> None:
        """Per-worker state that is not trained (a frozen teacher, an EMA copy). Called once per worker."""

    def on_epoch_start(self, epoch: int) -> None:
        """Hook before each training epoch (1-based; after a resume, the resumed epoch's number), e.g. to
        switch a loss on after a warm-up."""

    @abstractmethod
    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        """Loss on one training batch."""

    def after_optimizer_step(self, model: nn.Module) -> None:
        """Hook after each optimizer step (e.g. EMA update)."""

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Validation metrics over the internal-validation batches; must include `objective`."""
        return {}

    def export(self, model: nn.Module, out_dir: str) -> None:
        """Write the trained model in its ecosystem's format (timm safetensors, diffusers folder, ONNX)."""
