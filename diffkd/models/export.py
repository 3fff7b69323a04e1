"""ONNX export of a trained classifier, with an ONNX Runtime parity check against torch."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

ONNX_FILE = "model.onnx"
OUTPUT_NAME = "logits"
OPSET = 18


class ExportError(RuntimeError):
    pass


def export_onnx(model: nn.Module, path: str | os.PathLike, inputs: Mapping[str, torch.Tensor],
                opset: int = OPSET) -> Path:
    """Write `model` as ONNX with a dynamic batch axis; input names are the keys of `inputs`.

    The file is written beside `path` under a temporary name and renamed into place, so a failed
    export never leaves a half-written model where a good one was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(inputs)
    batch = torch.export.Dim("batch", min=1)
    was_training = model.training
    model.eval()
    fd, tmp = tempfile.mkstemp(prefix=".onnx-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        # The exporter prints progress to stdout; keep stdout for what commands and benchmarks print.
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(model, tuple(inputs.values()), tmp, dynamo=True, external_data=False,
                              input_names=names, output_names=[OUTPUT_NAME], opset_version=opset,
                              dynamic_shapes=tuple({0: batch} for _ in names))
        os.replace(tmp, path)
    except Exception as err:
        raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: {err}") from err
    finally:
        model.train(was_training)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """A CPU ONNX Runtime session; `threads` pins intra-op threads (to compare fairly with torch)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx_parity(model: nn.Module, path: str | os.PathLike, inputs: Mapping[str, torch.Tensor],
                      atol: float = 1e-4, rtol: float = 1e-4) -> float:
    """Largest |torch − ONNX Runtime| over the outputs on `inputs`; raises ExportError when any output
    differs by more than atol + rtol·|torch output| (float32 rounding grows with the logit's size: an
    overconfident model's logits near 27 differ by ~1.5e-4, 5e-6 relative)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(*inputs.values()).numpy()
    finally:
        model.train(was_training)
    got = onnx_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    if got.shape != expected.shape:
        raise ExportError(f"{path}: ONNX output shape {got.shape} != torch {expected.shape}")
    gap = np.abs(got - expected)
    diff = float(gap.max())
    if not (gap <= atol + rtol * np.abs(expected)).all():  # also catches NaN
        raise ExportError(f"{path}: ONNX Runtime differs from torch by {diff:.2e} "
                          f"(more than {atol:.0e} + {rtol:.0e} x |output|)")
    return diff
