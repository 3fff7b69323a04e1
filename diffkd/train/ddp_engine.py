"""Plain torch DistributedDataParallel behind the part of DeepSpeed's engine API the training loop uses.

`LoopConfig(engine="ddp")` trains through this instead of DeepSpeed. It exists because at ZeRO stage
0 DeepSpeed reduces gradients after the whole backward pass (flatten, all-reduce, copy back), while
DDP reduces gradient buckets during backward, overlapping communication with compute: with several
workers and no memory pressure DDP is the faster of the two. Anything ZeRO (stage >= 1: sharded
optimizer state, gradients or parameters) needs DeepSpeed.

Same rules as the DeepSpeed path, so the two engines train the same model: the optimizer the loop
builds, DeepSpeed's warm-up + cosine schedule (the same class, stepped once per optimizer step), the
loss divided by the accumulation steps, gradient clipping by global norm, bf16 autocast when asked.
A checkpoint is one file written by rank 0 (every rank holds the same state) under the folder and tag
the loop passes, so checkpoint verification, retention and resume work unchanged.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

STATE_FILE = "ddp_state.pt"


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, ds_config: dict):
    """DeepSpeed's WarmupCosineLR with the parameters of the generated DeepSpeed config."""
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    return WarmupCosineLR(optimizer, **ds_config["scheduler"]["params"])


class DDPEngine:
    """Wraps `model` in DDP (when there is more than one worker) with DeepSpeed-engine-like methods."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict, world_size: int,
                 device: torch.device):
        self.module = model.to(device)
        self.world_size = world_size
        self._forward = nn.parallel.DistributedDataParallel(
            self.module, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else model
        self.optimizer = optimizer
        self.lr_scheduler = warmup_cosine_schedule(optimizer, ds_config)
        self.accumulation = int(ds_config["gradient_accumulation_steps"])
        self.clip = float(ds_config["gradient_clipping"])
        self.autocast = ds_config.get("torch_autocast", {}).get("enabled", False)
        self.device = device
        self.global_steps = 0
        self.micro_steps = 0

    # the forward pass and train/eval modes, as on DeepSpeed's engine
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self._forward(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # what DeepSpeed's engine does too: the model's own attributes show through the wrapper
        module = self.__dict__.get("module")
        if module is None:
            raise AttributeError(name)
        return getattr(module, name)

    def train(self, mode: bool = True) -> "DDPEngine":
        self.module.train(mode)
        return self

    def eval(self) -> "DDPEngine":
        return self.train(False)

    def parameters(self):
        return self.module.parameters()

    def zero_optimization_stage(self) -> int:
        return 0

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.accumulation == 0

    def backward(self, loss: torch.Tensor) -> None:
        # gradients are reduced only on the micro-step that ends an accumulation window
        skip_sync = self.world_size > 1 and not self.is_gradient_accumulation_boundary()
        with self._forward.no_sync() if skip_sync else contextlib.nullcontext():
            (loss / self.accumulation).backward()

    def step(self) -> None:
        if self.is_gradient_accumulation_boundary():
            if self.clip > 0:
                nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.lr_scheduler.step()
            self.global_steps += 1
        self.micro_steps += 1

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    # checkpoints: the loop calls these on every rank
    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            folder = os.path.join(save_dir, tag)
            os.makedirs(folder, exist_ok=True)
            torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps,
                        "micro_steps": self.micro_steps}, os.path.join(folder, STATE_FILE))

    def load_checkpoint(self, load_dir: str, tag: str, **_: Any) -> tuple[str | None, dict]:
        """Restore from `load_dir/tag` (None when that holds no DDP state, as DeepSpeed answers)."""
        path = os.path.join(load_dir, tag, STATE_FILE)
        if not os.path.exists(path):
            return None, {}
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_steps, self.micro_steps = int(state["global_steps"]), int(state["micro_steps"])
        return path, {}
