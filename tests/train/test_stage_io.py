"""A classifier stage's outputs: per-case predictions (a case's views averaged, only the modalities the model
reads predicted) and the summary written beside them."""
import json

import pandas as pd
import pyarrow.fs
import pytest

import diffkd.train.stage_io
from diffkd.data.pipeline import PipelineConfig
from diffkd.train.loop import FitResult
from diffkd.train.stage_io import PREDICTIONS, TRAINING_INFO, predict_splits, prediction_summary, write_stage_outputs
from diffkd.train.teacher import TeacherConfig


@pytest.fixture
def image_scores(monkeypatch):
    """Replace the Ray-backed scoring by fixed per-image probabilities (the aggregation is under test)."""
    per_image = {"a": [0.2, 0.6], "b": [0.3], "d": [0.9]}

    def fake_make_dataset(dataset, case_ids, pipeline, train, centers):
        return list(case_ids)

    def fake_predict(model_dir, ray_ds, batch_size, num_actors):
        ids = list(dict.fromkeys(ray_ds))
        return pd.DataFrame([(c, p) for c in ids for p in per_image[c]], columns=["case_id", "prob"])

    monkeypatch.setattr(diffkd.train.stage_io, "make_dataset", fake_make_dataset)
    monkeypatch.setattr(diffkd.train.stage_io, "predict", fake_predict)


def test_a_cases_views_become_one_averaged_prediction(image_scores):
    rows = pd.DataFrame({"case_id": ["a", "a", "b", "d"], "patient_id": ["p", "p", "q", "r"],
                         "center": ["c1", "c1", "c1", "c2"], "split": ["val", "val", "val", "test"],
                         "label": [1, 1, 0, 1], "modality": ["us", "us", "us", "us_doppler"]})
    out = predict_splits(None, rows, PipelineConfig(modalities=("us",)), "model", TeacherConfig(), "teacher")
    assert sorted(out["case_id"]) == ["a", "b"]  # the Doppler case is not this model's to predict
    assert out.set_index("case_id").loc["a", "prob"] == pytest.approx(0.4)
    assert set(out["model"]) == {"teacher"}


def test_the_summary_and_training_info_describe_the_run(tmp_path):
    fitted = FitResult(run_name="r", run_path="/runs/r", filesystem=pyarrow.fs.LocalFileSystem(),
                       history=[{"epoch": 1}, {"epoch": 2}], objective="val_auc", mode="max", best_epoch=2,
                       best_metrics={}, best_checkpoint="/runs/r/c2", latest_checkpoint="/runs/r/c2",
                       stopped_early=False, restarts=[])
    predictions = pd.DataFrame({"case_id": ["a", "b", "c", "d", "e"], "split": ["val", "val", "test", "test", "train"],
                                "label": [0, 1, 1, 0, 1], "prob": [0.2, 0.7, 0.4, 0.6, 0.5]})
    metrics = prediction_summary(predictions, fitted)
    assert metrics["internal"] == {"auc": 1.0, "n": 2} and metrics["external"] == {"auc": 0.0, "n": 2}
    assert metrics["train"]["n"] == 1 and metrics["train"]["auc"] != metrics["train"]["auc"]  # one class: NaN
    assert (metrics["best_epoch"], metrics["epochs_run"], metrics["stopped_early"]) == (2, 2, False)
    write_stage_outputs(str(tmp_path), predictions, fitted, TeacherConfig(), metrics={"best_epoch": 2})
    info = json.loads((tmp_path / TRAINING_INFO).read_text())
    assert info["history"] == fitted.history and info["run_path"] == "/runs/r" and info["metrics"] == {"best_epoch": 2}
    assert info["config"]["arch"] == TeacherConfig().arch
    assert pd.read_parquet(tmp_path / PREDICTIONS).equals(predictions)


def test_scoring_in_the_driver_gives_the_ray_actors_probabilities(ray_local, tmp_path, two_modality_dataset,
                                                                 two_modality_splits):
    import torch

    from diffkd.models.classifiers import create_classifier, save_classifier

    ds = two_modality_dataset(tmp_path / "ds")
    rows = two_modality_splits(ds)
    torch.manual_seed(0)
    model_dir = str(tmp_path / "model")
    save_classifier(create_classifier("resnet18", in_chans=1), model_dir)
    pipeline = PipelineConfig(image_size=32, modalities=("us",))
    by_actor = predict_splits(ds, rows, pipeline, model_dir, TeacherConfig(predict_actors=1))
    in_driver = predict_splits(ds, rows, pipeline, model_dir, TeacherConfig(predict_actors=0))
    assert len(by_actor) == rows[rows["modality"] == "us"]["case_id"].nunique()
    pd.testing.assert_frame_equal(by_actor, in_driver, check_exact=False, atol=1e-6, check_dtype=False)
    assert by_actor["prob"].std() > 0  # a model that says something, not a constant
