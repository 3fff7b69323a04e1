"""An exponential moving average of a model's weights: what the loop validates, selects and exports.

    average = WeightAverage(task.build_model(), decay=0.99); average.reset(model)
    ... after each optimizer step: average.update(model)

A small data set gives a student a few hundred optimizer steps at most, and its validation AUC moved
by far more than its sampling noise from one epoch to the next; the average of the recent weights
moves slowly. The decay warms up as min(decay, (1 + t) / (10 + t)) after t updates (timm's ModelEmaV3
warm-up): early on the average follows the weights closely, so a short run is not stuck near its
random start. Floating-point buffers (batch-norm statistics) are averaged too; integer ones copied.
"""
from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    def __init__(self, module: nn.Module, decay: float, updates: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the weight average's decay must be within (0, 1), got {decay}")
        self.module = module.eval().requires_grad_(False)
        self.decay = decay
        self.updates = updates

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Copy `model`'s weights (the start of a run)."""
        self.module.load_state_dict(model.state_dict())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        keep = self.current_decay()
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name].detach().to(average.device)
            if average.is_floating_point():
                average.lerp_(value.to(average.dtype), 1.0 - keep)
            else:
                average.copy_(value)
