"""`diffkd ablate`: what each arm trains, when a trial is stale, the tables from finished trials, and
(end to end) a tiny phantom through phantom -> ingest -> ablate, 2 arms x 2 seeds, then a rerun."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from diffkd.experiments.ablate import (
    TEACHER_ARMS,
    TRIAL_INFO,
    AblationConfig,
    Plan,
    applicable_arms,
    health_flags,
    optimizer_steps,
    ordered_trials,
    student_setup,
    summarize,
    teacher_setup,
    trial_dir,
    trial_key,
)
from diffkd.evaluate.pooled import pooled_auc_difference
from diffkd.experiments.experiment import ExperimentConfig

TINY_CONFIG = """\
name: ablate-test
splits: {val_fraction: 0.3, seed: 0}
ray: {address: "", num_cpus: 4}
diffusion:
  model:
    model: {image_size: 32, block_out_channels: [16, 32], layers_per_block: 1, condition_dim: 32}
    val_timesteps: 2
  loop: {epochs: 1, batch_size: 16, warmup_fraction: 0.5, cpus_per_worker: 1.0}
synth: {per_cell: 3, num_inference_steps: 2, batch_size: 8, num_actors: 1, chunk_rows: 32}
synthetic_ratio: 0.5
teacher:
  arch: resnet10t
  pipeline: {image_size: 32, batch_size: 16}
  loop: {epochs: 1, batch_size: 16, warmup_fraction: 0.5, cpus_per_worker: 1.0}
student:
  arch: mobilenetv3_small_050
  distill: {terms: {logit: {weight: 0.7, temperature: 4.0}}}
  pipeline: {image_size: 32, batch_size: 16}
  loop: {epochs: 1, batch_size: 16, warmup_fraction: 0.5, cpus_per_worker: 1.0}
tune: {enabled: false}
ablation: {arms: [full, neither], n_boot: 1000}
"""


def test_each_arm_trains_what_its_name_says():
    cfg = ExperimentConfig(synthetic_ratio=0.5)
    sources = ("run-1",)
    arms = {arm: student_setup(cfg, arm, 3, sources, "/t") for arm in ("full", "no_synthesis", "no_kd", "neither")}
    assert arms["full"].teacher_dir == "/t" and arms["full"].pipeline.synthetic_ratio == 0.5
    assert arms["no_synthesis"].teacher_dir == "/t" and arms["no_synthesis"].pipeline.synthetic_ratio == 0.0
    assert arms["no_kd"].teacher_dir == "" and arms["no_kd"].pipeline.synthetic_ratio == 0.5
    assert arms["neither"].teacher_dir == "" and arms["neither"].pipeline.synthetic_ratio == 0.0
    for arm in arms.values():  # the seed sets weights, augmentation and order; the generator run is shared
        assert (arm.loop.seed, arm.pipeline.seed, arm.pipeline.synthetic_sources) == (3, 3, sources)
    pairing_free = student_setup(cfg, "pairing_free", 0, sources, "/d")
    assert pairing_free.mode == "pairing_free" and pairing_free.pipeline.synthetic_ratio == 0.0
    synthetic, ratio = teacher_setup(cfg, "synthetic", 1, sources)
    assert ratio == 0.5 and synthetic.pipeline.modalities == ("us",) and synthetic.loop.seed == 1
    assert teacher_setup(cfg, "real", 1, sources)[1] == 0.0
    assert teacher_setup(cfg, "second_modality", 1, sources)[0].pipeline.modalities == ("us_doppler",)


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and key != "terms":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# What each student arm is about: the only settings in which it may differ from `full`.
ARM_DIFFERENCES = {
    "no_synthesis": {"pipeline.synthetic_ratio"},
    "no_kd": {"teacher_dir", "agreement_teacher_dir"},
    "neither": {"teacher_dir", "agreement_teacher_dir", "pipeline.synthetic_ratio"},
    "pairing_free": {"mode", "distill.terms", "pipeline.synthetic_ratio"},
}


def test_student_arms_differ_only_in_what_the_arm_is_about():
    """The same loop (schedule, epochs, burn-in, optimizer steps per epoch) for every student arm: the
    arms with synthetic rows take no more steps than the real-only ones; the student-budget teacher
    trains with the students' budget."""
    from diffkd.config import to_dict
    from diffkd.experiments.experiment import ARMS

    cfg = ExperimentConfig(synthetic_ratio=0.5)
    setups = {arm: _flat(to_dict(student_setup(cfg, arm, 1, ("run-1",), "/t", train_rows=500)))
              for arm in ARMS if arm not in TEACHER_ARMS}
    assert set(setups) == {"full", *ARM_DIFFERENCES}
    for arm, allowed in ARM_DIFFERENCES.items():
        differing = {k for k in set(setups[arm]) | set(setups["full"]) if setups[arm].get(k) != setups["full"].get(k)}
        assert differing == allowed, arm
    assert {s["loop.train_samples"] for s in setups.values()} == {500}  # one epoch length for every arm
    budget, ratio = teacher_setup(cfg, "synthetic_student_budget", 1, ("run-1",), train_rows=500)
    own, _ = teacher_setup(cfg, "synthetic", 1, ("run-1",), train_rows=500)
    assert ratio == 0.5 and budget.loop.lr == own.loop.lr
    assert (budget.loop.epochs, budget.loop.patience, budget.loop.min_epochs, budget.loop.train_samples) == (
        cfg.student.loop.epochs, cfg.student.loop.patience, cfg.student.loop.min_epochs, 500)
    cfg.student.loop.train_samples = 300  # a length the config sets is every arm's
    assert student_setup(cfg, "neither", 1, (), "", train_rows=500).loop.train_samples == 300


