import numpy as np
import pandas as pd
import pytest

from diffkd.evaluate.reader_arms import reader_predictions, reader_scores, stacked_probabilities


def test_reader_arm_repeats_its_scores_for_every_seed_and_drops_unread_cases():
    cases = pd.DataFrame({"case_id": ["a", "b", "b", "c"], "birads": ["2", "5", "5", None]})  # b: two images
    external = pd.DataFrame({"case_id": ["a", "b", "c"], "patient_id": ["p", "q", "r"], "center": "x",
                             "label": [0, 1, 1], "prob": 0.5})
    rows = reader_predictions(external, reader_scores(cases), "birads", seeds=[0, 1])
    assert sorted(rows["seed"].unique()) == [0, 1]
    assert set(rows["case_id"]) == {"a", "b"}
    assert rows.groupby("case_id")["prob"].nunique().eq(1).all()


def test_missing_reader_column_is_named():
    with pytest.raises(KeyError, match="birads"):
        reader_scores(pd.DataFrame({"case_id": ["a"]}))


def _trial(rng, n, split, image_signal, reader_signal):
    label = rng.integers(0, 2, n)
    image = 1 / (1 + np.exp(-(image_signal * (label - 0.5) + rng.normal(size=n))))
    reader = reader_signal * label + rng.normal(size=n)
    return pd.DataFrame({"case_id": [f"{split}{i}" for i in range(n)], "patient_id": [f"{split}{i}" for i in range(n)],
                         "center": "x", "split": split, "label": label, "prob": image}), reader


def test_stacked_model_adds_the_reader_to_the_image_model():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    val, val_reader = _trial(rng, 400, "val", 2.0, 2.0)
    test, test_reader = _trial(rng, 2000, "test", 2.0, 2.0)
    scores = pd.Series(np.concatenate([val_reader, test_reader]),
                       index=pd.concat([val, test])["case_id"].to_numpy())
    stacked = stacked_probabilities(pd.concat([val, test]), scores)
    assert (stacked["split"] == "test").all() and len(stacked) == len(test)
    image_auc = roc_auc_score(test["label"], test["prob"])
    reader_auc = roc_auc_score(test["label"], test_reader)
    stacked_auc = roc_auc_score(stacked["label"], stacked["prob"])
    assert stacked_auc > max(image_auc, reader_auc) + 0.02


def test_stacked_model_needs_both_classes_in_its_fitting_rows():
    rows = pd.DataFrame({"case_id": ["a", "b"], "patient_id": ["a", "b"], "center": "x", "split": ["val", "test"],
                         "label": [1, 0], "prob": [0.4, 0.6]})
    with pytest.raises(ValueError, match="both classes"):
        stacked_probabilities(rows, pd.Series([1.0, 2.0], index=["a", "b"]))
