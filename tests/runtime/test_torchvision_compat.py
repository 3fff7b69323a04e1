"""timm, diffusers and torchvision import on a CPU machine whose torchvision is the CUDA wheel, with no
diffkd import first (see diffkd/runtime/torchvision_compat.py)."""
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest


def _fresh(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the environment as a user has it
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**environ, **env}, cwd="/")


def test_the_compat_is_torchs_backend_entry_point_and_nothing_runs_without_torch():
    hooks = [e.value for e in entry_points(group="torch.backends") if e.name == "diffkd_torchvision_compat"]
    assert hooks == ["diffkd.runtime.torchvision_compat:install"], (
        "install diffkd into this environment (`make venv`, or `pip install -e .`), which declares the entry point")
    result = _fresh("import sys, json; print('diffkd' in sys.modules)")
    assert result.stdout.strip() == "False", result.stderr[-2000:]


@pytest.mark.parametrize("first", ["timm", "torchvision", "diffusers"])
def test_each_library_imports_on_its_own_in_a_fresh_interpreter(first):
    code = (f"import {first}, sys, timm, torchvision; from diffusers import DiffusionPipeline; "
            "print(timm.create_model('resnet18').num_classes)")
    result = _fresh(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1000"]


def test_the_compat_declares_the_operators_only_where_torchvisions_extension_cannot_load():
    """Without torch's backend autoloading, torchvision imports here exactly when its extension loads:
    the day this test skips, the CUDA-only wheel is gone and so can the compat module (docs/design.md)."""
    probe = ("import importlib.util, os, torch\n"
             "spec = importlib.util.find_spec('torchvision')\n"
             "torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), '_C.so'))")
    if _fresh(probe, TORCH_DEVICE_BACKEND_AUTOLOAD="0").returncode == 0:
        pytest.skip("torchvision's C extension loads here: the compat has nothing to do")
    result = _fresh("import torchvision", TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    assert result.returncode != 0 and "torchvision::nms" in result.stderr
    declared = _fresh("import torch\nfrom diffkd.runtime.torchvision_compat import declare_missing_ops\n"
                      "print(declare_missing_ops()); import torchvision", TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    assert declared.returncode == 0 and declared.stdout.split() == ["True"], declared.stderr[-2000:]
