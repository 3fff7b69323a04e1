"""A classifier stage's outputs: per-case predictions (a case's views averaged, only the modalities the model
reads predicted) and the summary written beside them."""
import pandas as pd
import pytest

import diffkd.train.stage_io
from diffkd.data.pipeline import PipelineConfig
from diffkd.train.stage_io import predict_splits
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
