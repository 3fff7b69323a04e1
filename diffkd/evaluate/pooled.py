"""AUCs pooled over training seeds, and paired AUC differences between two arms, with one CI.

An ablation trains every arm K times (seeds) and scores each model on the same N external cases.
Two sources of uncertainty matter: which cases happened to be external (case sampling, shared by
every seed: the same cases score all of them) and how a training run happened to go (seeds). A CI
from the cases alone ignores the second; treating each seed as an independent study (a plain
random-effects meta-analysis of per-seed DeLong differences) counts the shared cases K times and is
too narrow; resampling seeds and patients together (a two-level bootstrap) counts the seed x case
interaction three times and is too wide (Owen 2007, the pigeonhole bootstrap; a test here shows it).

The estimate D is the mean over seeds of the per-seed paired difference d_k = AUC(arm, k) -
AUC(full, k) on the observed cases. Under the two-way random-effects model d = case + seed +
interaction its variance is sigma_c^2 + sigma_s^2/K + sigma_cs^2/K (per-case terms already divided
by N), estimated as

    V_case  = bootstrap variance of D over patients resampled with replacement (within has-an-upgrade
              strata, a patient's cases together: metrics._cluster_bootstrap_weights), every seed's
              scores kept:                                                      sigma_c^2 + sigma_cs^2/K
    V_k     = the same bootstrap's variance of d_k alone (one seed):          sigma_c^2 + sigma_cs^2
    s^2     = the variance of d_k over seeds on the observed cases:            sigma_s^2 + sigma_cs^2
    Var(D)  = V_case + max(0, s^2/K - (mean_k V_k - V_case)/(K-1))

(method of moments; the seed component is truncated at zero like a DerSimonian-Laird tau^2; K = 1
leaves V_case). SE = sqrt(Var(D)); the 95% CI is D +/- z_0.975 SE, p is the two-sided normal p of
D / SE, and the minimum detectable difference at 80% power is MDD = (z_0.975 + z_0.80) SE (a true
difference this large is found with p < 0.05 four times in five). With no second arm the same gives
the mean AUC over seeds with its CI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from diffkd.evaluate.metrics import _cluster_bootstrap_weights, _weighted_aucs, binary_labels

POWER = 0.80
LEVEL = 0.95


@dataclass(frozen=True)
class VarianceParts:
    """Var(D) split as in the module docstring: what more seeds shrink and what they cannot."""

    case: float  # sigma_c^2: case sampling of the seed-averaged difference, does not shrink with K
    seed: float  # sigma_s^2 + sigma_cs^2: one seed's training randomness, divided by K in Var(D)

    def total(self, seeds: int) -> float:
        return self.case + self.seed / seeds


@dataclass(frozen=True)
class PooledEstimate:
    """A mean over seeds (an AUC, or a paired AUC difference) with its hierarchical-bootstrap SE."""

    estimate: float
    se: float
    ci: tuple[float, float]  # estimate +/- z SE, clipped to the range of an AUC (or of a difference)
    p: float  # two-sided, against 0 (meaningful for differences)
    mdd: float  # minimum detectable difference at 80% power, two-sided 5% level
    per_seed: tuple[float, ...]  # the per-seed values whose mean is `estimate`
    seeds: int
    cases: int
    patients: int
    n_boot: int
    parts: VarianceParts
    method: str = ("patient-clustered bootstrap of the seed mean + between-seed variance component "
                   "(method of moments), normal interval")

    @property
    def between_seed_sd(self) -> float:
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else math.nan


def per_seed_replicates(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray | None,
                        case_weights: np.ndarray) -> np.ndarray:
    """(K, B): seed k's AUC(scores) [- AUC(reference)] on replicate b's case weights.
    scores/reference: (K, N); case_weights: (B, N)."""
    per_seed = np.stack([_weighted_aucs(labels, scores[k], case_weights) for k in range(len(scores))])
    if reference is not None:
        per_seed = per_seed - np.stack([_weighted_aucs(labels, reference[k], case_weights)
                                        for k in range(len(reference))])
    return per_seed


def variance_parts(observed: np.ndarray, replicates: np.ndarray) -> VarianceParts:
    """Method-of-moments split of Var(D) from the per-seed values and their case-bootstrap replicates."""
    k = len(observed)
    v_case = float(np.var(replicates.mean(axis=0), ddof=1))
    if k < 2:
        return VarianceParts(case=v_case, seed=0.0)
    interaction = (float(np.mean(np.var(replicates, axis=1, ddof=1))) - v_case) * k / (k - 1)  # sigma_cs^2
    interaction = max(interaction, 0.0)
    seed = max(float(np.var(observed, ddof=1)), interaction)  # sigma_s^2 = s^2 - sigma_cs^2, truncated at 0
    return VarianceParts(case=max(v_case - interaction / k, 0.0), seed=seed)


def _observed(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    ones = np.ones((1, len(labels)))
    values = np.array([_weighted_aucs(labels, s, ones)[0] for s in scores])
    if reference is not None:
        values = values - np.array([_weighted_aucs(labels, r, ones)[0] for r in reference])
    return values


def _check_inputs(labels: Sequence, scores: Sequence, reference: Sequence | None) -> tuple[np.ndarray, ...]:
    y = binary_labels(labels)
    if y.sum() == 0 or y.sum() == len(y):
        raise ValueError(f"an AUC needs both classes; the cases hold {int(y.sum())} positive of {len(y)}")
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.shape[1] != len(y):
        raise ValueError(f"scores have {s.shape[1]} cases per seed, labels {len(y)}: align them case by case")
    r = None
    if reference is not None:
        r = np.atleast_2d(np.asarray(reference, dtype=float))
        if r.shape != s.shape:
            raise ValueError(f"the two arms' scores differ in shape ({s.shape} vs {r.shape}): pair them by seed "
                             "and case")
    if not np.all(np.isfinite(s)) or (r is not None and not np.all(np.isfinite(r))):
        raise ValueError("scores contain NaN or infinite values")
    return y, s, r


def pooled_auc_difference(labels: Sequence, scores: Sequence, reference: Sequence | None = None,
                          patients: Sequence | None = None, strata: Sequence | None = None,
                          n_boot: int = 2000, seed: int = 0, level: float = LEVEL) -> PooledEstimate:
    """Mean over seeds of AUC(scores) - AUC(reference) on the same cases (or of AUC(scores) alone when
    `reference` is None), with the hierarchical bootstrap of the module docstring.

    scores, reference: (K seeds, N cases), row k of both from the same seed, column i the same case.
    patients: one id per case (cases of a patient are resampled together); strata: e.g. the center.
    """
    if n_boot < 1000:
        raise ValueError(f"n_boot={n_boot}: use at least 1000 bootstrap replicates for a 95% CI")
    y, s, r = _check_inputs(labels, scores, reference)
    weights = _cluster_bootstrap_weights(y, patients, strata, n_boot, seed)
    replicates = per_seed_replicates(y, s, r, weights)
    replicates = replicates[:, np.isfinite(replicates).all(axis=0)]
    per_seed = _observed(y, s, r)
    estimate = float(per_seed.mean())
    parts = variance_parts(per_seed, replicates)
    se = math.sqrt(parts.total(len(s)))
    z = float(stats.norm.ppf(0.5 + level / 2))
    if reference is None or se <= 1e-15:
        p = math.nan if reference is None else (1.0 if abs(estimate) < 1e-12 else 0.0)
    else:
        p = float(2 * stats.norm.sf(abs(estimate) / se))
    n_patients = len(y) if patients is None else len(np.unique(np.asarray(patients)))
    low, high = estimate - z * se, estimate + z * se
    bound = 0.0 if reference is None else -1.0  # an AUC lies in [0, 1], a difference of two in [-1, 1]
    return PooledEstimate(estimate=estimate, se=se, ci=(max(low, bound), min(high, 1.0)), p=p,
                          mdd=minimum_detectable_difference(se, level), per_seed=tuple(float(v) for v in per_seed),
                          seeds=len(s), cases=len(y), patients=n_patients, n_boot=n_boot, parts=parts)


def minimum_detectable_difference(se: float, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true difference a two-sided test at `level` finds with probability `power`."""
    return float((stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(power)) * se)


def seeds_for_half_width(estimate: PooledEstimate, half_width: float, level: float = LEVEL) -> int | None:
    """Seeds that would bring the CI half-width to `half_width` on the same cases, if seeds alone can.

    Var(D) at K seeds is case + seed / K (VarianceParts); None when the case part alone is already
    wider: more external cases, not more seeds, are needed then.
    """
    z = float(stats.norm.ppf(0.5 + level / 2))
    target = (half_width / z) ** 2
    if estimate.parts.case >= target:
        return None
    if estimate.parts.seed == 0.0:
        return estimate.seeds
    return max(estimate.seeds, math.ceil(estimate.parts.seed / (target - estimate.parts.case)))
