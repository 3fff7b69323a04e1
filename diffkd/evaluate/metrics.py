"""Discrimination and operating-point statistics.

- AUC with a 95% CI by DeLong (the fast midrank algorithm of Sun & Xu 2014) or by a label-stratified,
  patient-clustered bootstrap; `CIOptions(method="auto")` takes DeLong when every patient has one
  case and the clustered bootstrap otherwise;
- the DeLong test for two correlated AUCs on the same cases, its patient-clustered paired bootstrap
  counterpart, and the unpaired z test for AUCs from two independent cohorts (e.g. internal vs external);
- a decision threshold fitted on internal validation data (Youden, or a target sensitivity), to be
  applied unchanged elsewhere;
- sensitivity, specificity, PPV, NPV and accuracy with Wilson score intervals.

All functions return p values, never log10(p).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score


def _z(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2))


def binary_labels(labels: Sequence) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    values = set(np.unique(y).tolist())
    if not values <= {0, 1, True, False}:
        raise ValueError(f"labels must be 0/1, got values {sorted(values, key=str)[:5]}")
    return y.astype(np.int8)


def _check_both_classes(y: np.ndarray) -> tuple[int, int]:
    m, n = int(y.sum()), int(len(y) - y.sum())
    if m == 0 or n == 0:
        raise ValueError(f"AUC needs both classes; got {m} positive and {n} negative cases")
    return m, n


# --------------------------------------------------------------------------------------------------
# DeLong


@dataclass(frozen=True)
class DeLong:
    """AUCs of k scores on the same cases and their DeLong covariance matrix."""

    aucs: np.ndarray  # (k,)
    cov: np.ndarray  # (k, k)
    n_pos: int
    n_neg: int


def delong(labels: Sequence, *scores: Sequence) -> DeLong:
    """Sun & Xu's fast DeLong: structural components from midranks, O(k N log N).

    For positives X_i and negatives Y_j, psi(X, Y) = 1 if X > Y, 1/2 if equal, 0 otherwise;
    V10_i = mean_j psi(X_i, Y_j), V01_j = mean_i psi(X_i, Y_j). The midrank of X_i among all cases
    minus its midrank among the positives counts the negatives below it (ties halved), so
    V10_i = (TZ_i - TX_i) / n and V01_j = 1 - (TZ_j - TY_j) / m.
    cov(AUC) = S10 / m + S01 / n with S10, S01 the sample covariances of V10 and V01.
    """
    y = binary_labels(labels)
    m, n = _check_both_classes(y)
    s = np.atleast_2d(np.asarray(scores, dtype=float))
    if s.shape[1] != len(y):
        raise ValueError(f"scores have {s.shape[1]} cases, labels {len(y)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinite values")
    pos, neg = s[:, y == 1], s[:, y == 0]
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.hstack([pos, neg]), axis=1)
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    with warnings.catch_warnings():  # one positive or negative: the variance is undefined (NaN)
        warnings.simplefilter("ignore", RuntimeWarning)
        s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.full((len(s), len(s)), np.nan)
        s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.full((len(s), len(s)), np.nan)
    return DeLong(aucs=aucs, cov=s10 / m + s01 / n, n_pos=m, n_neg=n)


def auc(labels: Sequence, scores: Sequence) -> float:
    return float(delong(labels, scores).aucs[0])


def auc_or_nan(labels: Sequence, scores: Sequence) -> float:
    """The AUC, or NaN when the labels do not hold both classes (a small split may have one)."""
    return float(roc_auc_score(labels, scores)) if len(np.unique(np.asarray(labels))) == 2 else math.nan


@dataclass(frozen=True)
class AUCEstimate:
    auc: float
    ci: tuple[float, float]
    se: float
    method: str  # "delong" | "bootstrap"


def auc_delong_ci(labels: Sequence, scores: Sequence, level: float = 0.95) -> AUCEstimate:
    """AUC with the DeLong normal-approximation CI, clipped to [0, 1] (as pROC does)."""
    d = delong(labels, scores)
    value, se = float(d.aucs[0]), math.sqrt(max(float(d.cov[0, 0]), 0.0))
    half = _z(level) * se
    return AUCEstimate(value, (max(0.0, value - half), min(1.0, value + half)), se, "delong")


@dataclass(frozen=True)
class AUCTest:
    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    ci: tuple[float, float]  # of the difference
    z: float
    p: float
    n: int  # cases (paired) or total cases of both cohorts (unpaired)
    method: str = "delong"  # "delong" | "bootstrap" (patient-clustered)


def _z_test(a: float, b: float, var: float, level: float, n: int) -> AUCTest:
    diff = a - b
    if not np.isfinite(var):
        return AUCTest(a, b, diff, (math.nan, math.nan), math.nan, math.nan, n)
    if var <= 1e-15:  # identical rankings: no evidence of a difference
        return AUCTest(a, b, diff, (diff, diff), 0.0, 1.0 if abs(diff) < 1e-12 else 0.0, n)
    se = math.sqrt(var)
    z = diff / se
    half = _z(level) * se
    return AUCTest(a, b, diff, (diff - half, diff + half), z, float(2 * stats.norm.sf(abs(z))), n)


def delong_test(labels: Sequence, scores_a: Sequence, scores_b: Sequence, level: float = 0.95) -> AUCTest:
    """Two-sided DeLong test of AUC(a) = AUC(b) for two scores on the same cases."""
    d = delong(labels, scores_a, scores_b)
    var = float(d.cov[0, 0] + d.cov[1, 1] - 2 * d.cov[0, 1])
    return _z_test(float(d.aucs[0]), float(d.aucs[1]), var, level, len(np.asarray(labels)))


def unpaired_auc_test(labels_a: Sequence, scores_a: Sequence, labels_b: Sequence, scores_b: Sequence,
                      level: float = 0.95) -> AUCTest:
    """z test of AUC(a) = AUC(b) for two independent cohorts, each AUC's variance by DeLong."""
    da, db = delong(labels_a, scores_a), delong(labels_b, scores_b)
    var = float(da.cov[0, 0] + db.cov[0, 0])
    return _z_test(float(da.aucs[0]), float(db.aucs[0]), var, level, len(labels_a) + len(labels_b))


