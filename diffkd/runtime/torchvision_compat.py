"""Let the CUDA build of torchvision import beside CPU torch.

PyPI has no CPU build of torchvision 0.28 (timm needs torchvision): on a CPU machine the installed
wheel's C extension needs libtorch_cuda and cannot load, and torchvision's import then fails while
registering fake kernels for its `nms`/`qnms` operators. diffkd uses torchvision's Python parts only
(through timm and diffusers), so when the C extension cannot load we declare those two operator
schemas first; nothing else changes. With a matching torchvision (any GPU install) this does nothing.

How it runs: `install` is a `torch.backends` entry point (pyproject.toml), which torch calls at the
end of `import torch`; nothing of diffkd runs in a process that does not import torch. timm, diffusers
and torchvision all import torch before torchvision's operators are registered. docs/design.md says
when this module can go.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_libraries: list = []  # keep the declarations alive for the life of the process


def declare_missing_ops() -> bool:
    """Declare torchvision's operator schemas if its C extension cannot load; True if it did."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    extension = os.path.join(os.path.dirname(spec.origin), "_C.so")
    try:
        torch.ops.load_library(extension)
        return False
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _libraries.append(library)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs `declare_missing_ops` once, just before the first `import torchvision`."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_ops()
        return None  # the regular finders import it


def install() -> None:
    """Declare the operators before torchvision registers them: now if torchvision is what is importing
    torch, else just before its first import."""
    if "torchvision" in sys.modules:  # `import torchvision` came first; it imports torch before its operators
        declare_missing_ops()
    elif not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
