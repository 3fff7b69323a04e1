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
              strata, a patient's cases together: metrics.cluster_bootstrap_weights), every seed's
              scores kept:                                                      sigma_c^2 + sigma_cs^2/K
    V_k     = the same bootstrap's variance of d_k alone (one seed):          sigma_c^2 + sigma_cs^2
    s^2     = the variance of d_k over seeds on the observed cases:            sigma_s^2 + sigma_cs^2
    Var(D)  = V_case + max(0, s^2/K - (mean_k V_k - V_case)/(K-1))

(method of moments; the seed component is truncated at zero like a DerSimonian-Laird tau^2; K = 1
leaves V_case). SE = sqrt(Var(D)).

The interval. With few seeds the seed part of Var(D) is itself uncertain: s^2 has only K - 1 degrees
of freedom, while the case part comes from thousands of replicates over hundreds of patients and is
nearly exact. D +/- 1.96 SE ignores that and covers the truth in about 80% (K = 2) and 87% (K = 3) of
simulated experiments where the seeds carry most of the variance (tests/evaluate/test_pooled.py).
The interval here is a generalized confidence interval (Weerahandi 1993): the variance is replaced
by its generalized pivot

    G(U) = max(V_case, case + (K - 1) s^2 / (K U)),   U ~ chi^2_(K-1),  case = sigma_c^2 estimate

(the floor: sigma_s^2 >= 0), and D - Z sqrt(G(U)), Z ~ N(0, 1), is the pivot of the difference. Its
quantiles give the CI, its tail the p value (2 P(Z sqrt(G) > |D|)) and the minimum detectable
difference at 80% power (its 97.5% plus its 80% quantile). When the case part is negligible this is
exactly Student's t with K - 1 degrees of freedom; when the seed part is negligible it is the normal
interval; in between it mixes them as the data say. The usual alternative, t with Welch-Satterthwaite
degrees of freedom for V_case + s^2/K, plugs an estimated df into the quantile and undercovers at
K = 2 and 3 when the seeds dominate (about 88% and 93% in the same simulation): its df is largest when s^2
happened to come out small. `effective_df` reports the t degrees of freedom that give the same
half-width, for reading the interval as a t interval. With no second arm the same gives the mean
AUC over seeds with its CI.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats
from scipy.special import ndtr

from diffkd.evaluate.metrics import cluster_bootstrap_weights, weighted_aucs, binary_labels

POWER = 0.80
LEVEL = 0.95
PIVOT_GRID = 1000  # chi-square quantiles the generalized pivot averages over (exact t_(K-1) to ~1e-3)


@dataclass(frozen=True)
class VarianceParts:
    """Var(D) split as in the module docstring: what more seeds shrink and what they cannot."""

    case: float  # sigma_c^2: case sampling of the seed-averaged difference, does not shrink with K
    seed: float  # sigma_s^2 + sigma_cs^2: one seed's training randomness, divided by K in Var(D)
    spread: float = 0.0  # s^2, the per-seed values' variance over seeds (K - 1 df); 0 with one seed
    interaction: float = 0.0  # sigma_cs^2 from the case bootstrap (its floor: sigma_s^2 >= 0)

    def total(self, seeds: int) -> float:
        return self.case + self.seed / seeds


def pivot_quantile(case, spread, floor, seeds: int, prob: float, grid: int = PIVOT_GRID) -> np.ndarray:
    """The `prob` quantile of Z sqrt(G(U)) (module docstring), vectorised over experiments.

    case, spread, floor: arrays (or scalars) of the case part, s^2 and the variance floor V_case;
    `seeds` K >= 2 (K - 1 degrees of freedom for s^2). prob > 0.5.
    """
    scale = _pivot_scales(case, spread, floor, seeds, grid)
    low = np.zeros(scale.shape[0])
    high = stats.norm.ppf(prob) * scale.max(axis=1) * 1.001  # every scale at least this wide: P >= prob
    for _ in range(32):  # bisection; the CDF E_U[Phi(x / sqrt G(U))] rises in x
        mid = 0.5 * (low + high)
        below = np.mean(ndtr(mid[:, None] / scale), axis=1) < prob
        low, high = np.where(below, mid, low), np.where(below, high, mid)
    return 0.5 * (low + high)


