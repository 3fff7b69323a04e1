"""predictions.parquet -> metrics.json (the contract in docs/dataset.md, "What a run leaves behind").

predictions: one row per case and model with `case_id, patient_id, center, split, label, model, prob`;
`split` is `train`, `val` (internal validation) or `test` (external centers).

For every model a threshold is fitted once, on its internal (`val`) predictions, and applied
unchanged to the external cohort and to every center. Internal metrics therefore show the
threshold at its most favourable; external metrics show what a clinic adopting it would see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from diffkd.data.schema import DEFAULT_LABEL_NAMES
from diffkd.evaluate.calibration import calibration
from diffkd.evaluate.decision import recalibrated
from diffkd.evaluate.metrics import (CIOptions, OperatingPoint, ThresholdRule, auc_with_ci, independent_auc_test,
                                     paired_auc_test)
from diffkd.evaluate.readers import compare_readers, reader_aucs, reader_operating_points
from diffkd.evaluate.truth import center_ceilings

COLUMNS = ("case_id", "patient_id", "center", "split", "label", "model", "prob")
SPLITS = ("train", "val", "test")
COHORT_SPLITS = {"internal": "val", "external": "test"}
REFERENCE_MODEL = "student_kd"

# Display order and what each name means (DiffKD-DCIS ablations, then the baselines of An et al. 2025).
MODEL_DESCRIPTIONS = {
    "student_kd": "student distilled from the teacher trained on real + synthetic images (full pipeline)",
    "teacher": "teacher trained on real + synthetic images",
    "teacher_real_only": "teacher trained on real images only",
    "student_kd_real_only": "student distilled from the real-only teacher",
    "student_plain": "student trained alone on real images (no KD, no synthesis)",
    "student_pairing_free": "B-mode student distilled by group-level KD (GKD-Pro + GKD-Den) from the Doppler "
                            "teacher, with no image pairs (PaGKD, Hu et al. 2026)",
    "teacher_us_doppler": "teacher trained on Doppler images only (the pairing-free student's teacher)",
    "clinical": "An et al. 2025 clinical model: univariate screening, then multivariate logistic regression",
    "deep_features": "An et al. 2025 deep-feature model: CNN features (cross-fitted or frozen pretrained extractor), "
                     "mRMR, LASSO logistic regression",
    "combined": "An et al. 2025 combined model: selected deep features + clinical variables",
}
ABLATIONS = ("teacher_real_only", "teacher", "student_plain", "student_kd_real_only", "student_kd")
BASELINES = ("clinical", "deep_features", "combined")
# An et al. 2025 compare their three models with each other as well.
BASELINE_PAIRS = (("combined", "deep_features"), ("combined", "clinical"), ("deep_features", "clinical"))
SYNTHETIC_PAIRS = (("teacher", "teacher_real_only"),)  # does synthetic data help the teacher?
EXTRA_PAIRS = BASELINE_PAIRS + SYNTHETIC_PAIRS


class PredictionsError(ValueError):
    """Predictions that break the contract; the message names the column or row."""


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate:` section of an experiment config."""

    threshold: str = "youden"  # "youden" | "sensitivity"
    target_sensitivity: float = 0.9
    # "auto": DeLong where every patient has one case, else "bootstrap" (label-stratified, patient-clustered);
    # the same rule picks the paired test of two AUCs
    ci_method: str = "auto"
    n_boot: int = 2000
    seed: int = 0
    level: float = 0.95
    reference: str = REFERENCE_MODEL  # every comparison and the reader study are against this model
    # reader BI-RADS at or above this counts as positive; None: 4c for DCIS/upgrade, else 4a (biopsy recommended)
    birads_positive_from: str | None = None
    reader_probability_threshold: float = 0.5

    def __post_init__(self):
        _ = self.threshold_rule, self.ci_options  # constructing them validates the fields
        if self.ci_method in ("auto", "bootstrap") and self.n_boot < 1000:
            raise ValueError(f"n_boot={self.n_boot}: use at least 1000 bootstrap replicates")

    @property
    def threshold_rule(self) -> ThresholdRule:
        return ThresholdRule(self.threshold, self.target_sensitivity)

    @property
    def ci_options(self) -> CIOptions:
        return CIOptions(self.ci_method, self.n_boot, self.seed, self.level)