def test_the_tables_count_each_trials_optimizer_steps(tmp_path):
    student = trial_dir(str(tmp_path), "full", 0)
    teacher = os.path.join(str(tmp_path), "teachers", "synthetic-s0")
    for folder, steps, flags in ((student, 180, []), (teacher, 60, ["inverted", "unstable_auc"])):
        os.makedirs(folder)
        with open(os.path.join(folder, "training.json"), "w") as f:
            json.dump({"history": [{"epoch": 1, "global_step": steps // 2}, {"epoch": 2, "global_step": steps}],
                       "metrics": {"health": {"checks": {}, "flags": flags}}}, f)
    os.makedirs(trial_dir(str(tmp_path), "teacher", 0))
    with open(os.path.join(trial_dir(str(tmp_path), "teacher", 0), TRIAL_INFO), "w") as f:
        json.dump({"key": "k", "arm": "teacher", "seed": 0, "teacher": teacher}, f)
    assert optimizer_steps(str(tmp_path), "full", 0) == 180
    assert optimizer_steps(str(tmp_path), "teacher", 0) == 60
    assert math.isnan(optimizer_steps(str(tmp_path), "neither", 0))
    assert health_flags(str(tmp_path), "teacher", 0) == "inverted;unstable_auc"  # the teacher arm's teacher's
    assert health_flags(str(tmp_path), "full", 0) == "" == health_flags(str(tmp_path), "neither", 0)


def test_a_trial_is_stale_when_its_seed_config_or_teacher_changes():
    cfg = ExperimentConfig()
    plan = Plan(dataset="d", assignments=pd.DataFrame(), experiment={}, sources={0: ("a",), 1: ("a",)},
                data_key="k", out_dir="/o")
    base = trial_key(plan, cfg, "full", 0)
    assert trial_key(plan, cfg, "full", 0) == base
    assert trial_key(plan, cfg, "full", 1) != base
    cfg.teacher.loop.lr *= 2  # the teacher it distils from changed
    assert trial_key(plan, cfg, "full", 0) != base
    # a plain arm learns from no teacher, but records its agreement with the full arm's: that changed too
    assert trial_key(plan, cfg, "neither", 0) != trial_key(plan, ExperimentConfig(), "neither", 0)
    other_terms = ExperimentConfig()
    other_terms.student.distill.terms["logit"]["weight"] = 0.3  # a plain student has no distillation terms
    assert trial_key(plan, other_terms, "neither", 0) == trial_key(plan, ExperimentConfig(), "neither", 0)
    assert trial_key(plan, other_terms, "no_synthesis", 0) != trial_key(plan, ExperimentConfig(), "no_synthesis", 0)


def test_arms_a_dataset_cannot_train_are_left_out_with_a_note():
    kept, notes = applicable_arms(list(AblationConfig().arms), {"us"}, ExperimentConfig())
    assert "pairing_free" not in kept and any("pairing_free" in n for n in notes)
    kept, notes = applicable_arms(["full", "neither"], {"us"}, ExperimentConfig(synthetic_ratio=0.0))
    assert kept == ["neither"] and any("synthetic" in n for n in notes)
    assert [t["seed"] for t in ordered_trials(["full", "teacher"], [0, 1])] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="unknown arm"):
        AblationConfig(arms=["full", "fancy"])


def _write_trial(out_dir, arm, seed, cases: pd.DataFrame, prob: np.ndarray) -> None:
    folder = trial_dir(str(out_dir), arm, seed)
    os.makedirs(folder)
    cases.assign(prob=prob, model=arm).to_parquet(os.path.join(folder, "predictions.parquet"))
    with open(os.path.join(folder, TRIAL_INFO), "w") as f:
        json.dump({"key": "x", "arm": arm, "seed": seed}, f)


def _trial_cases(n: int, cases_per_patient: int = 1) -> tuple[np.ndarray, pd.DataFrame]:
    """Labels of n external cases (center X, every third positive) and the rows of a trial's predictions:
    those cases, then n internal-validation cases (center A) with the same labels."""
    labels = (np.arange(n) % 3 == 0).astype(int)
    cases = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)],
                          "patient_id": [f"p{i // cases_per_patient}" for i in range(n)],
                          "center": "X", "split": "test", "label": labels})
    internal = cases.assign(case_id=[f"v{i}" for i in range(n)], split="val", center="A")
    return labels, pd.concat([cases, internal], ignore_index=True)


