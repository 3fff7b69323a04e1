"""The phantom's ceilings: truth.csv joins the predictions through ingest's pseudonyms, metrics.json and
the per-center figure carry the Bayes and image-ceiling AUCs (and the reference score's), and no training stage ever gets the truth."""
from __future__ import annotations

import builtins
import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from diffkd.evaluate.report import ReportInputs, write_report
from diffkd.evaluate.summary import EvaluateConfig
from diffkd.evaluate.truth import TruthError, load_truth


def _truth_for(preds: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """A truth table for simulated predictions: the label probability knows the label well, the image
    probability less so, the reference score least."""
    rng = np.random.default_rng(seed)
    cases = preds.drop_duplicates("case_id")[["case_id", "center", "label"]].reset_index(drop=True)
    y = cases.label.to_numpy()
    return cases.assign(label_probability=1 / (1 + np.exp(-(1.5 * y + rng.normal(0, 1, len(y)) - 1))),
                        image_probability=1 / (1 + np.exp(-(y + rng.normal(0, 1.2, len(y))))),
                        reference_score=y + rng.normal(0, 2.0, len(y)))


def test_ceilings_sit_beside_every_model_per_center(tmp_path, simulate_predictions):
    preds = simulate_predictions(seed=2, models=("student_kd", "teacher"), cases_per_center=60)
    truth = _truth_for(preds)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    inputs = ReportInputs(truth=str(tmp_path / "truth.csv"))
    files = write_report(tmp_path / "run", preds, inputs, config=EvaluateConfig(ci_method="delong"))
    metrics = json.loads(files.metrics.read_text())
    ceilings = metrics["ceilings"]
    assert set(ceilings) == {"A", "B", "C", "D"}
    scored = preds[(preds.model == "student_kd") & preds.split.isin(["val", "test"])].merge(
        truth[["case_id", "label_probability", "image_probability", "reference_score"]], on="case_id")
    for center, part in scored.groupby("center"):
        entry = ceilings[center]
        assert entry["n"] == len(part) == metrics["models"]["student_kd"]["per_center"][center]["n"]
        assert entry["bayes_auc"] == pytest.approx(roc_auc_score(part.label, part.label_probability), abs=1e-12)
        assert entry["image_auc"] == pytest.approx(roc_auc_score(part.label, part.image_probability), abs=1e-12)
        assert entry["reference_auc"] == pytest.approx(roc_auc_score(part.label, part.reference_score), abs=1e-12)
        assert entry["cases_of"] == "student_kd" and entry["bayes_auc_ci"][0] <= entry["bayes_auc"]
    page = files.index.read_text()
    assert "Bayes AUC" in page and "image ceiling AUC" in page and "reference score AUC" in page
    assert f"C: image ceiling AUC {ceilings['C']['image_auc']:.3f}" in page  # the summary names the external ceiling
    # rebuilt from the report folder alone, the ceilings come back
    from diffkd.cli import main

    assert main(["report", "--predictions", str(files.predictions), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "report" / "metrics.json").read_text())
    assert again["ceilings"] == ceilings


def test_a_truth_file_of_another_cohort_is_refused(tmp_path, simulate_predictions):
    preds = simulate_predictions(seed=2, models=("student_kd",), cases_per_center=40)
    truth = _truth_for(preds)
    truth.drop(columns="image_probability").to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(TruthError, match="image_probability"):
        load_truth(tmp_path / "cols.csv", preds.case_id.unique())
    truth.assign(label=1 - truth.label).to_csv(tmp_path / "flipped.csv", index=False)
    with pytest.raises(TruthError, match="another cohort"):
        write_report(tmp_path / "run", preds, ReportInputs(truth=str(tmp_path / "flipped.csv")),
                     config=EvaluateConfig(ci_method="delong"))
    truth.assign(case_id="other-" + truth.case_id).drop(columns="center").to_csv(tmp_path / "ids.csv", index=False)
    with pytest.raises(TruthError, match="center column"):
        load_truth(tmp_path / "ids.csv", preds.case_id.unique())


def test_the_phantoms_case_ids_survive_ingest_and_join(tmp_path):
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.ingest import ingest
    from diffkd.data.phantom import generate_cohort

    generate_cohort(tmp_path / "phantom", size="demo", centers=2, patients=16, seed=4)
    for center in ("center1", "center2"):
        ingest(tmp_path / "phantom" / center, center, tmp_path / "data",
               clinical_csv=tmp_path / "phantom" / center / "clinical.csv")
    stored = ImageDataset(tmp_path / "data").metadata().to_pandas().drop_duplicates("case_id")
    raw = pd.read_csv(tmp_path / "phantom" / "truth.csv", dtype={"case_id": str})
    assert not raw.case_id.isin(stored.case_id).any()  # ingest stored pseudonyms, not the phantom's ids
    with pytest.raises(TruthError, match="--dataset"):
        load_truth(tmp_path / "phantom" / "truth.csv", stored.case_id)
    truth = load_truth(tmp_path / "phantom" / "truth.csv", stored.case_id, str(tmp_path / "data"))
    assert len(truth) == len(raw) == len(stored)
    joined = stored.merge(truth, on="case_id", suffixes=("", "_truth"))
    assert len(joined) == len(stored) and (joined.label == joined.label_truth).all()


def _mentions(value, needle: str, seen=None) -> bool:
    """True when `needle` is anywhere inside value: strings, paths, containers, dataclasses, table columns."""
    if isinstance(value, (str, os.PathLike)):
        return needle in str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _mentions(dataclasses.asdict(value), needle)
    if isinstance(value, dict):
        return any(_mentions(k, needle) or _mentions(v, needle) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return any(_mentions(v, needle) for v in value)
    if isinstance(value, pd.DataFrame):
        return any(c in value.columns for c in ("label_probability", "image_probability")) or any(
            needle in str(v) for c in value.columns if value[c].dtype == object for v in value[c].unique()[:1000])
    return False


def test_no_training_stage_ever_gets_the_truth(tmp_path, monkeypatch, ramp_dataset):
    """Every stage of `diffkd run` is replaced by a recorder; the truth path, its file and its columns may
    reach the report stage only, and nothing opens the file before it."""
    import diffkd.experiments.run
    import diffkd.experiments.stages
    import diffkd.runtime.raycompat

    ds = ramp_dataset(tmp_path / "ds")
    truth = tmp_path / "phantom" / "truth.csv"
    truth.parent.mkdir()
    truth.write_text("center,case_id,label,label_probability,image_probability,reference_score\n")
    calls: list[tuple[str, tuple, dict]] = []

    def recorder(name, result):
        def record(*args, **kwargs):
            calls.append((name, args, kwargs))
            return result(*args, **kwargs) if callable(result) else result
        return record

    def trained(_ds, _rows, _cfg, model_dir, **_kw):
        return SimpleNamespace(model_dir=model_dir, metrics={})

    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if Path(str(file)).resolve() == truth.resolve():
            raise AssertionError(f"{file} opened outside the report stage")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(diffkd.runtime.raycompat, "init", lambda *a, **k: None)
    stages = diffkd.experiments.stages
    monkeypatch.setattr(stages, "train_teacher", recorder("train_teacher", trained))
    monkeypatch.setattr(stages, "train_student", recorder("train_student", trained))
    monkeypatch.setattr(stages, "_search", recorder("tune", lambda *a, **k: pytest.fail("tune is disabled")))
    monkeypatch.setattr(stages, "baselines", recorder("baselines", {"summary": {}, "predictions": "", "params": {}}))
    monkeypatch.setattr(stages, "write_run_report", recorder("report", {"report": "", "metrics": ""}))
    monkeypatch.setattr(builtins, "open", guarded_open)

    cfg = stages.ExperimentConfig()
    cfg.diffusion.enabled = False
    cfg.tune.enabled = False
    cfg.pairing_free.enabled = False
    diffkd.experiments.run.run_pipeline(str(ds.uri), ["C"], cfg, tmp_path / "out", truth=str(truth))

    called = [name for name, _, _ in calls]
    assert called[-1] == "report" and {"train_teacher", "train_student", "baselines"} <= set(called)
    for name, args, kwargs in calls:
        sees_truth = _mentions(list(args), str(truth.resolve())) or _mentions(kwargs, str(truth.resolve()))
        assert sees_truth == (name == "report"), f"{name} {'does not get' if name == 'report' else 'gets'} the truth"
