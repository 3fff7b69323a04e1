"""Calibration: does a predicted 30% mean 30 of 100 such cases are upgraded?

- calibration intercept ("calibration-in-the-large"): logistic fit of the outcome on an offset of
  logit(p) with the slope fixed at 1; 0 is ideal, > 0 means risks are underestimated;
- calibration slope: logistic recalibration logit P(y) = a + b logit(p); 1 is ideal, < 1 means
  predictions are too extreme (overfitting);
- Brier score: mean (p - y)^2;
- reliability curve: observed event rate per bin of predicted risk, with Wilson CIs;
- logistic recalibration fitted on internal validation (`Recalibration`), so that risks read off a
  model trained with class weights or rebalanced synthetic rows mean what they say before a
  decision curve uses them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from diffkd.evaluate.logistic import fit_logistic
from diffkd.evaluate.metrics import binary_labels, wilson_ci

_EPS = 1e-6  # probabilities are clipped before the logit so 0 and 1 stay finite


def logit(p: Sequence) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=float), _EPS, 1 - _EPS)
    return np.log(q / (1 - q))


@dataclass(frozen=True)
class Calibration:
    intercept: float
    intercept_ci: tuple[float, float]
    slope: float
    slope_ci: tuple[float, float]
    brier: float
    n: int
    converged: bool  # False when the recalibration fit hit (quasi-)separation

    def as_dict(self) -> dict:
        d = asdict(self)
        d["intercept_ci"], d["slope_ci"] = list(self.intercept_ci), list(self.slope_ci)
        return d


def brier_score(labels: Sequence, probs: Sequence) -> float:
    y = binary_labels(labels)
    return float(np.mean((np.asarray(probs, dtype=float) - y) ** 2))


def calibration(labels: Sequence, probs: Sequence, level: float = 0.95) -> Calibration:
    y = binary_labels(labels)
    lp = logit(probs)
    if y.min() == y.max():
        nan = (math.nan, math.nan)
        return Calibration(math.nan, nan, math.nan, nan, brier_score(y, probs), len(y), False)
    ones = np.ones((len(y), 1))
    citl = fit_logistic(ones, y, offset=lp)
    recal = fit_logistic(np.column_stack([ones, lp]), y)
    ci_lo, ci_hi = citl.wald_ci(level)
    s_lo, s_hi = recal.wald_ci(level)
    return Calibration(
        intercept=float(citl.coef[0]), intercept_ci=(float(ci_lo[0]), float(ci_hi[0])),
        slope=float(recal.coef[1]), slope_ci=(float(s_lo[1]), float(s_hi[1])),
        brier=brier_score(y, probs), n=len(y), converged=citl.converged and recal.converged)


def reliability_curve(labels: Sequence, probs: Sequence, n_bins: int = 10,
                      strategy: str = "quantile", level: float = 0.95) -> pd.DataFrame:
    """Observed vs mean predicted risk per bin: columns mean_predicted, observed, lo, hi, n.

    `quantile` bins hold equal case counts (bins with identical edges merge); `uniform` bins split
    [0, 1] evenly. Empty bins are dropped.
    """
    y = binary_labels(labels)
    p = np.asarray(probs, dtype=float)
    if strategy == "quantile":
        edges = np.unique(np.quantile(p, np.linspace(0, 1, n_bins + 1)))
    elif strategy == "uniform":
        edges = np.linspace(0, 1, n_bins + 1)
    else:
        raise ValueError(f"strategy must be 'quantile' or 'uniform', got {strategy!r}")
    bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, max(len(edges) - 2, 0))
    rows = []
    for b in np.unique(bins):
        sel = bins == b
        k, n = int(y[sel].sum()), int(sel.sum())
        lo, hi = wilson_ci(k, n, level)
        rows.append({"mean_predicted": float(p[sel].mean()), "observed": k / n, "lo": lo, "hi": hi, "n": n})
    return pd.DataFrame(rows, columns=["mean_predicted", "observed", "lo", "hi", "n"])


@dataclass(frozen=True)
class Recalibration:
    """logit P(y) = intercept + slope * logit(p), fitted on internal validation and applied unchanged elsewhere.

    Firth-penalised, so the map stays finite when a small validation set separates the classes.
    """

    intercept: float
    slope: float
    n: int

    @classmethod
    def fit(cls, labels: Sequence, probs: Sequence) -> "Recalibration":
        y = binary_labels(labels)
        if y.min() == y.max():
            raise ValueError("logistic recalibration needs both classes in the validation predictions")
        lp = logit(probs)
        coef = fit_logistic(np.column_stack([np.ones(len(y)), lp]), y, firth=True).coef
        return cls(float(coef[0]), float(coef[1]), len(y))

    def apply(self, probs: Sequence) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.intercept + self.slope * logit(probs))))
