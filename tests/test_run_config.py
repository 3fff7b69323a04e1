"""The shipped experiment configs load into the pipeline's config, and case-level predictions are what is evaluated."""
from pathlib import Path

import pandas as pd
import pytest

from diffkd.config import ConfigError
from diffkd.run import load_experiment, per_case

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_shipped_experiment_configs_load(name):
    cfg = load_experiment(CONFIGS / name)
    assert Path(cfg.tune.space).exists()
    assert cfg.teacher.arch and cfg.student.arch


def test_a_misspelt_stage_key_fails_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "demo.yaml").read_text().replace("synthetic_ratio:", "synthetic_ration:"))
    with pytest.raises(ConfigError, match="synthetic_ration"):
        load_experiment(bad)


def test_a_cases_views_are_averaged_into_one_prediction():
    views = pd.DataFrame({"case_id": ["a", "a", "b"], "patient_id": ["p", "p", "q"], "center": ["c"] * 3,
                          "split": ["test"] * 3, "label": [1, 1, 0], "model": ["m"] * 3, "prob": [0.2, 0.6, 0.3]})
    cases = per_case(views)
    assert len(cases) == 2
    assert cases.set_index("case_id").loc["a", "prob"] == pytest.approx(0.4)
