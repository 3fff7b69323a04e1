"""Leave-one-center-out: what makes a fold stale, the summary table and plot, and (slow) the whole job
through Ray Tune with folds in parallel and a center added afterwards."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from diffkd.config import to_dict
from diffkd.data.pipeline import PipelineConfig
from diffkd.loco import (FOLD_INFO, PREDICTIONS, fold_dir, fold_is_current, fold_key, format_table, summarize,
                         write_outputs)
from diffkd.train.loop_config import LoopConfig
from diffkd.train.teacher import TeacherConfig
from pipeline_fixtures import build_dataset, make_rows


def tiny_teacher() -> TeacherConfig:
    return TeacherConfig(arch="resnet18", pipeline=PipelineConfig(image_size=32, batch_size=8, augment=False),
                         loop=LoopConfig(epochs=1, batch_size=8, cpus_per_worker=1.0, progress=False))


def test_a_new_center_makes_every_fold_stale_and_nothing_else_does(tmp_path):
    ds = build_dataset(tmp_path / "ds")
    teacher = to_dict(tiny_teacher())
    key = fold_key(str(ds.uri), teacher, 0.2, 0)
    assert fold_key(str(ds.uri), teacher, 0.2, 0) == key
    assert fold_key(str(ds.uri), teacher, 0.3, 0) != key  # another internal-validation split
    ds.write_center("D", make_rows("D", 6))
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


def test_the_summary_has_a_row_per_center_a_pooled_row_and_a_forest_plot(tmp_path):
    out = str(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    write_fold(out, "A", labels, labels * 0.5 + rng.random(40) * 0.6)  # informative
    write_fold(out, "B", labels, rng.random(40))  # chance
    write_fold(out, "C", [0, 0, 0], [0.1, 0.2, 0.3])  # one class: no AUC
    table = summarize(out, ["A", "B", "C"])
    assert list(table["held_out"]) == ["A", "B", "C", "pooled"]
    a, b = table.iloc[0], table.iloc[1]
    assert a["external_auc"] > 0.8 and a["ci_low"] < a["external_auc"] < a["ci_high"]
    assert b["ci_low"] < 0.7 and a["internal_auc"] == 1.0
    assert np.isnan(table.iloc[2]["external_auc"]) and table.iloc[3]["cases"] == 83
    text = format_table(table)
    assert "n/a (one class)" in text and "pooled" in text
    files = write_outputs(out, table)
    assert pd.read_csv(files["table"]).shape[0] == 4 and os.path.getsize(files["plot"]) > 1000


@pytest.mark.slow
def test_folds_run_in_parallel_and_a_new_center_gets_its_fold(ray_local, tmp_path):
    from diffkd.loco import leave_one_center_out

    ds = build_dataset(tmp_path / "ds")
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

    ds.write_center("D", make_rows("D", 10))
    grown = leave_one_center_out(str(ds.uri), tiny_teacher(), out, parallel=2)
    assert list(grown.table["held_out"]) == ["A", "B", "C", "D", "pooled"]
    assert os.path.getmtime(os.path.join(fold_dir(out, "A"), PREDICTIONS)) > stamp  # A's training set grew
