"""How big and how fast a model is: parameter counts and CPU latency, for any torch or ONNX model."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from diffkd.models.export import example_inputs, export_onnx, onnx_session


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


def latency_table(model: nn.Module, image_size: int, in_chans: int = 1, clinical_dim: int = 0,
                  batches: tuple[int, ...] = (1, 32), repeats: int = 20, threads: int = 1,
                  onnx_path: str | None = None) -> dict[str, dict[str, float]]:
    """Milliseconds per image of `model` in torch and in ONNX Runtime at each batch size, one thread each:
    ``{"torch": {"b1": ms, "b32": ms}, "onnx": {...}}``.

    Both runtimes at both batch sizes, so two models compare like with like: at batch 1 per-call
    overhead dominates small inputs, at 32 the arithmetic does. `onnx_path` reuses an exported model
    (with a dynamic batch axis); otherwise the model is exported to a temporary file.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="diffkd-latency-") as tmp:
            path = onnx_path or export_onnx(model, os.path.join(tmp, "model.onnx"),
                                            example_inputs(image_size, in_chans, clinical_dim))
            session = onnx_session(path, threads=threads)
            table: dict[str, dict[str, float]] = {"torch": {}, "onnx": {}}
            for batch in batches:
                inputs = example_inputs(image_size, in_chans, clinical_dim, batch)
                reps = repeats if batch == 1 else max(3, repeats // 4)
                table["torch"][f"b{batch}"] = torch_latency_ms(model, inputs, reps) / batch
                table["onnx"][f"b{batch}"] = onnx_latency_ms(session, inputs, reps) / batch
    finally:
        torch.set_num_threads(previous)
    return table
