"""The ablation's plan (diffkd.experiments.preregistration): written before training, never rewritten
after a trial finished, and every way a run departs from it listed."""
from __future__ import annotations

import json

import pytest

from diffkd.experiments.preregistration import (
    EXPLORATORY,
    PRE_REGISTERED,
    PlanError,
    PlanningAssumptions,
    build_plan,
    config_digest,
    deviations,
    evidence_status,
    expected_precision,
    read_plan,
    record_first_trial_start,
    write_plan,
)

CONFIG = {"student": {"loop": {"epochs": 15, "lr": 0.003, "progress_interval_s": 60}}, "ray": {"num_cpus": 4},
          "ablation": {"parallel": 2}}
ANALYSIS = {"method": "pooled", "n_boot": 2000, "level": 0.95}


def _content(**changes):
    values = dict(cohort_fingerprint="cohort-a", centers={"c3": {"cases": 250, "positives": 40}},
                  external=["c3", "c4"], config=CONFIG, arms=["full", "neither", "teacher"], seeds=[0, 1, 2],
                  arms_left_out=[], analysis=ANALYSIS, center="all external",
                  expected=expected_precision(95, 344, 3, PlanningAssumptions()))
    values.update(changes)
    return build_plan(**values)


def _run(**changes):
    run = dict(cohort_fingerprint="cohort-a", external=["c4", "c3"], config=CONFIG, analysis=ANALYSIS,
               finished={"full": [0, 1, 2], "neither": [0, 1, 2], "teacher": [0, 1, 2]})
    run.update(changes)
    return run


def test_the_plan_is_written_with_what_the_analysis_needs(tmp_path):
    plan = write_plan(str(tmp_path), _content(), done=[])
    on_disk = read_plan(str(tmp_path))
    assert on_disk == plan
    assert plan["primary_endpoint"]["arm"] == "full" and plan["primary_endpoint"]["comparator"] == "neither"
    assert plan["primary_endpoint"]["estimable"] and plan["analysis"]["alpha"] == 0.05
    assert plan["written_at"] and plan["first_trial_started_at"] is None and plan["digest"]
    assert plan["expected"]["mdd_80"] > plan["expected"]["ci_half_width"] > 0
    assert any("teacher - full" in s for s in plan["secondary_endpoints"])
    assert deviations(plan, **_run()) == [] and evidence_status([]) == PRE_REGISTERED
    started = record_first_trial_start(str(tmp_path))
    assert started["first_trial_started_at"] and deviations(started, **_run()) == []  # the digest still holds
    again = record_first_trial_start(str(tmp_path))
    assert again["first_trial_started_at"] == started["first_trial_started_at"]  # recorded once


def test_every_deviation_is_listed(tmp_path):
    plan = write_plan(str(tmp_path), _content(), done=[])
    changed = {**CONFIG, "student": {"loop": {"epochs": 20, "lr": 0.003, "progress_interval_s": 60}}}
    found = deviations(plan, **_run(config=changed))
    assert len(found) == 1 and "config digest changed" in found[0]
    runtime_only = {**CONFIG, "ray": {"num_cpus": 8},
                    "student": {"loop": {"epochs": 15, "lr": 0.003, "progress_interval_s": 5}}}
    assert deviations(plan, **_run(config=runtime_only)) == []  # where and how visibly it ran is no deviation
    found = deviations(plan, **_run(finished={"full": [0, 1, 2], "neither": [0, 1, 2]}))
    assert found == ["arm teacher dropped: planned, no finished trial"]
    found = deviations(plan, **_run(finished={"full": [0, 1, 2], "neither": [0, 2], "teacher": [0, 1, 2]}))
    assert found == ["arm neither: seed(s) 1 missing"] and evidence_status(found) == EXPLORATORY
    found = deviations(plan, **_run(finished={"full": [0, 1, 2, 3], "neither": [0, 1, 2], "teacher": [0, 1, 2],
                                              "no_kd": [0]}))
    assert found == ["arm full: seed(s) 3 not in the plan", "arm no_kd added: not in the plan"]
    assert "external centers changed" in deviations(plan, **_run(external=["c4"]))[0]
    assert "dataset changed" in deviations(plan, **_run(cohort_fingerprint="cohort-b"))[0]
    assert "analysis changed" in deviations(plan, **_run(analysis={**ANALYSIS, "n_boot": 1000}))[0]
    assert "no plan.json" in deviations(None, **_run())[0]
    edited = {**plan, "seeds": [0, 1, 2, 3, 4]}
    assert any("edited" in d for d in deviations(edited, **_run()))


def test_a_plan_cannot_be_rewritten_after_a_trial_finished(tmp_path):
    first = write_plan(str(tmp_path), _content(), done=[])
    assert write_plan(str(tmp_path), _content(seeds=[0, 1]), done=[])["seeds"] == [0, 1]  # nothing trained yet
    with pytest.raises(PlanError, match="cannot be rewritten after its first trial finished.*new --out"):
        write_plan(str(tmp_path), _content(), done=["full-s0"])
    assert read_plan(str(tmp_path))["seeds"] == [0, 1]  # the file is untouched
    late = write_plan(str(tmp_path / "other"), _content(), done=["full-s0"])  # no plan there: written, and marked
    assert late["trials_finished_before_plan"] == ["full-s0"]
    assert "after 1 trial(s) had finished" in deviations(late, **_run())[0]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plan.json").write_text("{not json")
    with pytest.raises(PlanError, match="new --out"):
        read_plan(str(tmp_path / "bad"))
    assert first["config_digest"] == config_digest(CONFIG)


def test_the_expected_precision_shrinks_with_seeds_and_cases():
    base = expected_precision(95, 344, 3, PlanningAssumptions())
    assert expected_precision(95, 344, 6, PlanningAssumptions())["mdd_80"] < base["mdd_80"]
    assert expected_precision(190, 688, 3, PlanningAssumptions())["mdd_80"] < base["mdd_80"]
    no_seed_noise = expected_precision(95, 344, 3, PlanningAssumptions(seed_sd=0.0))
    assert no_seed_noise["ci_half_width"] == pytest.approx(1.96 * no_seed_noise["se"], rel=1e-3)
    json.dumps(base)  # plan.json holds it as written


def test_the_config_digest_reads_a_search_space_by_content_not_by_folder(tmp_path):
    def checkout(name: str, space_text: str) -> dict:
        space = tmp_path / name / "tune_spaces" / "kd.yaml"
        space.parent.mkdir(parents=True)
        space.write_text(space_text)
        return {**CONFIG, "tune": {"enabled": False, "space": str(space)}}

    here, elsewhere = checkout("here", "temperature: [2, 4]\n"), checkout("elsewhere", "temperature: [2, 4]\n")
    assert config_digest(here) == config_digest(elsewhere)  # the same repository cloned to another folder
    assert config_digest(checkout("edited", "temperature: [2, 8]\n")) != config_digest(here)
