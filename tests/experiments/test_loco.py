"""Leave-one-center-out: what makes a fold stale, the summary table and plot, and (slow) the whole job
through Ray Tune with folds in parallel and a center added afterwards."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from diffkd.config import to_dict
from diffkd.data.pipeline import PipelineConfig
from diffkd.experiments.loco import (FOLD_INFO, PREDICTIONS, fold_dir, fold_is_current, fold_key, fold_predictions,
                                     format_table, summarize, write_outputs)
from diffkd.train.loop_config import LoopConfig
from diffkd.train.teacher import TeacherConfig


def tiny_teacher() -> TeacherConfig:
    return TeacherConfig(arch="resnet18", pipeline=PipelineConfig(image_size=32, batch_size=8, augment=False),
                         loop=LoopConfig(epochs=1, batch_size=8, cpus_per_worker=1.0, progress=False))


def test_a_new_center_makes_every_fold_stale_and_nothing_else_does(tmp_path, ramp_dataset, ramp_rows):
    ds = ramp_dataset(tmp_path / "ds")
    teacher = to_dict(tiny_teacher())
    key = fold_key(str(ds.uri), teacher, 0.2, 0)
    assert fold_key(str(ds.uri), teacher, 0.2, 0) == key
    assert fold_key(str(ds.uri), teacher, 0.3, 0) != key  # another internal-validation split
    ds.write_center("D", ramp_rows("D", 6))
    assert fold_key(str(ds.uri), teacher, 0.2, 0) != key  # D joins the training set of every other fold

    folder = tmp_path / "fold"
    folder.mkdir()
    (folder / FOLD_INFO).write_text('{"key": "%s"}' % key)
    assert not fold_is_current(str(folder), key)  # no predictions: unfinished
    (folder / PREDICTIONS).write_bytes(b"")
    assert fold_is_current(str(folder), key) and not fold_is_current(str(folder), "other")


def write_fold(out: str, center: str, labels, probs, val_labels=(0, 1), val_probs=(0.2, 0.8)) -> None:
    os.makedirs(fold_dir(out, center), exist_ok=True)
    frame = pd.DataFrame({
        "case_id": [f"{center}-t{i}" for i in range(len(labels))] + [f"{center}-v{i}" for i in range(len(val_labels))],
        "split": ["test"] * len(labels) + ["val"] * len(val_labels),
        "label": list(labels) + list(val_labels), "prob": list(probs) + list(val_probs)})
    frame.to_parquet(os.path.join(fold_dir(out, center), PREDICTIONS), index=False)


def hand_dersimonian_laird(aucs, ses):
    """DerSimonian & Laird (1986) on logit AUC, written out step by step."""
    y = [math.log(a / (1 - a)) for a in aucs]
    v = [(se / (a * (1 - a))) ** 2 for a, se in zip(aucs, ses)]
    w = [1 / vi for vi in v]
    fixed = sum(wi * yi for wi, yi in zip(w, y)) / sum(w)
    q = sum(wi * (yi - fixed) ** 2 for wi, yi in zip(w, y))
    tau2 = max(0.0, (q - (len(y) - 1)) / (sum(w) - sum(wi * wi for wi in w) / sum(w)))
    w_star = [1 / (vi + tau2) for vi in v]
    mean = sum(wi * yi for wi, yi in zip(w_star, y)) / sum(w_star)
    se = math.sqrt(1 / sum(w_star))
    expit = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    z = stats.norm.ppf(0.975)
    return expit(mean), (expit(mean - z * se), expit(mean + z * se)), tau2, q


def test_the_pooled_auc_is_a_random_effects_meta_analysis_of_the_folds(tmp_path):
    out = str(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    # each fold's model scores on its own scale: A in [0, 0.16], B in [0.84, 1]. Pooling the scores into
    # one ROC would rank every B case above every A case; the folds' own AUCs are what is pooled.
    write_fold(out, "A", labels, 0.1 * (labels * 0.5 + rng.random(40) * 0.6))  # informative
    write_fold(out, "B", labels, 0.84 + 0.16 * rng.random(40))  # chance
    write_fold(out, "C", [0, 0, 0], [0.1, 0.2, 0.3])  # one class: no AUC, left out of the pooling
    table, pooled = summarize(out, ["A", "B", "C"])
    assert list(table["held_out"]) == ["A", "B", "C", "pooled"]
    a, b = table.iloc[0], table.iloc[1]
    assert a["external_auc"] > 0.8 and a["ci_low"] < a["external_auc"] < a["ci_high"]
    assert b["ci_low"] < 0.7 and a["internal_auc"] == 1.0
    assert a["ci_method"] == "delong"  # one case per patient (no patient ids: each case its own)
    assert np.isnan(table.iloc[2]["external_auc"]) and pooled["left_out"] == ["C"]

    expected_auc, expected_ci, tau2, q = hand_dersimonian_laird([a["external_auc"], b["external_auc"]],
                                                                [a["se"], b["se"]])
    row = table.iloc[3]
    assert row["external_auc"] == pytest.approx(expected_auc, rel=1e-12)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(expected_ci, rel=1e-12)
    assert pooled["tau2"] == pytest.approx(tau2, rel=1e-12) and pooled["q"] == pytest.approx(q, rel=1e-12)
    assert pooled["tau2"] > 0 and pooled["i2"] == pytest.approx((q - 1) / q)  # A and B disagree beyond chance
    assert row["cases"] == 80 and a["weight"] + b["weight"] == pytest.approx(1.0)
    scores_pooled = pd.concat([fold_predictions(out, c) for c in "AB"])
    scores_pooled = scores_pooled[scores_pooled["split"] == "test"]
    assert abs(roc_auc_score(scores_pooled["label"], scores_pooled["prob"]) - row["external_auc"]) > 0.05

    text = format_table(table, pooled)
    assert "n/a (one class)" in text and "DerSimonian-Laird" in text and "left out" in text
    assert format_table(table, pooled, positive_name="malignant").splitlines()[0].split()[3] == "malignant"
    files = write_outputs(out, table, pooled)
    assert pd.read_csv(files["table"]).shape[0] == 4 and os.path.getsize(files["plot"]) > 1000
    assert json.loads(open(files["pooled"]).read())["auc"] == pytest.approx(expected_auc)


def test_identical_folds_pool_without_heterogeneity():
    from diffkd.evaluate.metrics import pooled_auc

    pooled = pooled_auc([0.7, 0.7, 0.7], [0.05, 0.05, 0.05])
    assert pooled.tau2 == 0.0 and pooled.i2 == 0.0 and pooled.auc == pytest.approx(0.7)
    # three equal studies: the logit SE shrinks by sqrt(3)
    assert pooled.se_logit == pytest.approx(0.05 / (0.7 * 0.3) / math.sqrt(3))
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        pooled_auc([1.0, 0.7], [0.0, 0.05])


@pytest.mark.slow
def test_folds_run_in_parallel_and_a_new_center_gets_its_fold(ray_local, tmp_path, ramp_dataset, ramp_rows):
    from diffkd.experiments.loco import leave_one_center_out

    ds = ramp_dataset(tmp_path / "ds")
    out = str(tmp_path / "loco")
    first = leave_one_center_out(str(ds.uri), tiny_teacher(), out, parallel=2)
    assert first.parallel == 2
    assert list(first.table["held_out"]) == ["A", "B", "C", "pooled"]
    for center in "ABC":
        preds = pd.read_parquet(os.path.join(fold_dir(out, center), PREDICTIONS))
        assert set(preds.loc[preds["split"] == "test", "center"]) == {center}  # only the held-out center is external
        assert center not in set(preds.loc[preds["split"] != "test", "center"])
    stamp = os.path.getmtime(os.path.join(fold_dir(out, "A"), PREDICTIONS))

    again = leave_one_center_out(str(ds.uri), tiny_teacher(), out, parallel=2)  # nothing changed: nothing retrained
    assert os.path.getmtime(os.path.join(fold_dir(out, "A"), PREDICTIONS)) == stamp
    assert again.table.equals(first.table)

    ds.write_center("D", ramp_rows("D", 10))
    grown = leave_one_center_out(str(ds.uri), tiny_teacher(), out, parallel=2)
    assert list(grown.table["held_out"]) == ["A", "B", "C", "D", "pooled"]
    assert os.path.getmtime(os.path.join(fold_dir(out, "A"), PREDICTIONS)) > stamp  # A's training set grew
