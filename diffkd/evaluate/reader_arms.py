"""Arms an ablation scores beside the trained ones: the radiologists' own reading, and an image model
stacked on it.

- reader arm: a clinical column that is itself a reader's judgement (the BI-RADS category) used as
  the score of each external case. It has no training seed: every seed's rows hold the same scores,
  so its between-seed variance is zero and a paired difference against it carries only the trained
  arm's seed variance.
- stacked arm: a trained arm's probability and the reader's score in one logistic regression, fitted
  on that very trial's internal-validation rows (cases the image model never trained on, so its
  probabilities there are honest) and applied to the external cases: what the images add to the
  reading. Fitted per trial, so it keeps the image model's seed variance.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from diffkd.data.schema import birads_rank

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["case_id", "patient_id", "center", "split", "label", "prob"]


def reader_scores(cases: pd.DataFrame, column: str = "birads") -> pd.Series:
    """The reader's score of every case (index case_id) from a clinical column; BI-RADS by rank."""
    if column not in cases.columns:
        raise KeyError(f"the dataset has no {column!r} column to read the reader's score from")
    cases = cases.drop_duplicates("case_id")  # one reading per case, however many images it has
    values = cases[column].map(birads_rank).astype(float) if column == "birads" else pd.to_numeric(cases[column], errors="coerce")
    return pd.Series(values.to_numpy(), index=cases["case_id"].astype(str), name=column)


def reader_predictions(external: pd.DataFrame, scores: pd.Series, arm: str, seeds: list[int]) -> pd.DataFrame:
    """Rows of a seed-free reader arm on `external` cases (arm, seed, case_id, patient_id, center, label, prob).

    Cases the reader did not score are left out (the pooled comparisons pair on shared cases only)."""
    cases = external.drop_duplicates("case_id")[["case_id", "patient_id", "center", "label"]]
    cases = cases.assign(prob=cases["case_id"].astype(str).map(scores)).dropna(subset=["prob"])
    if cases.empty:
        return pd.DataFrame(columns=["arm", "seed", "case_id", "patient_id", "center", "label", "prob"])
    return pd.concat([cases.assign(arm=arm, seed=seed) for seed in seeds], ignore_index=True)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def stacked_probabilities(trial: pd.DataFrame, scores: pd.Series, fit_split: str = "val",
                          apply_split: str = "test") -> pd.DataFrame:
    """One trial's `apply_split` rows with `prob` replaced by the stacked model's probability.

    `trial` is a trial's predictions (PREDICTION_COLUMNS, every split). The model is
    logit P(label) = a + b * logit(image prob) + c * reader score, fitted on the `fit_split` rows;
    a reader score missing there or in `apply_split` takes the fitted rows' median."""
    fit = trial[trial["split"] == fit_split]
    target = trial[trial["split"] == apply_split]
    if fit["label"].nunique() < 2:
        raise ValueError(f"the trial has no {fit_split!r} rows of both classes to fit the stacked model on")
    reader_fit = fit["case_id"].astype(str).map(scores).to_numpy(dtype=float)
    fill = float(np.nanmedian(reader_fit)) if np.isfinite(reader_fit).any() else 0.0

    def design(rows: pd.DataFrame) -> np.ndarray:
        reader = rows["case_id"].astype(str).map(scores).to_numpy(dtype=float)
        return np.column_stack([_logit(rows["prob"].to_numpy(dtype=float)), np.where(np.isfinite(reader), reader, fill)])

    # A light L2 penalty: some internal validation sets are small, and a class separated by one input
    # would otherwise send the coefficients to infinity.
    model = LogisticRegression(C=1.0, max_iter=1000).fit(design(fit), fit["label"].astype(int).to_numpy())
    log.info("stacked model on %d %s rows: image logit %.3f, reader %.3f", len(fit), fit_split, *model.coef_[0])
    return target.assign(prob=model.predict_proba(design(target))[:, 1])