def ordered_models(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [m for m in MODEL_DESCRIPTIONS if m in names]
    return known + sorted(names - set(known))


def validate_predictions(predictions: pd.DataFrame, source: str = "predictions") -> pd.DataFrame:
    """Check the contract and return a normalized copy (string ids, int8 labels, float probs)."""
    missing = [c for c in COLUMNS if c not in predictions.columns]
    if missing:
        raise PredictionsError(f"{source}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    df = predictions.loc[:, list(COLUMNS)].reset_index(drop=True)
    if df.empty:
        raise PredictionsError(f"{source}: no rows")
    for col in ("case_id", "patient_id", "center", "split", "model"):
        nulls = df[col].isna()
        if nulls.any():
            raise PredictionsError(f"{source}: column '{col}' is empty in row {int(np.flatnonzero(nulls)[0])}")
        df[col] = df[col].astype(str)
    bad = ~df.split.isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PredictionsError(f"{source}: row {row}, column 'split' is {df.split[row]!r}; use {', '.join(SPLITS)}")
    label = pd.to_numeric(df.label, errors="coerce")
    bad = ~label.isin([0, 1])
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PredictionsError(f"{source}: row {row}, column 'label' is {df.label[row]!r}; labels are 0/1")
    df["label"] = label.astype(np.int8)
    prob = pd.to_numeric(df.prob, errors="coerce")
    bad = ~prob.between(0, 1)  # also catches NaN
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise PredictionsError(f"{source}: row {row}, column 'prob' is {df.prob[row]!r}; need a probability in [0, 1]")
    df["prob"] = prob.astype(float)
    dup = df.duplicated(["model", "case_id"])
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise PredictionsError(f"{source}: row {row}: model {df.model[row]!r} has case {df.case_id[row]!r} twice")
    per_case = df.groupby("case_id")[["label", "split", "center", "patient_id"]].nunique()
    for col in ("label", "split", "center", "patient_id"):
        bad_cases = per_case.index[per_case[col] > 1]
        if len(bad_cases):
            raise PredictionsError(f"{source}: case {bad_cases[0]!r} has different '{col}' values across models")
    return df


def cases_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per case: case_id, patient_id, center, split, label."""
    return predictions.drop_duplicates("case_id")[["case_id", "patient_id", "center", "split", "label"]]


def cohort_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """Per center: role, patients, cases, upgrades and rate, and cases per split (TRIPOD flow)."""
    cases = cases_table(predictions)
    rows = []
    for center, frame in cases.groupby("center", sort=True):
        external = frame.split == "test"
        role = "external" if external.all() else ("mixed" if external.any() else "internal")
        row = {"center": center, "role": role, "patients": frame.patient_id.nunique(), "cases": len(frame),
               "positives": int(frame.label.sum()), "positive_rate": float(frame.label.mean())}
        row.update({f"n_{s}": int((frame.split == s).sum()) for s in SPLITS})
        rows.append(row)
    table = pd.DataFrame(rows)
    role_order = table.role.map({"internal": 0, "mixed": 1, "external": 2})
    return table.iloc[np.lexsort((table.center, role_order))].reset_index(drop=True)


def fit_thresholds(predictions: pd.DataFrame, rule: ThresholdRule) -> dict[str, float]:
    """Each model's threshold, fitted on its internal validation (`val`) predictions only."""
    thresholds = {}
    for model, frame in predictions[predictions.split == "val"].groupby("model"):
        if frame.label.nunique() < 2:
            raise PredictionsError(f"model {model!r}: internal validation holds one class only; "
                                   "cannot fit a threshold")
        thresholds[model] = rule.fit(frame.label.to_numpy(), frame.prob.to_numpy())
    absent = sorted(set(predictions.model) - set(thresholds))
    if absent:
        raise PredictionsError(f"model(s) {', '.join(absent)} have no internal validation ('val') predictions; "
                               "the threshold must be fixed on internal data")
    return thresholds


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def jsonable(obj):
    """NaN/inf -> null, numpy scalars -> Python, tuples -> lists, other objects -> str: strict JSON."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite(float(obj))
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)  # paths, timestamps, enums in a caller's config


def cohort_metrics(frame: pd.DataFrame, threshold: float, config: EvaluateConfig = EvaluateConfig()) -> dict:
    """M for one model on one cohort: AUC (CI), operating point at the fixed threshold, calibration."""
    y, p = frame.label.to_numpy(), frame.prob.to_numpy()
    out: dict = {"n": len(frame), "n_pos": int(y.sum())}
    if 0 < y.sum() < len(y):
        est = auc_with_ci(y, p, config.ci_options, groups=frame.patient_id.to_numpy(),
                          strata=frame.center.to_numpy())
        out.update(auc=est.auc, auc_ci=list(est.ci), auc_ci_method=est.method)
        cal = calibration(y, p, config.level)
        out.update(calibration_intercept=cal.intercept, calibration_slope=cal.slope)
    else:
        out.update(auc=None, auc_ci=[None, None], auc_ci_method=None,
                   note="one class only: AUC undefined")
    out.update(OperatingPoint.at_threshold(y, p, threshold, config.level).as_dict())
    out["brier"] = float(np.mean((p - y) ** 2))
    return out


def paired_comparison(preds: pd.DataFrame, a: str, b: str, split: str, options: CIOptions) -> dict:
    pa = preds[(preds.model == a) & (preds.split == split)].set_index("case_id")
    pb = preds[(preds.model == b) & (preds.split == split)].set_index("case_id")
    common = pa.index.intersection(pb.index)
    entry: dict = {"a": a, "b": b, "cohort": {v: k for k, v in COHORT_SPLITS.items()}[split], "n": len(common)}
    y = pa.label.reindex(common).to_numpy()
    if len(common) == 0 or y.min() == y.max():
        entry.update(p=None, p_delong=None, method=None, note="no shared cases with both classes")
        return entry
    test = paired_auc_test(y, pa.prob.reindex(common).to_numpy(), pb.prob.reindex(common).to_numpy(), options,
                           groups=pa.patient_id.reindex(common).to_numpy(), strata=pa.center.reindex(common).to_numpy())
    # p_delong (the older key) is only filled when DeLong was the test
    entry.update(p=test.p, method=test.method, p_delong=test.p if test.method == "delong" else None,
                 auc_a=test.auc_a, auc_b=test.auc_b, difference=test.difference, difference_ci=list(test.ci), z=test.z)
    return entry


def comparisons(preds: pd.DataFrame, reference: str = REFERENCE_MODEL,
                extra_pairs: Sequence[tuple[str, str]] = EXTRA_PAIRS, options: CIOptions = CIOptions()) -> list[dict]:
    """Paired test (DeLong, or the patient-clustered bootstrap where a patient has several cases; see
    CIOptions) of each model vs `reference` on the same external cases, then `extra_pairs` present."""
    models = ordered_models(preds.model.unique())
    pairs = [(m, reference) for m in models if m != reference and reference in models]
    pairs += [(a, b) for a, b in extra_pairs if a in models and b in models and not {(a, b), (b, a)} & set(pairs)]
    return [paired_comparison(preds, a, b, "test", options) for a, b in pairs]


def _internal_vs_external(frame: pd.DataFrame, options: CIOptions) -> dict | None:
    internal, external = frame[frame.split == "val"], frame[frame.split == "test"]
    if any(c.label.nunique() < 2 for c in (internal, external)):
        return None
    a, b = (auc_with_ci(c.label.to_numpy(), c.prob.to_numpy(), options, groups=c.patient_id.to_numpy(),
                        strata=c.center.to_numpy()) for c in (internal, external))
    t = independent_auc_test(a, b, len(internal) + len(external), options.level)
    return {"p": t.p, "difference": t.difference, "difference_ci": list(t.ci), "method": t.method}


AGREEMENT = ("agree_corr", "agree_kl", "agree_top1")


def distillation_summary(preds: pd.DataFrame, students: Mapping[str, Mapping], options: CIOptions) -> dict:
    """Per student: its teacher, the epoch kept, its internal-validation agreement with the teacher and
    loss terms at that epoch, and its external AUC minus the teacher's on the same cases (paired test).

    `students`: {student: {"teacher": model name, "best_epoch": int, "history": [per-epoch metrics]}}.
    """
    out = {}
    for student, info in students.items():
        history = list(info.get("history") or [])
        best = next((h for h in history if h.get("epoch") == info.get("best_epoch")), {})
        teacher = info.get("teacher")
        entry = {"teacher": teacher, "best_epoch": info.get("best_epoch"), "epochs_run": len(history),
                 "at_best_epoch": {k: v for k, v in best.items()
                                   if k in ("val_auc", "ce", *AGREEMENT) or k.startswith("kd_")}}
        models = set(preds.model)
        if teacher in models and student in models:
            entry["external_gap"] = paired_comparison(preds, student, teacher, "test", options)
        out[student] = entry
    return out


def describe_ci_method(config: EvaluateConfig) -> str:
    bootstrap = (f"label-stratified patient-clustered bootstrap ({config.n_boot} replicates, seed {config.seed}; "
                 "percentile CI; paired differences: z from the replicates' SD)")
    if config.ci_method == "delong":
        return "DeLong (cases treated as independent)"
    if config.ci_method == "bootstrap":
        return bootstrap
    return (f"DeLong where every patient of the cohort has one case, else a {bootstrap}; each entry's "
            "auc_ci_method (comparisons: method) says which")


def build_metrics(predictions: pd.DataFrame, *, model_info: Mapping[str, Mapping] | None = None,
                  synthetic: Mapping | None = None, readers: pd.DataFrame | None = None,
                  baselines: Mapping | None = None, config: EvaluateConfig = EvaluateConfig(),
                  extra_pairs: Sequence[tuple[str, str]] = EXTRA_PAIRS, truth: pd.DataFrame | None = None,
                  label_names: Sequence[str] = DEFAULT_LABEL_NAMES,
                  distillation: Mapping[str, Mapping] | None = None) -> dict:
    """metrics.json as a dict (strict-JSON values: NaN becomes null).

    model_info: {model: {"params": int, "latency_ms": float, "latency": {runtime: {"b1": ms, ...}}}}
    (latency optional: ms per image in torch and ONNX Runtime by batch size); synthetic: the synthetic-data audit
    (fid, kid, conditional_accuracy, near_copies, tstr_auc); readers: `readers.load_readers(...)`
    output, compared with `config.reference` at its fixed threshold; baselines: the JSON summary
    of `baselines.fit_baselines(...)` (odds ratios, selected features), passed through; truth: a
    synthetic cohort's truth (`truth.load_truth(...)`), giving per center the Bayes and image-ceiling
    AUCs under "ceilings"; label_names: the dataset's outcome names (label 0, label 1 = positive);
    distillation: per student, its teacher's model name and training history (`distillation_summary`).
    """
    preds = validate_predictions(predictions)
    thresholds = fit_thresholds(preds, config.threshold_rule)
    _, recalibrations = recalibrated(preds)
    model_info = model_info or {}
    models: dict = {}
    for model in ordered_models(preds.model.unique()):
        frame = preds[preds.model == model]
        entry: dict = {}
        for cohort, split in COHORT_SPLITS.items():
            part = frame[frame.split == split]
            entry[cohort] = cohort_metrics(part, thresholds[model], config) if len(part) else None
        evaluated = frame[frame.split.isin(COHORT_SPLITS.values())]
        entry["per_center"] = {}
        for center, part in evaluated.groupby("center", sort=True):
            m = cohort_metrics(part, thresholds[model], config)
            m["split"] = "+".join(sorted(part.split.unique()))
            entry["per_center"][center] = m
        info = model_info.get(model, {})
        entry["params"] = int(info["params"]) if info.get("params") is not None else None
        entry["latency_ms"] = float(info["latency_ms"]) if info.get("latency_ms") is not None else None
        if info.get("latency"):  # ms per image by runtime and batch: {"torch": {"b1": .., "b32": ..}, "onnx": {..}}
            entry["latency"] = {runtime: {k: float(v) for k, v in by_batch.items()}
                                for runtime, by_batch in info["latency"].items()}
        entry["threshold"] = thresholds[model]
        entry["internal_vs_external"] = _internal_vs_external(frame, config.ci_options)
        if model in recalibrations:  # what the decision curves apply to this model's probabilities
            r = recalibrations[model]
            entry["recalibration"] = {"intercept": r.intercept, "slope": r.slope, "n": r.n,
                                      "fitted_on": "internal validation"}
        models[model] = entry

    out = {
        "label_names": {"0": label_names[0], "1": label_names[1]},  # what label 0 / 1 (positive) mean
        "models": models,
        "comparisons": comparisons(preds, config.reference, extra_pairs, config.ci_options),
        "synthetic": dict(synthetic) if synthetic else {"skipped": "no synthetic-data audit was provided"},
        "evaluation": {
            "internal": "split == 'val' (patient-level split of the training centers)",
            "external": "split == 'test' (held-out centers)",
            "threshold_rule": config.threshold_rule.describe(),
            "auc_ci": describe_ci_method(config),
            "patients_with_several_cases": int((cases_table(preds).groupby("patient_id").size() > 1).sum()),
            "level": config.level,
            "reference": config.reference,
            "cohorts": cohort_table(preds).to_dict("records"),
        },
    }
    if readers is not None and config.reference in thresholds:
        out["readers"] = {
            "model": config.reference,
            "operating_points": reader_operating_points(readers, cases_table(preds), config.level).to_dict("records"),
            "comparisons": compare_readers(readers, preds[preds.model == config.reference],
                                           thresholds[config.reference], config.level),
            "auc": reader_aucs(readers, preds, config.ci_options),
        }
    if distillation:
        out["distillation"] = distillation_summary(preds, distillation, config.ci_options)
    if baselines:
        out["baselines"] = dict(baselines)
    if truth is not None:
        out["ceilings"] = center_ceilings(preds, truth, config.reference, config.ci_options)
    return jsonable(out)


def headline_table(metrics: Mapping) -> str:
    """Plain-text table of every model's external (else internal) performance, for a terminal."""
    lines = [f"{'model':22s} {'cohort':8s} {'n':>5s}  {'AUC (95% CI)':21s} {'sens':>5s} {'spec':>5s} {'acc':>5s}"]
    for name, entry in metrics["models"].items():
        cohort = "external" if entry.get("external") else "internal"
        m = entry.get(cohort) or {}
        if m.get("auc") is None:
            lines.append(f"{name:22s} {cohort:8s} {m.get('n', 0):5d}  AUC undefined")
            continue
        auc = f"{m['auc']:.3f} ({m['auc_ci'][0]:.3f}-{m['auc_ci'][1]:.3f})"
        fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{name:22s} {cohort:8s} {m['n']:5d}  {auc:21s} {fmt(m['sensitivity']):>5s} "
                     f"{fmt(m['specificity']):>5s} {fmt(m['accuracy']):>5s}")
    return "\n".join(lines)
