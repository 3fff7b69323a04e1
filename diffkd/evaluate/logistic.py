"""Maximum-likelihood logistic regression with standard errors (Newton-Raphson).

scikit-learn's LogisticRegression gives no standard errors, and statsmodels is not a dependency; the
clinical model needs odds ratios with Wald CIs and likelihood-ratio p values, and calibration needs
logistic recalibration with an offset. A 2-50 parameter Newton fit is a few lines of numpy.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

_RIDGE = 1e-8  # keeps the Hessian invertible on collinear designs without changing well-posed fits


@dataclass(frozen=True)
class LogisticFit:
    coef: np.ndarray  # (p,) including the intercept when the design has one
    cov: np.ndarray  # (p, p) inverse observed information
    loglik: float
    converged: bool  # False under (quasi-)separation: estimates then drift to +-inf

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.cov), 0, None))

    def wald_ci(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        z = stats.norm.ppf(0.5 + level / 2)
        return self.coef - z * self.se, self.coef + z * self.se

    def wald_p(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return 2 * stats.norm.sf(np.abs(self.coef / self.se))


def _loglik(eta: np.ndarray, y: np.ndarray) -> float:
    # log(1 + e^eta) computed stably
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


def _information(x: np.ndarray, eta: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-eta))
    return (x * (p * (1 - p))[:, None]).T @ x + _RIDGE * np.eye(x.shape[1])


def _objective(x: np.ndarray, y: np.ndarray, eta: np.ndarray, firth: bool) -> float:
    ll = _loglik(eta, y)
    if firth:  # Jeffreys-prior penalty: + 1/2 log det I(beta)
        ll += 0.5 * np.linalg.slogdet(_information(x, eta))[1]
    return ll


def fit_logistic(x: np.ndarray, y: np.ndarray, offset: np.ndarray | None = None, firth: bool = False,
                 max_iter: int = 100, tol: float = 1e-10) -> LogisticFit:
    """Fit P(y=1) = sigmoid(offset + x @ coef). `x` must already hold an intercept column if wanted.

    firth=True maximizes Firth's penalized likelihood (Firth 1993; Heinze & Schemper 2002): estimates
    stay finite under separation (a category whose cases are all upgrades) and small-sample bias
    shrinks. `loglik` is then the penalized log-likelihood, as logistf uses in its tests.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"design matrix shape {x.shape} does not match {y.shape[0]} outcomes")
    off = np.zeros_like(y) if offset is None else np.asarray(offset, dtype=float)
    coef = np.zeros(x.shape[1])
    eta = off + x @ coef
    objective = _objective(x, y, eta, firth)
    converged = False
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-eta))
        info = _information(x, eta)
        residual = y - p
        if firth:  # modified score: y - p + h (1/2 - p), h = leverages of the weighted hat matrix
            leverage = p * (1 - p) * np.einsum("ij,jk,ik->i", x, np.linalg.inv(info), x)
            residual = residual + leverage * (0.5 - p)
        step = np.linalg.solve(info, x.T @ residual)
        # step halving keeps the objective non-decreasing
        for _ in range(30):
            new_coef = coef + step
            new_eta = off + x @ new_coef
            new_objective = _objective(x, y, new_eta, firth)
            if new_objective >= objective - 1e-12:
                break
            step /= 2
        coef, eta, gain, objective = new_coef, new_eta, new_objective - objective, new_objective
        if abs(gain) < tol and np.max(np.abs(step)) < 1e-6:
            converged = True
            break
    converged = converged and bool(np.all(np.abs(coef) < 30))  # |coef| this large means separation
    return LogisticFit(coef=coef, cov=np.linalg.inv(_information(x, eta)), loglik=objective, converged=converged)


def likelihood_ratio_p(full: LogisticFit, reduced: LogisticFit, df: int) -> float:
    """p value of the likelihood-ratio test of `df` extra parameters in `full`."""
    statistic = max(0.0, 2 * (full.loglik - reduced.loglik))
    return float(stats.chi2.sf(statistic, df))
