"""Simulated predictions and reads for the evaluate/report tests, as fixtures (factories).

Cases carry a latent risk; each model sees it through its own noise, and the external centers see
it through an extra shift, so models differ and external performance is lower, as in real data.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

MODEL_NOISE = {  # smaller noise = better discrimination
    "student_kd": 0.9, "teacher": 0.8, "teacher_real_only": 1.2, "student_kd_real_only": 1.3,
    "student_plain": 1.6, "clinical": 2.5, "deep_features": 1.1, "combined": 1.0,
}


def _simulate_predictions(seed: int = 0, internal=("A", "B"), external=("C", "D"), cases_per_center: int = 120,
                          models=tuple(MODEL_NOISE)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for center in (*internal, *external):
        n_patients = int(cases_per_center * 0.8)
        patients = [f"{center}-p{i:03d}" for i in range(n_patients)]
        patient_of_case = np.r_[np.arange(n_patients), rng.integers(0, n_patients, cases_per_center - n_patients)]
        for j, p in enumerate(patient_of_case):
            risk = rng.normal(-1.0, 1.5)
            label = int(rng.random() < 1 / (1 + np.exp(-risk)))
            split = "test" if center in external else ("val" if p % 3 == 0 else "train")
            rows.append({"case_id": f"{center}-c{j:03d}", "patient_id": patients[p], "center": center,
                         "split": split, "label": label, "risk": risk})
    cases = pd.DataFrame(rows)
    # a patient's cases share a split
    first_split = cases.groupby("patient_id").split.transform("first")
    cases["split"] = first_split
    frames = []
    for model in models:
        shift = np.where(cases.center.isin(external), 0.7, 0.0)
        eta = 1.6 * cases.risk + rng.normal(0, MODEL_NOISE[model], len(cases)) + shift * rng.normal(0, 1, len(cases))
        frames.append(cases.assign(model=model, prob=1 / (1 + np.exp(-(eta * 0.6 - 0.3)))))
    return pd.concat(frames, ignore_index=True).drop(columns="risk")


def _simulate_reads(predictions: pd.DataFrame, seed: int = 1) -> pd.DataFrame:
    """A senior and a junior reader on every validation and external case."""
    rng = np.random.default_rng(seed)
    cases = predictions.drop_duplicates("case_id")
    cases = cases[cases.split != "train"]
    rows = []
    for reader, experience, sens, spec in (("R1", "senior", 0.75, 0.7), ("R2", "junior", 0.6, 0.6)):
        for case in cases.itertuples():
            hit = rng.random() < (sens if case.label else spec)
            call = int(case.label if hit else 1 - case.label)
            rows.append({"reader": reader, "experience": experience, "case_id": case.case_id, "call": call,
                         "birads": "4c" if call else "4a", "probability": 0.7 if call else 0.2})
    return pd.DataFrame(rows)


def _simulate_distillation(rng: np.random.Generator, epochs: int = 6) -> dict:
    """Training histories of a distilled student and the plain control, as the student stage records them."""
    out = {}
    for student, kd in (("student_kd", True), ("student_plain", False)):
        history = []
        for epoch in range(1, epochs + 1):
            entry = {"epoch": epoch, "val_auc": 0.6 + 0.03 * epoch + rng.normal(0, 0.01), "ce": 0.7 / epoch,
                     "agree_corr": (0.5 if kd else 0.3) + 0.05 * epoch, "agree_kl": 0.2 / epoch,
                     "agree_top1": 0.7 + 0.02 * epoch}
            if kd:
                entry["kd_logit_standardized"] = 0.25 / epoch
            history.append(entry)
        out[student] = {"teacher": "teacher", "best_epoch": epochs - 1, "history": history}
    return out


def _simulate_health(distillation: dict) -> dict:
    """Training health of the simulated networks: the students' from their histories, an inverted teacher,
    and the deep-feature model's two cross-fitting extractors (one of them inverted)."""
    import math

    from diffkd.evaluate.health import check_health

    inverted = [{"epoch": e, "ce": 0.6, "val_auc": 0.3, "val_auc_se": 0.05} for e in range(1, 5)]
    healthy = [{"epoch": e, "ce": 0.5, "val_auc": 0.7, "val_auc_se": 0.05} for e in range(1, 3)]
    out = {name: check_health(entry["history"], math.log(2)) for name, entry in distillation.items()}
    out["teacher"] = check_health(inverted, math.log(2))
    out["deep_feature_model_fold0"] = check_health(healthy, math.log(2))
    out["deep_feature_model_fold1"] = check_health(inverted[:2], math.log(2))
    return out