def test_the_tables_pair_arms_by_seed_and_case(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    labels, both = _trial_cases(n, cases_per_patient=2)
    scores = {}
    for arm in ("full", "neither"):
        for seed in (0, 1, 2):
            scores[arm, seed] = labels * (1.0 if arm == "full" else 0.5) + rng.normal(size=n)
            _write_trial(tmp_path, arm, seed, both, np.r_[scores[arm, seed], rng.random(n)])
    trials = [{"arm": a, "seed": s} for a in ("full", "neither") for s in (0, 1, 2)]
    table, summary = summarize(str(tmp_path), trials, n_boot=1000)

    assert len(table) == 6 and set(table["center"]) == {"X"} and (table["cases"] == n).all()
    row = table[(table["arm"] == "neither") & (table["seed"] == 1)].iloc[0]
    from sklearn.metrics import roc_auc_score

    assert row["auc"] == pytest.approx(roc_auc_score(labels, scores["neither", 1]))
    neither = summary[summary["arm"] == "neither"].iloc[0]
    expected = pooled_auc_difference(labels, np.stack([scores["neither", s] for s in (0, 1, 2)]),
                                     np.stack([scores["full", s] for s in (0, 1, 2)]),
                                     patients=[f"p{i // 2}" for i in range(n)], n_boot=1000)
    assert neither["diff_vs_full"] == pytest.approx(expected.estimate)
    assert (neither["diff_ci_low"], neither["diff_ci_high"]) == pytest.approx(expected.ci)
    assert neither["mdd_80"] == pytest.approx(expected.mdd)
    assert neither["mdd_80"] >= (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * neither["diff_se"]
    assert neither["patients"] == n // 2
    assert neither["seeds_for_target"] == "more cases" or int(neither["seeds_for_target"]) >= 3
    full = summary[summary["arm"] == "full"].iloc[0]
    assert math.isnan(full.get("diff_vs_full", math.nan))
    assert full["mean_auc"] == pytest.approx(np.mean([roc_auc_score(labels, scores["full", s]) for s in (0, 1, 2)]))


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory):
    from diffkd.cli import main as cli

    root = tmp_path_factory.mktemp("ablate")
    phantom, data = root / "phantom", root / "data"
    assert cli(["phantom", "--out", str(phantom), "--size", "demo", "--centers", "2", "--patients", "56",
                "--difficulty", "0.5", "--seed", "2"]) == 0
    for center in ("center1", "center2"):
        assert cli(["ingest", str(phantom / center), "--center", center, "--dataset", str(data),
                    "--clinical", str(phantom / center / "clinical.csv")]) == 0
    config = root / "ablate.yaml"
    config.write_text(TINY_CONFIG)
    return {"root": root, "data": data, "config": config}


@pytest.mark.timeout(1800)  # a few minutes on an idle 2-core machine; generous for a shared one
def test_ablate_end_to_end_and_a_rerun_trains_nothing_again(tiny_phantom, capsys):
    from diffkd.cli import main as cli

    out = tiny_phantom["root"] / "out"
    command = ["ablate", "--dataset", str(tiny_phantom["data"]), "--external", "center2",
               "--config", str(tiny_phantom["config"]), "--out", str(out), "--seeds", "2"]
    assert cli(command) == 0
    finished = {(arm, seed): os.path.getmtime(os.path.join(trial_dir(str(out), arm, seed), TRIAL_INFO))
                for arm in ("full", "neither") for seed in (0, 1)}
    assert cli(command) == 0  # every trial is current: a new Tune experiment, nothing trained again
    printed = capsys.readouterr().out
    for (arm, seed), when in finished.items():
        assert os.path.getmtime(os.path.join(trial_dir(str(out), arm, seed), TRIAL_INFO)) == when
    assert len(list(out.glob("experiment-*"))) == 2

    table = pd.read_csv(out / "ablation.csv")
    trained = table[table["arm"].isin(["full", "neither"])]
    assert sorted(zip(trained["arm"], trained["seed"])) == [("full", 0), ("full", 1), ("neither", 0), ("neither", 1)]
    assert {"reader_birads", "full+birads"} <= set(table["arm"])  # the phantom's cases carry BI-RADS
    assert set(table["center"]) == {"center2"} and table["auc"].between(0, 1).all()
    summary = pd.read_csv(out / "ablation_summary.csv")
    neither = summary[summary["arm"] == "neither"].iloc[0]
    assert neither["seeds"] == 2 and neither["diff_ci_low"] <= neither["diff_vs_full"] <= neither["diff_ci_high"]
    assert 0 <= neither["p"] <= 1 and neither["mdd_80"] > 0
    assert (out / "ablation_forest.png").stat().st_size > 0
    # one generator for the whole ablation, one teacher per seed (the full arm's), no real-only teacher
    state = json.loads((out / "run_state.json").read_text())["stages"]
    assert {"diffusion", "synth"} <= set(state) and not any(name.startswith("diffusion-s") for name in state)
    assert sorted(os.listdir(out / "teachers")) == ["synthetic-s0", "synthetic-s0.lock", "synthetic-s1",
                                                   "synthetic-s1.lock"]
    record = json.loads((out / "ablation.json").read_text())
    assert any("ran once" in note for note in record["notes"])
    # the first invocation wrote the plan before training; the rerun kept it and followed it
    plan = json.loads((out / "plan.json").read_text())
    assert plan["first_trial_started_at"] >= plan["written_at"] and record["plan"]["digest"] == plan["digest"]
    assert record["evidence"] == "pre-registered" and record["plan"]["deviations"] == []
    assert (trained["optimizer_steps"] > 0).all() and "evidence: pre-registered" in printed
    # every student records its agreement with the full arm's teacher (the plain one too, unlearned)
    distillation = pd.read_csv(out / "distillation.csv")
    assert sorted(zip(distillation["arm"], distillation["seed"])) == [("full", 0), ("full", 1), ("neither", 0),
                                                                      ("neither", 1)]
    assert distillation["agree_corr"].between(-1, 1).all() and (distillation["agree_kl"] >= 0).all()
    assert (distillation["gap_ci_low"] <= distillation["gap"]).all()
    assert (distillation["gap"] <= distillation["gap_ci_high"]).all()
    teacher = json.loads((out / "trials" / "neither-s0" / TRIAL_INFO).read_text())["teacher"]
    assert teacher.endswith("synthetic-s0")
    assert "neither" in printed and "reference" in printed


def test_report_only_tables_the_current_trials_and_trains_nothing(tmp_path, ramp_dataset):

    from diffkd.experiments.ablate import ablate, data_key, student_train_rows
    from diffkd.data.splits import make_splits

    ds = ramp_dataset(tmp_path / "data")
    cfg = ExperimentConfig(synthetic_ratio=0.0)
    assignments = make_splits(ds.metadata().to_pandas(), ["B"], cfg.splits.val_fraction, cfg.splits.seed)
    plan = Plan(dataset=str(ds.uri), assignments=assignments, experiment={}, sources={0: (), 1: ()},
                data_key=data_key(ds), out_dir=str(tmp_path / "out"),
                train_rows=student_train_rows(assignments, cfg))
    external = assignments[assignments["split"] == "test"].drop_duplicates("case_id")
    for seed, key in ((0, trial_key(plan, cfg, "neither", 0)), (1, "stale")):
        folder = trial_dir(str(tmp_path / "out"), "neither", seed)
        os.makedirs(folder)
        external.assign(prob=np.linspace(0, 1, len(external)), model="neither").to_parquet(
            os.path.join(folder, "predictions.parquet"))
        with open(os.path.join(folder, TRIAL_INFO), "w") as f:
            json.dump({"key": key, "arm": "neither", "seed": seed}, f)

    outcome = ablate(str(tmp_path / "data"), ["B"], cfg, str(tmp_path / "out"),
                     AblationConfig(arms=["neither"], seeds=2, n_boot=1000, reader_column=""), train=False)
    assert list(zip(outcome.table["arm"], outcome.table["seed"])) == [("neither", 0)]  # the stale seed is left out
    assert outcome.parallel == 0 and not outcome.failed
    assert any("1 of 2 trial(s) did not finish" in note for note in outcome.notes)
    assert (tmp_path / "out" / "ablation.csv").exists() and not (tmp_path / "out" / "checkpoints").exists()
    assert not (tmp_path / "out" / "plan.json").exists()  # a report writes no plan: the run is exploratory
    assert outcome.plan["status"] == "exploratory" and "no plan.json" in outcome.plan["deviations"][0]
    assert set(pd.read_csv(tmp_path / "out" / "ablation_summary.csv")["evidence"]) == {"exploratory"}


def test_plan_only_writes_the_plan_first_and_the_tables_compare_with_it(tmp_path, ramp_dataset):
    from diffkd.experiments.ablate import ablate, data_key, plan_ablation, student_train_rows
    from diffkd.data.splits import make_splits
    from diffkd.experiments.preregistration import PlanError

    ds = ramp_dataset(tmp_path / "data")
    cfg = ExperimentConfig(synthetic_ratio=0.0)
    settings = AblationConfig(arms=["neither"], seeds=2, n_boot=1000)
    out = tmp_path / "out"
    plan = plan_ablation(str(tmp_path / "data"), ["B"], cfg, str(out), settings)
    assert json.loads((out / "plan.json").read_text()) == plan
    assert plan["arms"] == ["neither"] and plan["seeds"] == [0, 1] and plan["external"] == ["B"]
    assert plan["cohort"]["fingerprint"] == data_key(ds) and not plan["primary_endpoint"]["estimable"]
    assert plan["trials_finished_before_plan"] == [] and plan["expected"]["mdd_80"] > 0

    assignments = make_splits(ds.metadata().to_pandas(), ["B"], cfg.splits.val_fraction, cfg.splits.seed)
    trial_plan = Plan(dataset=str(ds.uri), assignments=assignments, experiment={}, sources={0: (), 1: ()},
                      data_key=data_key(ds), out_dir=str(out), train_rows=student_train_rows(assignments, cfg))
    external = assignments[assignments["split"] == "test"].drop_duplicates("case_id")
    folder = trial_dir(str(out), "neither", 0)
    os.makedirs(folder)
    external.assign(prob=np.linspace(0, 1, len(external)), model="neither").to_parquet(
        os.path.join(folder, "predictions.parquet"))
    with open(os.path.join(folder, TRIAL_INFO), "w") as f:
        json.dump({"key": trial_key(trial_plan, cfg, "neither", 0), "arm": "neither", "seed": 0}, f)
    with pytest.raises(PlanError, match="cannot be rewritten"):
        plan_ablation(str(tmp_path / "data"), ["B"], cfg, str(out), settings)

    outcome = ablate(str(tmp_path / "data"), ["B"], cfg, str(out), settings, train=False)
    assert outcome.plan["status"] == "exploratory" and outcome.plan["deviations"] == ["arm neither: seed(s) 1 missing"]
    assert outcome.plan["digest"] == plan["digest"]
    record = json.loads((out / "ablation.json").read_text())
    assert record["evidence"] == "exploratory" and record["plan"]["deviations"] == outcome.plan["deviations"]
    assert set(pd.read_csv(out / "ablation_summary.csv")["evidence"]) == {"exploratory"}


def test_the_reader_joins_the_tables_as_a_seed_free_arm_and_full_is_stacked_on_it(tmp_path):
    from sklearn.metrics import roc_auc_score

    from diffkd.experiments.ablate import format_summary, reader_arm, stacked_arm

    rng = np.random.default_rng(1)
    n = 60
    labels, both = _trial_cases(n)
    reading = pd.Series(2.0 * np.r_[labels, labels] + rng.normal(size=2 * n), index=both["case_id"])
    for seed in (0, 1):
        _write_trial(tmp_path, "full", seed, both, 1 / (1 + np.exp(-(np.r_[labels, labels] + rng.normal(size=2 * n)))))
    trials = [{"arm": "full", "seed": s} for s in (0, 1)]
    table, summary = summarize(str(tmp_path), trials, n_boot=1000, reader=("birads", reading))

    by_arm = summary.set_index("arm")
    assert {reader_arm("birads"), stacked_arm("birads")} <= set(by_arm.index)
    reader_row = by_arm.loc[reader_arm("birads")]
    assert reader_row["mean_auc"] == pytest.approx(roc_auc_score(labels, reading.iloc[:n]))
    assert reader_row["auc_between_seed_sd"] == pytest.approx(0.0)  # one reading, whatever the seed
    full = by_arm.loc["full"]
    assert full["diff_vs_reader"] == pytest.approx(full["mean_auc"] - reader_row["mean_auc"])
    stacked = by_arm.loc[stacked_arm("birads")]
    assert stacked["diff_vs_reader"] > 0  # the images add to a noisy reading
    assert "minus reader" in format_summary(summary)
