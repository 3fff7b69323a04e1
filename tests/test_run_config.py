"""The shipped experiment configs load into the pipeline's config."""
from pathlib import Path

import pytest

from diffkd.config import ConfigError
from diffkd.run import load_experiment

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


def test_the_old_flat_distill_layout_is_read_as_the_same_terms_with_a_warning(tmp_path):
    import warnings

    from diffkd.config import LayoutDeprecationWarning

    current = load_experiment(CONFIGS / "demo.yaml").student.distill
    old = tmp_path / "old.yaml"
    old.write_text((CONFIGS / "demo.yaml").read_text().replace(
        "  distill:\n    terms:\n", "  distill: {temperature: 4.0, alpha: 0.7, pro_weight: 0.5}\n  unused:\n"
    ).replace("  unused:\n      logit: {weight: 0.7, temperature: 4.0}  # weight = α, taken from cross-entropy's share\n"
              "      gkd_pro: {weight: 0.5}\n", ""))
    with pytest.warns(LayoutDeprecationWarning, match=r"write it as `terms: \{'logit'"):
        upgraded = load_experiment(old).student.distill
    assert upgraded.terms == {"logit": {"weight": 0.7, "temperature": 4.0}, "gkd_pro": {"weight": 0.5}}
    assert upgraded.active_terms() == current.active_terms() == ["logit", "gkd_pro"]
    assert [upgraded.weight(n) for n in ("logit", "gkd_pro")] == [current.weight(n) for n in ("logit", "gkd_pro")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped config is in the current layout
        load_experiment(CONFIGS / "demo.yaml")
    old.write_text("student: {distill: {alpha: 0.5, terms: {logit: {weight: 0.5}}}}\n")
    with pytest.raises(ValueError, match="mixes `terms` with the old flat keys alpha"):
        load_experiment(old)
