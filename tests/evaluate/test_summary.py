"""metrics.json from predictions: the docs/dataset.md contract, the fixed threshold, comparisons, errors."""
import json

import numpy as np
import pandas as pd
import pytest

from diffkd.evaluate.metrics import OperatingPoint, ThresholdRule, clustered_bootstrap_auc_difference, delong_test
from diffkd.evaluate.readers import load_readers
from diffkd.evaluate.summary import EvaluateConfig, PredictionsError, build_metrics, validate_predictions

M_KEYS = {"auc", "auc_ci", "sensitivity", "specificity", "accuracy", "n"}


@pytest.fixture(scope="module")
def predictions(simulate_predictions):
    return simulate_predictions(seed=0)


def test_metrics_follow_the_contract(predictions):
    info = {"student_kd": {"params": 1_200_000, "latency_ms": 3.5}}
    audit = {"fid": 41.0, "kid": 0.02, "conditional_accuracy": 0.8, "near_copies": 0, "tstr_auc": 0.7}
    metrics = build_metrics(predictions, model_info=info, synthetic=audit)
    json.dumps(metrics, allow_nan=False)  # strict JSON
    assert set(metrics) >= {"models", "comparisons", "synthetic"}
    assert metrics["synthetic"] == audit
    assert list(metrics["models"])[:2] == ["student_kd", "teacher"]
    for name, entry in metrics["models"].items():
        assert set(entry) >= {"internal", "external", "per_center", "params", "latency_ms"}
        for m in (entry["internal"], entry["external"], *entry["per_center"].values()):
            assert set(m) >= M_KEYS and len(m["auc_ci"]) == 2
            assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]
        assert set(entry["per_center"]) == {"A", "B", "C", "D"}
    student = metrics["models"]["student_kd"]
    assert student["params"] == 1_200_000 and student["latency_ms"] == 3.5
    assert metrics["models"]["teacher"]["params"] is None
    ext = predictions[(predictions.model == "student_kd") & (predictions.split == "test")]
    assert student["external"]["n"] == len(ext)
    assert sum(student["per_center"][c]["n"] for c in ("C", "D")) == len(ext)


def test_threshold_is_fixed_on_internal_and_not_refitted(predictions):
    preds = predictions[predictions.model == "student_kd"].copy()
    external = preds.split == "test"
    preds.loc[external, "prob"] = preds.loc[external, "prob"] ** 0.5  # external scanner inflates scores
    internal = preds[preds.split == "val"]
    ext = preds[external]
    t_internal = ThresholdRule().fit(internal.label, internal.prob)
    t_external = ThresholdRule().fit(ext.label, ext.prob)
    at_internal = OperatingPoint.at_threshold(ext.label, ext.prob, t_internal).as_dict()
    at_refit = OperatingPoint.at_threshold(ext.label, ext.prob, t_external).as_dict()
    # the shift matters: re-fitting on external data would give a different operating point
    point = lambda d: (d["sensitivity"], d["specificity"])  # noqa: E731
    assert point(at_internal) != point(at_refit)

    entry = build_metrics(preds)["models"]["student_kd"]
    assert entry["threshold"] == entry["external"]["threshold"] == t_internal
    assert entry["external"]["sensitivity"] == at_internal["sensitivity"]
    assert entry["external"]["specificity"] == at_internal["specificity"]
    for center in ("C", "D"):
        part = ext[ext.center == center]
        expected = OperatingPoint.at_threshold(part.label, part.prob, t_internal).as_dict()
        assert entry["per_center"][center]["sensitivity"] == expected["sensitivity"]
        assert entry["per_center"][center]["threshold"] == t_internal


def test_comparisons_pair_cases_by_id(predictions):
    # rows of one model in a different order must not change the paired test
    shuffled = pd.concat([predictions[predictions.model != "teacher"],
                          predictions[predictions.model == "teacher"].sample(frac=1, random_state=0)])
    metrics = build_metrics(shuffled)
    pairs = {(c["a"], c["b"]): c for c in metrics["comparisons"]}
    others = set(predictions.model) - {"student_kd"}
    assert {a for a, b in pairs if b == "student_kd"} == others
    assert ("deep_features", "clinical") in pairs and ("combined", "deep_features") in pairs
    assert ("teacher", "teacher_real_only") in pairs  # synthetic data for the teacher, tested directly
    ext = predictions[predictions.split == "test"]
    a = ext[ext.model == "teacher"].set_index("case_id").sort_index()
    b = ext[ext.model == "student_kd"].set_index("case_id").sort_index()
    # some patients hold two cases: the default ("auto") takes the patient-clustered paired bootstrap
    assert a.patient_id.duplicated().any()
    expected = clustered_bootstrap_auc_difference(a.label, a.prob, b.prob, a.patient_id, n_boot=2000, seed=0,
                                                  strata=a.center)
    entry = pairs[("teacher", "student_kd")]
    assert entry["method"] == "bootstrap" and entry["p_delong"] is None
    assert entry["p"] == pytest.approx(expected.p, rel=1e-12) and entry["difference_ci"] == list(expected.ci)
    assert entry["n"] == len(a)
    # asked for DeLong, DeLong it is
    delong_pairs = {(c["a"], c["b"]): c for c in build_metrics(shuffled, config=EvaluateConfig(ci_method="delong"))
                    ["comparisons"]}
    assert delong_pairs[("teacher", "student_kd")]["p_delong"] == pytest.approx(
        delong_test(a.label, a.prob, b.prob).p, rel=1e-12)


