"""How big and how fast a model is: parameter counts and CPU latency, for any torch or ONNX model."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """All parameters (trainable or not), counted once even when shared."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def time_call(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of `fn()` in milliseconds (median: robust to a busy machine's spikes)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def example_inputs(image_size: int, in_chans: int = 1, clinical_dim: int = 0, batch: int = 1,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs shaped like a classifier's: ``image`` and, when the model fuses them, ``clinical``."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"image": torch.randn(batch, in_chans, image_size, image_size, generator=g)}
    if clinical_dim:
        inputs["clinical"] = torch.randn(batch, clinical_dim, generator=g)
    return inputs


def torch_latency_ms(model: nn.Module, inputs: Mapping[str, torch.Tensor], repeats: int = 20,
                     warmup: int = 3) -> float:
    """Median CPU latency of one forward pass on `inputs` (eval mode, no autograd), in ms."""
    was_training = model.training
    model.eval()
    args = tuple(inputs.values())
    try:
        with torch.inference_mode():
            return time_call(lambda: model(*args), repeats, warmup)
    finally:
        model.train(was_training)


def onnx_latency_ms(session, inputs: Mapping[str, torch.Tensor | np.ndarray], repeats: int = 20,
                    warmup: int = 3) -> float:
    """Median latency of one ONNX Runtime run on `inputs`, in ms."""
    feed = {name: (v.numpy() if isinstance(v, torch.Tensor) else v) for name, v in inputs.items()}
    return time_call(lambda: session.run(None, feed), repeats, warmup)


def latency_ms(model: nn.Module, image_size: int, in_chans: int = 1, clinical_dim: int = 0,
               batch: int = 1, repeats: int = 20) -> float:
    """CPU latency per forward pass at `batch` (batch 1 = per-image latency), in ms."""
    return torch_latency_ms(model, example_inputs(image_size, in_chans, clinical_dim, batch), repeats)