def pivot_p(estimate, case, spread, floor, seeds: int, grid: int = PIVOT_GRID) -> np.ndarray:
    """Two-sided generalized p of the estimate against 0: 2 P(Z sqrt(G(U)) > |estimate|)."""
    scale = _pivot_scales(case, spread, floor, seeds, grid)
    return np.minimum(2 * np.mean(ndtr(-np.abs(np.atleast_1d(estimate))[:, None] / scale), axis=1), 1.0)


def _pivot_scales(case, spread, floor, seeds: int, grid: int) -> np.ndarray:
    """(M, grid) sqrt(G(U)) at the chi^2_(K-1) midpoint quantiles U."""
    if seeds < 2:
        raise ValueError("the seed part needs at least two seeds (K - 1 >= 1 degrees of freedom)")
    case, spread, floor = (np.atleast_1d(np.asarray(v, dtype=float))[:, None] for v in (case, spread, floor))
    chi2 = stats.chi2.ppf((np.arange(grid) + 0.5) / grid, seeds - 1)[None, :]
    variance = np.maximum(floor, case + spread * (seeds - 1) / (seeds * chi2))
    return np.sqrt(np.maximum(variance, 1e-300))


def interval_width(parts: VarianceParts, seeds: int, level: float = LEVEL, power: float | None = None) -> float:
    """Half-width of the `level` CI (or, with `power`, the minimum detectable difference) at `seeds`.

    One seed (or no seed spread at all): the normal interval on the case part, as nothing more is known.
    """
    if seeds < 2:
        se = math.sqrt(parts.total(max(seeds, 1)))
        return float(stats.norm.ppf(0.5 + level / 2) + (stats.norm.ppf(power) if power else 0.0)) * se
    floor = parts.case + parts.interaction / seeds
    quantile = float(pivot_quantile(parts.case, parts.spread, floor, seeds, 0.5 + level / 2)[0])
    if power:
        quantile += float(pivot_quantile(parts.case, parts.spread, floor, seeds, power)[0])
    return quantile


def effective_df(half_width: float, se: float, level: float = LEVEL) -> float:
    """The t degrees of freedom whose quantile x SE gives `half_width` (inf: the normal interval)."""
    target = half_width / se if se > 0 else math.inf
    if target <= stats.norm.ppf(0.5 + level / 2) * (1 + 1e-9):
        return math.inf
    low, high = 0.01, 1e6
    for _ in range(200):  # the t quantile falls as df rises
        mid = math.sqrt(low * high)
        low, high = (mid, high) if stats.t.ppf(0.5 + level / 2, mid) > target else (low, mid)
    return math.sqrt(low * high)


@dataclass(frozen=True)
class PooledEstimate:
    """A mean over seeds (an AUC, or a paired AUC difference) with its hierarchical-bootstrap SE."""

    estimate: float
    se: float
    ci: tuple[float, float]  # estimate +/- the pivot's quantile, clipped to the range of an AUC (or a difference)
    p: float  # two-sided, against 0 (meaningful for differences)
    mdd: float  # minimum detectable difference at 80% power, two-sided 5% level
    per_seed: tuple[float, ...]  # the per-seed values whose mean is `estimate`
    seeds: int
    cases: int
    patients: int
    n_boot: int
    parts: VarianceParts
    df: float = math.inf  # effective t degrees of freedom of the interval (inf: normal)
    method: str = ("patient-clustered bootstrap of the seed mean + between-seed variance component "
                   "(method of moments), generalized-pivot interval (t with K-1 df on the seed part)")

    @property
    def between_seed_sd(self) -> float:
        return float(np.std(self.per_seed, ddof=1)) if len(self.per_seed) > 1 else math.nan


