"""The DeepSpeed config the training loop generates from a `LoopConfig`.

One place decides ZeRO stage, precision, batch arithmetic, clipping and the learning-rate schedule, so
every stage (diffusion, teacher, student) trains under the same rules. The optimizer itself is a
torch AdamW built here and handed to `deepspeed.initialize`: DeepSpeed's own Adam kernels need a
compiled extension (and on CPU would force its CPU-offload optimizer), torch's runs everywhere.
"""
from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from diffkd.train.ddp_engine import DDPEngine

if TYPE_CHECKING:
    from diffkd.train.loop_config import LoopConfig

PRECISIONS = ("auto", "fp32", "bf16")
# DeepSpeed logs every `steps_per_print` steps; the loop prints its own progress instead.
_NEVER = 10**9


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """'auto' means bf16 on a GPU and fp32 on CPU (bf16 matmuls on CPU are slow and gain nothing here)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def optimizer_steps(epochs: int, batches_per_epoch: int, grad_accum_steps: int) -> int:
    """Optimizer steps a run takes: the length of the learning-rate schedule."""
    return max(1, epochs * math.ceil(batches_per_epoch / grad_accum_steps))


def deepspeed_config(cfg: "LoopConfig", world_size: int, use_gpu: bool, total_steps: int) -> dict:
    """DeepSpeed config dict for `deepspeed.initialize(config=...)`.

    Precision 'bf16' uses DeepSpeed's `torch_autocast` section: weights, gradients and optimizer
    state stay fp32 while matmuls and convolutions run in bf16. Unlike DeepSpeed's `bf16` section it
    needs no casting of batches and leaves frozen helper modules a task builds itself (a teacher
    inside a student stage) working unchanged.
    """
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3 (got {cfg.zero_stage})")
    if cfg.batch_size < 1 or cfg.grad_accum_steps < 1:
        raise ValueError("batch_size and grad_accum_steps must be at least 1")
    # DeepSpeed's WarmupCosineLR divides by the warm-up length: at least one step, even when a short
    # run's fraction rounds to zero
    warmup = max(1, int(round(cfg.warmup_fraction * total_steps)))
    config: dict = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        # Keep the torch AdamW we pass in; DeepSpeed would otherwise demand its CPU Adam on CPU.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": total_steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": cfg.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }
    if resolve_precision(cfg.precision, use_gpu) == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


def prepare_deepspeed(use_gpu: bool) -> None:
    """Process-wide DeepSpeed setup, before `deepspeed.initialize`.

    On CPU, DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce kernel when it
    starts. Only DeepSpeed's inference all-reduce uses it (training reduces through torch.distributed),
    and the first build took from one to eight minutes on a 2-core machine, so it is marked
    unavailable here and never built.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    if not use_gpu:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_optimizer(model: nn.Module, cfg: "LoopConfig") -> torch.optim.Optimizer:
    """AdamW with no weight decay on biases and normalisation weights (1-d parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.999))


def build_engine(model: nn.Module, cfg: "LoopConfig", world_size: int, total_steps: int, device: torch.device):
    """The engine a training worker drives: DeepSpeed's, or plain torch DDP behind the same methods
    (`diffkd/train/ddp_engine.py`) where `cfg.engine` is ddp, or auto at ZeRO stage 0. Needs
    torch.distributed initialised.

    Reads only the optimisation fields of `cfg` (engine, zero_stage, precision, batch and schedule
    settings), so a bench without the rest of the framework can pass an object carrying just those.
    """
    import deepspeed

    config = deepspeed_config(cfg, world_size, device.type == "cuda", total_steps)
    optimizer = build_optimizer(model, cfg)
    if getattr(cfg, "resolved_engine", cfg.engine) == "ddp":
        return DDPEngine(model, optimizer, config, world_size, device)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, dist_init_required=False, config=config)
    if world_size == 1 and engine.zero_optimization_stage() == 0:
        # Alone, there is nothing to average: DeepSpeed would still flatten every gradient, all-reduce it
        # over a group of one and copy it back after each backward pass.
        engine.enable_backward_allreduce = False
    return engine
