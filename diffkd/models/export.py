"""Export of a trained classifier: its timm folder and an ONNX model checked against torch by ONNX Runtime."""
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

from diffkd.data.schema import DEFAULT_LABEL_NAMES, ClinicalEncoding
from diffkd.models.classifiers import classify, save_classifier, uses_clinical

ONNX_FILE = "model.onnx"
OUTPUT_NAME = "logits"
OPSET = 18


class ExportError(RuntimeError):
    pass


def example_inputs(image_size: int, in_chans: int = 1, clinical_dim: int = 0, batch: int = 1,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs shaped like a classifier's: ``image`` and, when the model fuses them, ``clinical``."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"image": torch.randn(batch, in_chans, image_size, image_size, generator=g)}
    if clinical_dim:
        inputs["clinical"] = torch.randn(batch, clinical_dim, generator=g)
    return inputs


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


class OnnxView(nn.Module):
    """A classifier as a function of named tensors, (image[, clinical]) -> logits: what ONNX exports."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return classify(self.model, {"image": image, "clinical": clinical})


def export_classifier(model: nn.Module, out_dir: str, preprocessing: dict,
                      label_names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> float:
    """Write the classifier as timm safetensors + config.json (`preprocessing`: `classifiers.data_config`;
    its outputs named `label_names`, the dataset's outcomes) and as model.onnx; returns the ONNX parity gap.

    The ONNX model takes ``image`` [B, C, H, W] (and ``clinical`` [B, W] for a fusion classifier) at
    any batch size and returns logits; ONNX Runtime must match torch within 1e-4 (+ 1e-4 relative) or export fails.
    """
    model = model.float().eval().cpu()
    save_classifier(model, out_dir, preprocessing, label_names=label_names)
    in_chans, image_size, _ = preprocessing["input_size"]
    clinical_dim = ClinicalEncoding().width if uses_clinical(model) else 0
    view = OnnxView(model)
    path = export_onnx(view, os.path.join(out_dir, ONNX_FILE), example_inputs(image_size, in_chans, clinical_dim, 2))
    return check_onnx_parity(view, path, example_inputs(image_size, in_chans, clinical_dim, batch=3, seed=1))
