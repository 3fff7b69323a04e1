"""bench/search.py's time split: a run's seconds from its epoch history add up to the run's span."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from search import history_split, run_end, split_trial  # noqa: E402


def history() -> list[dict]:
    """Three epochs from t=100: 4 s steps, 1 s validation, then 0.5 / 1.5 s of checkpoint + report."""
    return [{"started_at": 100.0, "train_s": 4.0, "val_s": 1.0, "startup_s": 6.0},
            {"started_at": 105.5, "train_s": 4.0, "val_s": 1.0, "startup_s": 6.0},
            {"started_at": 112.0, "train_s": 4.0, "val_s": 1.0, "startup_s": 6.0}]


def test_a_trials_parts_add_up_to_its_span():
    parts = split_trial(history(), trial_start=90.0, last_epoch_end=118.0)
    assert parts == pytest.approx({"data_prep_s": 4.0, "startup_s": 6.0, "training_s": 12.0, "validation_s": 3.0,
                                   "checkpoint_report_s": 0.5 + 1.5 + 1.0})
    assert sum(parts.values()) == pytest.approx(118.0 - 90.0)


def test_the_last_epochs_end_is_estimated_from_the_earlier_epochs_when_unknown():
    assert run_end(history()) == pytest.approx(112.0 + 5.0 + 1.0)  # mean checkpoint + report of 0.5 and 1.5
    assert history_split(history())["checkpoint_report_s"] == pytest.approx(3.0)
    one = history()[:1]
    assert run_end(one) == pytest.approx(105.0)  # nothing to estimate from: no checkpoint time counted