def per_seed_replicates(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray | None,
                        case_weights: np.ndarray) -> np.ndarray:
    """(K, B): seed k's AUC(scores) [- AUC(reference)] on replicate b's case weights.
    scores/reference: (K, N); case_weights: (B, N)."""
    per_seed = np.stack([weighted_aucs(labels, scores[k], case_weights) for k in range(len(scores))])
    if reference is not None:
        per_seed = per_seed - np.stack([weighted_aucs(labels, reference[k], case_weights)
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
    spread = float(np.var(observed, ddof=1))
    seed = max(spread, interaction)  # sigma_s^2 = s^2 - sigma_cs^2, truncated at 0
    return VarianceParts(case=max(v_case - interaction / k, 0.0), seed=seed, spread=spread, interaction=interaction)


def _observed(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    ones = np.ones((1, len(labels)))
    values = np.array([weighted_aucs(labels, s, ones)[0] for s in scores])
    if reference is not None:
        values = values - np.array([weighted_aucs(labels, r, ones)[0] for r in reference])
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
    weights = cluster_bootstrap_weights(y, patients, strata, n_boot, seed)
    replicates = per_seed_replicates(y, s, r, weights)
    replicates = replicates[:, np.isfinite(replicates).all(axis=0)]
    per_seed = _observed(y, s, r)
    estimate = float(per_seed.mean())
    parts = variance_parts(per_seed, replicates)
    k = len(s)
    se = math.sqrt(parts.total(k))
    half = interval_width(parts, k, level)
    if reference is None or se <= 1e-15:
        p = math.nan if reference is None else (1.0 if abs(estimate) < 1e-12 else 0.0)
    elif k < 2:
        p = float(2 * stats.norm.sf(abs(estimate) / se))
    else:
        p = float(pivot_p(estimate, parts.case, parts.spread, parts.case + parts.interaction / k, k)[0])
    n_patients = len(y) if patients is None else len(np.unique(np.asarray(patients)))
    low, high = estimate - half, estimate + half
    bound = 0.0 if reference is None else -1.0  # an AUC lies in [0, 1], a difference of two in [-1, 1]
    return PooledEstimate(estimate=estimate, se=se, ci=(max(low, bound), min(high, 1.0)), p=p,
                          mdd=interval_width(parts, k, level, POWER), per_seed=tuple(float(v) for v in per_seed),
                          seeds=k, cases=len(y), patients=n_patients, n_boot=n_boot, parts=parts,
                          df=effective_df(half, se, level))


def minimum_detectable_difference(se: float, level: float = LEVEL, power: float = POWER) -> float:
    """The smallest true difference a two-sided normal test at `level` finds with probability `power`
    (known variance; `PooledEstimate.mdd` is the same for the pooled interval)."""
    return float((stats.norm.ppf(0.5 + level / 2) + stats.norm.ppf(power)) * se)


MAX_SEEDS = 1000  # seeds_for_half_width stops looking here


def seeds_for_half_width(estimate: PooledEstimate, half_width: float, level: float = LEVEL) -> int | None:
    """Seeds that would bring the CI half-width to `half_width` on the same cases, if seeds alone can.

    The variance parts stay as estimated (VarianceParts: case + seed / K) and s^2 is taken at its
    expectation sigma_s^2 + sigma_cs^2; the interval at K seeds is the generalized-pivot one with K - 1
    degrees of freedom. None when the case part alone is already wider: more external cases, not more
    seeds, are needed then.
    """
    z = float(stats.norm.ppf(0.5 + level / 2))
    if z * math.sqrt(estimate.parts.case) >= half_width:
        return None
    if interval_width(estimate.parts, estimate.seeds, level) <= half_width:
        return estimate.seeds
    expected = dataclasses.replace(estimate.parts, spread=estimate.parts.seed)
    for seeds in range(max(estimate.seeds, 2), MAX_SEEDS + 1):
        if interval_width(expected, seeds, level) <= half_width:
            return max(seeds, estimate.seeds)
    return None
