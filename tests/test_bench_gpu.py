"""bench/gpu.py runs where Ray (and pyarrow) are not installed: its --smoke mode on a CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_without_ray_or_pyarrow(tmp_path):
    absent = tmp_path / "absent"
    for package in ("ray", "pyarrow"):  # importing either fails, as where they are not installed
        (absent / package).mkdir(parents=True)
        (absent / package / "__init__.py").write_text(f"raise ImportError('{package} is not installed here')\n")
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(absent), str(ROOT)]),
           "BENCH_RESULTS_DIR": str(results)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--seconds", "0.2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ray_installed"] is False and result["smoke"] is True
    assert result["teacher"]["plain_torch_images_per_s"] > 0 and result["teacher"]["deepspeed_images_per_s"] > 0
    assert result["diffusion_train"]["train_steps_per_s"] > 0 and result["ddim_sampling"]["images_per_s"] > 0
    assert json.loads((results / "gpu.json").read_text()) == result
