"""The shipped experiment configs load into the pipeline's config."""
from pathlib import Path

import pytest

from diffkd.config import ConfigError
from diffkd.run import load_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "evidence.yaml"])
def test_shipped_experiment_configs_load(name):
    cfg = load_experiment(CONFIGS / name)
    assert Path(cfg.tune.space).exists()
    assert cfg.teacher.arch and cfg.student.arch


def test_a_misspelt_stage_key_fails_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "demo.yaml").read_text().replace("synthetic_ratio:", "synthetic_ration:"))
    with pytest.raises(ConfigError, match="synthetic_ration"):
        load_experiment(bad)