def _simulate_report(tmp_path, seed: int = 0):
    """Predictions (with a real fitted clinical baseline), reads and ReportInputs for report tests."""
    from diffkd.evaluate.baselines import fit_baselines
    from diffkd.evaluate.figures import to_png
    from diffkd.evaluate.report import ReportInputs
    from matplotlib.figure import Figure

    preds = _simulate_predictions(seed=seed, models=tuple(m for m in MODEL_NOISE if m != "clinical"))
    rng = np.random.default_rng(seed)
    columns = ["case_id", "patient_id", "center", "split", "label"]
    cases = preds.drop_duplicates("case_id")[columns].reset_index(drop=True)
    # BI-RADS and palpability carry signal, age none; every level holds both outcomes (no separation)
    birads_shift = (rng.random(len(cases)) < 0.5) * cases.label.to_numpy() + rng.integers(0, 4, len(cases))
    cases["birads"] = np.array(["4a", "4b", "4c", "5"])[np.minimum(birads_shift, 3)]
    cases["age"] = rng.normal(55, 10, len(cases))
    cases["palpable"] = rng.random(len(cases)) < 0.2 + 0.2 * cases.label
    baselines = fit_baselines(cases, None, ["birads", "age", "palpable"])
    preds = pd.concat([preds, baselines.predictions], ignore_index=True)

    grids = []
    for i in range(2):
        fig = Figure(figsize=(2, 2))
        fig.subplots().imshow(rng.random((16, 16)), cmap="gray")
        path = tmp_path / f"grid_label{i}.png"
        path.write_bytes(to_png(fig))
        grids.append(str(path))
    inputs = ReportInputs(
        title="Simulated cohort", dataset={"name": "simulated", "modality": "us", "external": "C, D"},
        model_info={"student_kd": {"params": 1_100_000, "latency_ms": 2.0, "architecture": "resnet18",
                                   "latency": {"torch": {"b1": 2.0, "b32": 0.61}, "onnx": {"b1": 1.2, "b32": 0.43}}},
                    "teacher": {"params": 23_500_000, "latency_ms": 11.0, "architecture": "resnet50",
                                "latency": {"torch": {"b1": 11.0, "b32": 6.17}, "onnx": {"b1": 9.5, "b32": 5.29}}},
                    "clinical": {"params": baselines.params["clinical"]}},
        synthetic={"fid": 38.5, "kid": 0.021, "conditional_accuracy": 0.79, "near_copies": 0, "tstr_auc": 0.68},
        synthetic_grids=grids, baselines=baselines.summary, config={"seed": seed, "student": {"arch": "resnet18"}},
        initialised_from={"teacher": "/weights/resnet50", "student_kd": "scratch", "diffusion": "scratch"},
        distillation=(distillation := _simulate_distillation(rng)), health=_simulate_health(distillation),
        flow=[{"center": "A", "step": "images received", "n": 130},
              {"center": "A", "step": "excluded: no pathology", "n": 10}])
    return preds, _simulate_reads(preds), inputs


@pytest.fixture(scope="session")
def simulate_predictions():
    """Factory: (seed, internal, external, cases_per_center, models) -> predictions.parquet rows."""
    return _simulate_predictions


@pytest.fixture(scope="session")
def simulate_reads():
    """Factory: (predictions, seed) -> reader reads of those cases."""
    return _simulate_reads


@pytest.fixture(scope="session")
def simulate_report():
    """Factory: tmp_path -> (predictions, reads, ReportInputs) of a simulated run."""
    return _simulate_report
