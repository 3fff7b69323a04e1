"""The shipped experiment configs load into the pipeline's config."""
from pathlib import Path

import pytest

from diffkd.config import ConfigError
from diffkd.experiments.experiment import load_experiment

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "evidence.yaml", "real.yaml"])
def test_shipped_experiment_configs_load(name):
    cfg = load_experiment(CONFIGS / name)
    assert Path(cfg.tune.space).exists()
    assert cfg.teacher.arch and cfg.student.arch


def test_the_real_image_config_reads_128_px_shares_one_loop_practice_and_feeds_an_ablation():
    cfg = load_experiment(CONFIGS / "real.yaml")
    classifiers = [cfg.teacher, cfg.student, cfg.baselines.feature_model]
    assert all(c.pipeline.image_size >= 128 for c in classifiers)
    assert {c.loop.ema_decay for c in classifiers} == {0.99} and cfg.diffusion.model.model.image_size == 64
    assert cfg.ablation.arms == ["full", "no_synthesis", "no_kd", "neither", "teacher"] and cfg.ablation.seeds >= 3


def test_a_misspelt_stage_key_fails_before_anything_runs(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "demo.yaml").read_text().replace("synthetic_ratio:", "synthetic_ration:"))
    with pytest.raises(ConfigError, match="synthetic_ration"):
        load_experiment(bad)


def test_the_old_flat_distill_layout_is_read_as_the_same_terms_with_a_warning(tmp_path):
    import warnings

    from diffkd.config import LayoutDeprecationWarning

    current = (CONFIGS / "demo.yaml").read_text()
    start = current.index("  distill:\n    terms:\n")
    block = current[start:current.index("  pipeline:", start)]  # the student's terms
    new = tmp_path / "new.yaml"
    new.write_text(current.replace(block, "  distill:\n    terms:\n      logit: {weight: 0.7, temperature: 4.0}\n"
                                          "      gkd_pro: {weight: 0.5}\n"))
    old = tmp_path / "old.yaml"
    old.write_text(current.replace(block, "  distill: {temperature: 4.0, alpha: 0.7, pro_weight: 0.5}\n"))
    with pytest.warns(LayoutDeprecationWarning, match=r"write it as `terms: \{'logit'"):
        upgraded = load_experiment(old).student.distill
    assert upgraded.terms == load_experiment(new).student.distill.terms == {
        "logit": {"weight": 0.7, "temperature": 4.0}, "gkd_pro": {"weight": 0.5}}
    assert upgraded.active_terms() == ["logit", "gkd_pro"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped config is in the current layout
        load_experiment(CONFIGS / "demo.yaml")
    old.write_text("student: {distill: {alpha: 0.5, terms: {logit: {weight: 0.5}}}}\n")
    with pytest.raises(ValueError, match="mixes `terms` with the old flat keys alpha"):
        load_experiment(old)


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml"])
def test_the_pairing_free_arm_is_group_kd_only_with_gkd_den_on(name):
    """PaGKD means no image pairs: the pairing-free student takes its own section's terms (GKD-Pro + GKD-Den),
    never the paired student's logit / feature KD, and GKD-Den is on after its warm-up."""
    from diffkd.distill import PAIRING_FREE
    from diffkd.experiments.experiment import PairingFreeStage
    from diffkd.experiments.stages import pairing_free_student

    cfg = load_experiment(CONFIGS / name)
    arm = pairing_free_student(cfg.student, cfg.pairing_free, "teacher_dir")
    assert set(cfg.student.distill.active_terms()) - PAIRING_FREE  # the paired student does have paired terms
    assert set(arm.distill.active_terms()) == {"gkd_pro", "gkd_den"} <= PAIRING_FREE
    assert arm.distill.warmup_epochs("gkd_den") < arm.loop.epochs  # GKD-Den trains in some epochs
    assert arm.mode == "pairing_free" and arm.pipeline.synthetic_ratio == 0.0
    assert (arm.teacher_modality, arm.student_modality) == (cfg.pairing_free.teacher_modality,
                                                            cfg.pairing_free.student_modality)
    assert set(PairingFreeStage().distill.active_terms()) == {"gkd_pro", "gkd_den"}  # the default too


def test_instance_kd_in_the_pairing_free_arm_only_where_its_own_section_names_it(tmp_path):
    from diffkd.experiments.stages import pairing_free_student

    text = (CONFIGS / "demo.yaml").read_text().replace(
        "gkd_den: {weight: 0.5, warmup_epochs: 1}}", "gkd_den: {weight: 0.5, warmup_epochs: 1}, feature: {weight: 0.3}}")
    (tmp_path / "x.yaml").write_text(text)
    cfg = load_experiment(tmp_path / "x.yaml")
    assert pairing_free_student(cfg.student, cfg.pairing_free, "t").distill.active_terms() == ["gkd_pro", "gkd_den",
                                                                                                "feature"]


def test_the_report_says_the_search_budget_of_every_arm_and_what_internal_validation_chose():
    import pandas as pd

    from diffkd.experiments.run import _search_note, _validation_note

    searches = {"student_kd": {"trials": 3, "trial_epochs": 9, "space": "kd_demo.yaml",
                               "best_params": {"distill.terms.gkd_pro.weight": 0.4, "loop.lr": 0.002}},
                "student_plain": {"trials": 3, "trial_epochs": 7, "space": "kd_demo.yaml",
                                  "best_params": {"loop.lr": 0.001}}}
    note = _search_note(searches)
    assert "same number of trials of kd_demo.yaml" in note and "teachers were not searched" in note
    assert "student_kd: 3 trials over distill.terms.gkd_pro.weight, loop.lr" in note
    assert "student_plain: 3 trials over loop.lr" in note
    table = pd.DataFrame({"case_id": ["a", "a", "b", "c", "d"], "split": ["val", "val", "val", "train", "val"],
                          "modality": ["us", "us", "us", "us", "us_doppler"], "synthetic": [False] * 5})
    searched = _validation_note(table, "us", searched=True)
    assert "(2 us cases)" in searched and "the search's settings" in searched and "operating threshold" in searched
    assert "search" not in _validation_note(table, "us", searched=False)