def independent_auc_test(a: AUCEstimate, b: AUCEstimate, n: int, level: float = 0.95) -> AUCTest:
    """z test of AUC(a) = AUC(b) for two independent cohorts from each AUC's own standard error
    (DeLong or clustered bootstrap); `n` is the total number of cases, for the record."""
    test = _z_test(a.auc, b.auc, a.se ** 2 + b.se ** 2, level, n)
    return dataclasses.replace(test, method=a.method if a.method == b.method else f"{a.method}+{b.method}")


# --------------------------------------------------------------------------------------------------
# Bootstrap


def weighted_aucs(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of case weights (B, N) at once (weights = bootstrap multiplicities)."""
    order = np.argsort(scores, kind="mergesort")
    s_sorted = scores[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # tie groups
    w = weights[:, order]
    pos = np.add.reduceat(w * (y[order] == 1), starts, axis=1)
    neg = np.add.reduceat(w * (y[order] == 0), starts, axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg
    total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (total_pos * total_neg)


def cluster_bootstrap_weights(y: np.ndarray, groups: Sequence | None, strata: Sequence | None, n_boot: int,
                               seed: int) -> np.ndarray:
    """(n_boot, N) case multiplicities of a stratified cluster bootstrap.

    Clusters (`groups`; each case its own cluster when None) are resampled with replacement within
    strata; a cluster's stratum is its `strata` value (the first case's) combined with whether any of
    its cases is positive, so every replicate holds both classes and as many positive clusters as the
    data. A cluster drawn k times contributes each of its cases k times.
    """
    if n_boot < 1000:
        raise ValueError(f"n_boot={n_boot}: use at least 1000 bootstrap replicates for a 95% CI")
    cluster_ids = np.arange(len(y)) if groups is None else np.asarray(groups)
    if len(cluster_ids) != len(y):
        raise ValueError(f"{len(cluster_ids)} cluster ids for {len(y)} cases; give one per case")
    _, first_case, cluster_of_case = np.unique(cluster_ids, return_index=True, return_inverse=True)
    n_clusters = len(first_case)
    cluster_pos = np.zeros(n_clusters, dtype=bool)
    np.logical_or.at(cluster_pos, cluster_of_case, y == 1)
    case_strata = (np.zeros(len(y), dtype=int) if strata is None
                   else np.unique(np.asarray(strata), return_inverse=True)[1])
    cluster_stratum = case_strata[first_case] * 2 + cluster_pos

    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, n_clusters))
    for stratum in np.unique(cluster_stratum):
        members = np.flatnonzero(cluster_stratum == stratum)
        draws = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        rows = np.repeat(np.arange(n_boot), len(members))
        np.add.at(counts, (rows, draws.ravel()), 1)
    return counts[:, cluster_of_case]


def _percentile_ci(replicates: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    lo, hi = np.quantile(replicates, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_auc_ci(labels: Sequence, scores: Sequence, groups: Sequence | None = None,
                     strata: Sequence | None = None, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> AUCEstimate:
    """Percentile CI from a label-stratified, cluster (patient) bootstrap (see cluster_bootstrap_weights)."""
    y = binary_labels(labels)
    _check_both_classes(y)
    s = np.asarray(scores, dtype=float)
    replicates = weighted_aucs(y, s, cluster_bootstrap_weights(y, groups, strata, n_boot, seed))
    replicates = replicates[np.isfinite(replicates)]
    return AUCEstimate(auc(y, s), _percentile_ci(replicates, level), float(np.std(replicates, ddof=1)), "bootstrap")


def clustered_bootstrap_auc(labels: Sequence, probs: Sequence, clusters: Sequence, n_boot: int = 2000,
                            seed: int = 0, level: float = 0.95) -> AUCEstimate:
    """AUC with a percentile CI from a patient-clustered, label-stratified bootstrap."""
    return bootstrap_auc_ci(labels, probs, groups=clusters, n_boot=n_boot, seed=seed, level=level)


def clustered_bootstrap_auc_difference(labels: Sequence, probs_a: Sequence, probs_b: Sequence,
                                       clusters: Sequence | None, n_boot: int = 2000, seed: int = 0,
                                       level: float = 0.95, strata: Sequence | None = None) -> AUCTest:
    """Paired AUC(a) - AUC(b) on the same cases, resampling clusters (patients) as in clustered_bootstrap_auc.

    Both scores are evaluated on the same resampled clusters, so the pairing is kept. The CI is the
    percentile interval of the replicate differences; z = difference / SD of the replicates and p is
    two-sided from the normal distribution (pROC's `roc.test(method = "bootstrap")`).
    """
    y = binary_labels(labels)
    _check_both_classes(y)
    a, b = np.asarray(probs_a, dtype=float), np.asarray(probs_b, dtype=float)
    if not len(a) == len(b) == len(y):
        raise ValueError(f"{len(y)} labels, {len(a)} scores a, {len(b)} scores b: they must align case by case")
    weights = cluster_bootstrap_weights(y, clusters, strata, n_boot, seed)
    replicates = weighted_aucs(y, a, weights) - weighted_aucs(y, b, weights)
    replicates = replicates[np.isfinite(replicates)]
    auc_a, auc_b = auc(y, a), auc(y, b)
    diff = auc_a - auc_b
    se = float(np.std(replicates, ddof=1))
    if se <= 1e-15:  # the same ranking in every replicate: no evidence of a difference
        return AUCTest(auc_a, auc_b, diff, (diff, diff), 0.0, 1.0 if abs(diff) < 1e-12 else 0.0, len(y),
                       "bootstrap")
    z = diff / se
    return AUCTest(auc_a, auc_b, diff, _percentile_ci(replicates, level), z, float(2 * stats.norm.sf(abs(z))),
                   len(y), "bootstrap")


def has_repeated_clusters(clusters: Sequence | None) -> bool:
    """True when some cluster (patient) holds more than one case."""
    if clusters is None:
        return False
    ids = np.asarray(clusters)
    return len(np.unique(ids)) < len(ids)


CI_METHODS = ("auto", "delong", "bootstrap")


@dataclass(frozen=True)
class CIOptions:
    """How AUC confidence intervals and paired AUC tests are computed.

    `auto`: DeLong when every patient has one case, else the patient-clustered bootstrap (DeLong
    treats cases as independent, which a patient's several lesions or exams are not).
    """

    method: Literal["auto", "delong", "bootstrap"] = "auto"
    n_boot: int = 2000
    seed: int = 0
    level: float = 0.95

    def __post_init__(self):
        if self.method not in CI_METHODS:
            raise ValueError(f"CI method must be one of {', '.join(CI_METHODS)}, got {self.method!r}")

    def method_for(self, groups: Sequence | None) -> str:
        """"delong" or "bootstrap" for cases clustered by `groups` (patients)."""
        if self.method != "auto":
            return self.method
        return "bootstrap" if has_repeated_clusters(groups) else "delong"


def auc_with_ci(labels: Sequence, scores: Sequence, options: CIOptions = CIOptions(),
                groups: Sequence | None = None, strata: Sequence | None = None) -> AUCEstimate:
    if options.method_for(groups) == "bootstrap":
        return bootstrap_auc_ci(labels, scores, groups, strata, options.n_boot, options.seed, options.level)
    return auc_delong_ci(labels, scores, options.level)


def paired_auc_test(labels: Sequence, scores_a: Sequence, scores_b: Sequence, options: CIOptions = CIOptions(),
                    groups: Sequence | None = None, strata: Sequence | None = None) -> AUCTest:
    """AUC(a) - AUC(b) on the same cases: DeLong, or the patient-clustered paired bootstrap (options.method_for)."""
    if options.method_for(groups) == "bootstrap":
        return clustered_bootstrap_auc_difference(labels, scores_a, scores_b, groups, options.n_boot, options.seed,
                                                  options.level, strata)
    return delong_test(labels, scores_a, scores_b, options.level)


# --------------------------------------------------------------------------------------------------
# Random-effects pooling (meta-analysis of AUCs from different models or cohorts)


@dataclass(frozen=True)
class PooledAUC:
    """A random-effects pooled AUC (DerSimonian & Laird 1986) on the logit scale, back-transformed."""

    auc: float
    ci: tuple[float, float]
    logit: float  # pooled logit AUC
    se_logit: float
    tau2: float  # between-study variance (logit scale)
    i2: float  # share of the spread beyond chance, 0..1
    q: float  # Cochran's Q
    p_heterogeneity: float  # chi-square test of Q on k - 1 degrees of freedom
    weights: tuple[float, ...]  # each study's share of the random-effects weight, in input order
    k: int


def dersimonian_laird(estimates: Sequence[float], variances: Sequence[float]) -> tuple[float, float, float, float,
                                                                                        np.ndarray]:
    """Random-effects mean of `estimates` with within-study `variances`: (mean, se, tau2, Q, weights)."""
    y, v = np.asarray(estimates, dtype=float), np.asarray(variances, dtype=float)
    if len(y) == 0 or len(y) != len(v):
        raise ValueError(f"{len(y)} estimates and {len(v)} variances: need one variance per estimate, at least one")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError("random-effects pooling needs finite estimates and finite positive variances")
    w = 1 / v
    fixed = float(np.sum(w * y) / np.sum(w))
    q = float(np.sum(w * (y - fixed) ** 2))
    scale = float(np.sum(w) - np.sum(w ** 2) / np.sum(w))
    tau2 = max(0.0, (q - (len(y) - 1)) / scale) if scale > 0 else 0.0
    w_star = 1 / (v + tau2)
    mean = float(np.sum(w_star * y) / np.sum(w_star))
    return mean, float(math.sqrt(1 / np.sum(w_star))), tau2, q, w_star / w_star.sum()


def pooled_auc(aucs: Sequence[float], ses: Sequence[float], level: float = 0.95) -> PooledAUC:
    """DerSimonian-Laird pooling of AUCs on the logit scale; var(logit AUC) = se^2 / (AUC (1 - AUC))^2
    (delta method). The logit keeps the interval inside (0, 1). An AUC of exactly 0 or 1 has no
    finite logit: leave such a study out and say so."""
    a, se = np.asarray(aucs, dtype=float), np.asarray(ses, dtype=float)
    if np.any((a <= 0) | (a >= 1)):
        raise ValueError("pooling on the logit scale needs every AUC strictly between 0 and 1")
    logits = np.log(a / (1 - a))
    mean, se_logit, tau2, q, weights = dersimonian_laird(logits, (se / (a * (1 - a))) ** 2)
    half = _z(level) * se_logit
    expit = lambda x: float(1 / (1 + math.exp(-x)))  # noqa: E731
    k = len(a)
    return PooledAUC(auc=expit(mean), ci=(expit(mean - half), expit(mean + half)), logit=mean, se_logit=se_logit,
                     tau2=tau2, i2=max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0, q=q,
                     p_heterogeneity=float(stats.chi2.sf(q, k - 1)) if k > 1 else math.nan,
                     weights=tuple(float(x) for x in weights), k=k)


# --------------------------------------------------------------------------------------------------
# Thresholds and operating points


@dataclass(frozen=True)
class ThresholdRule:
    """How the decision threshold is chosen on internal validation data.

    A case is called positive when prob >= threshold. `youden` maximizes sensitivity + specificity - 1
    (ties go to the lower threshold, i.e. the higher sensitivity: missing an upgrade costs more);
    `sensitivity` takes the highest threshold whose sensitivity reaches `target_sensitivity`.
    """

    method: Literal["youden", "sensitivity"] = "youden"
    target_sensitivity: float = 0.9

    def __post_init__(self):
        if self.method not in ("youden", "sensitivity"):
            raise ValueError(f"threshold method must be 'youden' or 'sensitivity', got {self.method!r}")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity must be in (0, 1], got {self.target_sensitivity}")

    def fit(self, labels: Sequence, scores: Sequence) -> float:
        y = binary_labels(labels)
        m, n = _check_both_classes(y)
        s = np.asarray(scores, dtype=float)
        candidates = np.unique(s)[::-1]  # descending: sensitivity grows along the array
        pos, neg = np.sort(s[y == 1]), np.sort(s[y == 0])
        sens = 1 - np.searchsorted(pos, candidates, side="left") / m  # share of positives >= t
        spec = np.searchsorted(neg, candidates, side="left") / n  # share of negatives < t
        if self.method == "youden":
            j = sens + spec - 1
            best = np.flatnonzero(j >= j.max() - 1e-12)[-1]
        else:
            best = np.flatnonzero(sens >= self.target_sensitivity - 1e-12)[0]
        return float(candidates[best])

    def describe(self) -> str:
        if self.method == "youden":
            return "Youden index (max sensitivity + specificity - 1) on internal validation"
        return f"highest threshold reaching sensitivity >= {self.target_sensitivity:g} on internal validation"


def mean_t_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Mean with its Student-t interval (e.g. a paired difference over pairs or seeds); (nan, nan) below 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return math.nan, (math.nan, math.nan)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, (math.nan, math.nan)
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return mean, (mean - half, mean + half)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) when n == 0."""
    if n == 0:
        return (math.nan, math.nan)
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class OperatingPoint:
    tp: int
    fp: int
    tn: int
    fn: int
    threshold: float | None = None
    level: float = field(default=0.95, repr=False)

    @classmethod
    def from_calls(cls, labels: Sequence, calls: Sequence, threshold: float | None = None,
                   level: float = 0.95) -> "OperatingPoint":
        y = binary_labels(labels).astype(bool)
        c = np.asarray(calls).astype(bool)
        return cls(tp=int(np.sum(y & c)), fp=int(np.sum(~y & c)), tn=int(np.sum(~y & ~c)),
                   fn=int(np.sum(y & ~c)), threshold=threshold, level=level)

    @classmethod
    def at_threshold(cls, labels: Sequence, scores: Sequence, threshold: float,
                     level: float = 0.95) -> "OperatingPoint":
        return cls.from_calls(labels, np.asarray(scores, dtype=float) >= threshold, threshold, level)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def _rate(self, k: int, total: int) -> tuple[float, tuple[float, float]]:
        return (k / total if total else math.nan), wilson_ci(k, total, self.level)

    def rates(self) -> dict[str, tuple[float, tuple[float, float]]]:
        return {
            "sensitivity": self._rate(self.tp, self.tp + self.fn),
            "specificity": self._rate(self.tn, self.tn + self.fp),
            "ppv": self._rate(self.tp, self.tp + self.fp),
            "npv": self._rate(self.tn, self.tn + self.fn),
            "accuracy": self._rate(self.tp + self.tn, self.n),
        }

    def as_dict(self) -> dict:
        out: dict = {}
        for name, (value, ci) in self.rates().items():
            out[name] = value
            out[f"{name}_ci"] = list(ci)
        out.update(tp=self.tp, fp=self.fp, tn=self.tn, fn=self.fn)
        if self.threshold is not None:
            out["threshold"] = self.threshold
        return out
