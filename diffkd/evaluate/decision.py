"""Decision-curve analysis (Vickers & Elkin): net benefit across threshold probabilities.

At threshold probability t a clinician treats (here: plans surgery as for invasive disease) when the
predicted risk is >= t; t expresses how many false positives one true positive is worth:
net benefit = TP/N - FP/N * t / (1 - t). "Treat all" and "treat none" (net benefit 0) are the
default strategies a model must beat.

Net benefit reads predictions as risks. A model trained with class weights or with synthetic rows
that rebalance the classes does not output risks, so its probabilities are first recalibrated
(`recalibrated`: logistic recalibration fitted on each model's internal validation predictions and
applied unchanged to every cohort).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from diffkd.evaluate.calibration import Recalibration
from diffkd.evaluate.metrics import binary_labels

DEFAULT_THRESHOLDS = np.round(np.arange(0.05, 0.4001, 0.01), 4)  # 5-40%, the clinically plausible range


def net_benefit(labels: Sequence, probs: Sequence, thresholds: Sequence = DEFAULT_THRESHOLDS) -> np.ndarray:
    y = binary_labels(labels).astype(bool)
    p = np.asarray(probs, dtype=float)
    t = np.asarray(thresholds, dtype=float)
    if np.any((t <= 0) | (t >= 1)):
        raise ValueError("decision-curve thresholds must lie strictly between 0 and 1")
    treated = p[None, :] >= t[:, None]
    tp = (treated & y[None, :]).sum(axis=1)
    fp = (treated & ~y[None, :]).sum(axis=1)
    return tp / len(y) - fp / len(y) * t / (1 - t)


def treat_all_net_benefit(labels: Sequence, thresholds: Sequence = DEFAULT_THRESHOLDS) -> np.ndarray:
    prevalence = float(binary_labels(labels).mean())
    t = np.asarray(thresholds, dtype=float)
    return prevalence - (1 - prevalence) * t / (1 - t)


def decision_curve(labels: Sequence, probs: Sequence, thresholds: Sequence = DEFAULT_THRESHOLDS) -> pd.DataFrame:
    """Columns threshold, model, treat_all, treat_none."""
    t = np.asarray(thresholds, dtype=float)
    return pd.DataFrame({"threshold": t, "model": net_benefit(labels, probs, t),
                         "treat_all": treat_all_net_benefit(labels, t), "treat_none": np.zeros(len(t))})


def recalibrated(predictions: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, Recalibration]]:
    """Predictions with each model's `prob` replaced by its risk recalibrated on its own internal
    validation (`split == "val"`) rows; models whose validation rows hold one class keep their probabilities."""
    out = predictions.copy()
    fits: dict[str, Recalibration] = {}
    for model, val in predictions[predictions.split == "val"].groupby("model"):
        if val.label.nunique() < 2:
            continue
        fits[model] = Recalibration.fit(val.label.to_numpy(), val.prob.to_numpy())
        rows = out.model == model
        out.loc[rows, "prob"] = fits[model].apply(out.loc[rows, "prob"].to_numpy())
    return out, fits
