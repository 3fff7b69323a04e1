"""timm and diffusers import on a CPU machine whose torchvision is the CUDA wheel (see diffkd/_torchvision_compat.py)."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

HOOK = "diffkd_torchvision_compat.pth"


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the environment as a user has it
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd="/")


def test_timm_and_diffusers_import_in_a_fresh_interpreter():
    code = "import diffkd, timm, torchvision; from diffusers import DiffusionPipeline; print(torchvision.__version__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_timm_imports_without_diffkd_where_diffkd_is_installed():
    """The install puts a start-up hook into site-packages: a user's `import timm` works with no diffkd import."""
    hook = Path(sysconfig.get_path("purelib"), HOOK)
    assert hook.is_file(), (f"{hook} is missing: install diffkd into this environment (`make venv`, or "
                            "`pip install -e .`), which installs the hook")
    assert hook.read_text() == (Path(__file__).parents[1] / HOOK).read_text()
    result = _fresh("import sys, timm; print('diffkd' in sys.modules, timm.create_model('resnet18').num_classes)")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "1000"]  # the hook imported the shim before timm


def test_the_hook_does_nothing_where_diffkd_cannot_be_imported(tmp_path):
    """A `.pth` line runs in every interpreter of the environment: without diffkd it must stay silent."""
    line = (Path(__file__).parents[1] / HOOK).read_text()
    code = f"import sys; sys.modules['diffkd'] = None\n{line}\nprint('ok')"
    result = _fresh(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok" and not result.stderr, result.stderr