def test_one_case_per_patient_gets_delong_and_metrics_say_so(predictions):
    one_each = predictions.assign(patient_id=predictions.case_id)
    metrics = build_metrics(one_each[one_each.model.isin(["student_kd", "teacher"])])
    assert metrics["evaluation"]["patients_with_several_cases"] == 0
    assert metrics["models"]["student_kd"]["external"]["auc_ci_method"] == "delong"
    assert {c["method"] for c in metrics["comparisons"]} == {"delong"}
    clustered = build_metrics(predictions[predictions.model.isin(["student_kd", "teacher"])])
    assert clustered["evaluation"]["patients_with_several_cases"] > 0
    assert clustered["models"]["student_kd"]["external"]["auc_ci_method"] == "bootstrap"
    assert clustered["models"]["student_kd"]["internal_vs_external"]["method"] == "bootstrap"


def test_bootstrap_option_and_internal_vs_external(predictions):
    cfg = EvaluateConfig(ci_method="bootstrap", n_boot=1000, seed=3)
    metrics = build_metrics(predictions[predictions.model.isin(["student_kd", "teacher"])], config=cfg)
    ext = metrics["models"]["student_kd"]["external"]
    assert ext["auc_ci_method"] == "bootstrap" and ext["auc_ci"][0] < ext["auc"] < ext["auc_ci"][1]
    assert "bootstrap" in metrics["evaluation"]["auc_ci"]
    ive = metrics["models"]["student_kd"]["internal_vs_external"]
    assert 0 <= ive["p"] <= 1 and ive["difference"] == pytest.approx(
        metrics["models"]["student_kd"]["internal"]["auc"] - ext["auc"])


def test_readers_enter_metrics(predictions, simulate_reads):
    reads = load_readers(simulate_reads(predictions))
    metrics = build_metrics(predictions, readers=reads)
    rows = metrics["readers"]["comparisons"]
    expected = {(r, c) for r in ("R1", "R2") for c in ("internal", "external")}
    assert {(r["reader"], r["cohort"]) for r in rows} == expected
    assert all(0 <= r["p_sensitivity"] <= 1 and 0 <= r["p_specificity"] <= 1 for r in rows)
    points = metrics["readers"]["operating_points"]
    assert all(p["n"] > 0 for p in points)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.drop(columns="prob"), "missing column"),
    (lambda d: d.assign(split=d.split.replace("test", "external")), "column 'split'"),
    (lambda d: d.assign(prob=d.prob.where(d.index != 5, 1.7)), "row 5, column 'prob'"),
    (lambda d: d.assign(label=d.label.where(d.index != 2, 3)), "row 2, column 'label'"),
    (lambda d: pd.concat([d, d.iloc[[0]]], ignore_index=True), "twice"),
    (lambda d: d.assign(label=np.where((d.model == "teacher") & (d.index == d[d.model == "teacher"].index[0]),
                                       1 - d.label, d.label)), "different 'label'"),
])
def test_bad_predictions_are_named(predictions, mutate, message):
    with pytest.raises(PredictionsError, match=message):
        validate_predictions(mutate(predictions.copy()))


def test_model_without_internal_rows_is_refused(predictions):
    preds = predictions[~((predictions.model == "clinical") & (predictions.split == "val"))]
    with pytest.raises(PredictionsError, match="clinical.*internal"):
        build_metrics(preds)


def test_a_pair_is_compared_once_whatever_the_reference(predictions):
    two = predictions[predictions.model.isin(["teacher", "teacher_real_only"])]
    config = EvaluateConfig(ci_method="delong", reference="teacher")
    pairs = [(c["a"], c["b"]) for c in build_metrics(two, config=config)["comparisons"]]
    assert pairs == [("teacher_real_only", "teacher")]
