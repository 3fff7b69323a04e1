"""timm and diffusers import on a CPU machine whose torchvision is the CUDA wheel (see diffkd/_torchvision_compat.py)."""
import subprocess
import sys


def test_timm_and_diffusers_import_in_a_fresh_interpreter():
    code = "import diffkd, timm, torchvision; from diffusers import DiffusionPipeline; print(torchvision.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
