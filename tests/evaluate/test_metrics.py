"""Metric functions against hand-computed cases and a brute-force DeLong oracle."""
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from diffkd.evaluate.calibration import Recalibration, brier_score, calibration, reliability_curve
from diffkd.evaluate.decision import decision_curve, net_benefit, recalibrated
from diffkd.evaluate.logistic import fit_logistic
from diffkd.evaluate.metrics import (CIOptions, OperatingPoint, ThresholdRule, auc, auc_delong_ci, auc_or_nan,
                                     auc_with_ci, bootstrap_auc_ci, clustered_bootstrap_auc,
                                     clustered_bootstrap_auc_difference, delong, delong_test, has_repeated_clusters,
                                     mean_t_ci, paired_auc_test, unpaired_auc_test, weighted_aucs, wilson_ci)


# ---------------------------------------------------------------------------------------------------
# Brute-force structural components (DeLong, DeLong & Clarke-Pearson 1988), written plainly.

def psi(x, y):
    return 1.0 if x > y else (0.5 if x == y else 0.0)


def brute_force_delong(labels, *scores):
    pos_idx = [i for i, v in enumerate(labels) if v == 1]
    neg_idx = [i for i, v in enumerate(labels) if v == 0]
    m, n = len(pos_idx), len(neg_idx)
    aucs, v10s, v01s = [], [], []
    for s in scores:
        v10 = [sum(psi(s[i], s[j]) for j in neg_idx) / n for i in pos_idx]
        v01 = [sum(psi(s[i], s[j]) for i in pos_idx) / m for j in neg_idx]
        aucs.append(sum(v10) / m)
        v10s.append(v10)
        v01s.append(v01)
    k = len(scores)
    cov = [[0.0] * k for _ in range(k)]
    for r in range(k):
        for c in range(k):
            s10 = sum((v10s[r][i] - aucs[r]) * (v10s[c][i] - aucs[c]) for i in range(m)) / (m - 1)
            s01 = sum((v01s[r][j] - aucs[r]) * (v01s[c][j] - aucs[c]) for j in range(n)) / (n - 1)
            cov[r][c] = s10 / m + s01 / n
    return aucs, cov


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = (rng.random(80) < 0.35).astype(int)
    a = np.round(y * 0.8 + rng.normal(0, 1, 80), 1)  # rounding creates ties
    b = np.round(a * 0.5 + rng.normal(0, 1, 80), 1)
    fast = delong(y, a, b)
    aucs, cov = brute_force_delong(list(y), list(a), list(b))
    np.testing.assert_allclose(fast.aucs, aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fast.cov, cov, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(fast.aucs[0], roc_auc_score(y, a), atol=1e-12)

    test = delong_test(y, a, b)
    var = cov[0][0] + cov[1][1] - 2 * cov[0][1]
    z = (aucs[0] - aucs[1]) / math.sqrt(var)
    assert test.z == pytest.approx(z, rel=1e-9)
    assert test.p == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)  # a p value, not log10(p)
    assert 0 < test.p <= 1


def test_delong_hand_case():
    # positives 0.9, 0.8, 0.4; negatives 0.7, 0.3. Pairs won: 2 + 2 + 1 of 6 -> AUC 5/6.
    # V10 = [1, 1, 1/2] -> S10 = 1/12; V01 = [2/3, 1] -> S01 = 1/18;
    # var = S10/3 + S01/2 = 1/36 + 1/36 = 1/18.
    y = [1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.4, 0.7, 0.3]
    d = delong(y, s)
    assert d.aucs[0] == pytest.approx(5 / 6)
    assert d.cov[0, 0] == pytest.approx(1 / 18)
    est = auc_delong_ci(y, s)
    half = stats.norm.ppf(0.975) * math.sqrt(1 / 18)
    assert est.ci == pytest.approx((5 / 6 - half, 1.0))  # upper end clipped to 1


def test_delong_test_identical_and_unpaired():
    rng = np.random.default_rng(3)
    y = (rng.random(60) < 0.5).astype(int)
    s = y + rng.normal(0, 1, 60)
    same = delong_test(y, s, s)
    assert same.p == 1.0 and same.difference == 0.0

    y2 = (rng.random(70) < 0.4).astype(int)
    s2 = y2 * 0.3 + rng.normal(0, 1, 70)
    t = unpaired_auc_test(y, s, y2, s2)
    (a1,), ((v1,),) = brute_force_delong(list(y), list(s))
    (a2,), ((v2,),) = brute_force_delong(list(y2), list(s2))
    z = (a1 - a2) / math.sqrt(v1 + v2)
    assert t.p == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-9)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_auc_or_nan_is_nan_for_one_class_and_the_auc_otherwise():
    assert math.isnan(auc_or_nan([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc_or_nan(np.array([0, 0]), np.array([0.1, 0.2])))
    assert auc_or_nan([0, 1, 0, 1], [0.1, 0.4, 0.5, 0.8]) == 0.75


def test_weighted_auc_equals_auc_of_repeated_cases():
    rng = np.random.default_rng(4)
    y = (rng.random(40) < 0.5).astype(int)
    s = np.round(rng.random(40), 1)
    w = rng.integers(0, 4, size=(3, 40)).astype(float)
    got = weighted_aucs(y, s, w)
    for row, value in zip(w, got):
        idx = np.repeat(np.arange(40), row.astype(int))
        assert value == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_bootstrap_ci_is_clustered_by_patient():
    rng = np.random.default_rng(5)
    y = (rng.random(150) < 0.4).astype(int)
    s = y + rng.normal(0, 1.2, 150)
    delong_ci = auc_delong_ci(y, s).ci
    single = bootstrap_auc_ci(y, s, n_boot=2000, seed=0)
    assert single.ci[0] < auc(y, s) < single.ci[1]
    assert single.ci == pytest.approx(delong_ci, abs=0.03)
    # every patient imaged twice with identical results: no new information
    y2, s2, patients = np.repeat(y, 2), np.repeat(s, 2), np.repeat(np.arange(150), 2)
    clustered = bootstrap_auc_ci(y2, s2, groups=patients, n_boot=2000, seed=0)
    naive = bootstrap_auc_ci(y2, s2, n_boot=2000, seed=0)
    width = lambda e: e.ci[1] - e.ci[0]  # noqa: E731
    assert width(clustered) == pytest.approx(width(single), rel=0.15)
    assert width(naive) < 0.85 * width(clustered)  # ignoring clustering overstates precision
    assert bootstrap_auc_ci(y, s, n_boot=1000, seed=7).ci == bootstrap_auc_ci(y, s, n_boot=1000, seed=7).ci
    with pytest.raises(ValueError, match="at least 1000"):
        bootstrap_auc_ci(y, s, n_boot=200)


def test_mean_t_ci_is_the_student_t_interval():
    values = [0.12, -0.03, 0.30, 0.08]
    mean, ci = mean_t_ci(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and ci == pytest.approx(expected)
    assert np.isnan(mean_t_ci([0.2])[1]).all()  # no spread from one value
    assert np.isnan(mean_t_ci([])[0])


def test_wilson_hand_values():
    assert wilson_ci(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_ci(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_ci(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert all(math.isnan(v) for v in wilson_ci(0, 0))


def test_operating_point_hand_case():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.6, 0.2, 0.7, 0.4, 0.3, 0.2, 0.1, 0.05]
    op = OperatingPoint.at_threshold(y, p, 0.5)
    assert (op.tp, op.fn, op.fp, op.tn) == (3, 1, 1, 5)
    d = op.as_dict()
    assert d["sensitivity"] == 0.75 and d["specificity"] == pytest.approx(5 / 6)
    assert d["ppv"] == 0.75 and d["npv"] == pytest.approx(5 / 6) and d["accuracy"] == 0.8
    assert d["accuracy_ci"] == pytest.approx(list(wilson_ci(8, 10)))
    assert d["threshold"] == 0.5


def test_threshold_rules_hand_case():
    y = [0, 0, 0, 1, 1, 1]
    s = [0.1, 0.2, 0.6, 0.4, 0.7, 0.9]
    # J: 0.9 -> 1/3, 0.7 -> 2/3, 0.6 -> 1/3, 0.4 -> 2/3 (tie: the lower, more sensitive threshold wins)
    assert ThresholdRule("youden").fit(y, s) == 0.4
    assert ThresholdRule("sensitivity", 0.5).fit(y, s) == 0.7
    assert ThresholdRule("sensitivity", 0.9).fit(y, s) == 0.4
    with pytest.raises(ValueError):
        ThresholdRule("f1")


def test_logistic_fit_matches_sklearn_unpenalized():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(400, 3))
    y = (rng.random(400) < 1 / (1 + np.exp(-(0.5 + x @ [1.0, -0.5, 0.0])))).astype(int)
    fit = fit_logistic(np.column_stack([np.ones(400), x]), y)
    ref = LogisticRegression(C=np.inf, tol=1e-10, max_iter=10000).fit(x, y)
    np.testing.assert_allclose(fit.coef, np.r_[ref.intercept_, ref.coef_[0]], atol=1e-5)
    assert fit.converged


def test_firth_equals_haldane_correction_on_a_separated_2x2_table():
    # x = 1: 5 upgrades, 0 non-upgrades (separation); x = 0: 10 upgrades, 20 non-upgrades.
    # For a saturated 2x2 model Firth's estimate is the log odds ratio with 1/2 added to every cell.
    x = np.r_[np.ones(5), np.zeros(30)]
    y = np.r_[np.ones(5), np.ones(10), np.zeros(20)]
    design = np.column_stack([np.ones(35), x])
    firth = fit_logistic(design, y, firth=True)
    assert firth.converged
    assert firth.coef[1] == pytest.approx(math.log(5.5 * 20.5 / (0.5 * 10.5)), abs=1e-6)
    assert firth.coef[0] == pytest.approx(math.log(10.5 / 20.5), abs=1e-6)
    assert not fit_logistic(design, y).converged  # plain ML drifts off to infinity


def test_calibration_detects_miscalibration():
    rng = np.random.default_rng(7)
    true_logit = rng.normal(-0.5, 1.5, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    good = calibration(y, 1 / (1 + np.exp(-true_logit)))
    assert good.slope == pytest.approx(1, abs=0.05) and good.intercept == pytest.approx(0, abs=0.05)
    overconfident = calibration(y, 1 / (1 + np.exp(-2 * true_logit)))
    assert overconfident.slope == pytest.approx(0.5, abs=0.03)
    underestimated = calibration(y, 1 / (1 + np.exp(-(true_logit - 1))))
    assert underestimated.intercept > 0.5
    assert brier_score([1, 0], [0.9, 0.2]) == pytest.approx(0.025)


def test_reliability_curve_hand_case():
    y = [0, 0, 1, 1, 0, 1]
    p = [0.1, 0.1, 0.1, 0.9, 0.9, 0.9]
    curve = reliability_curve(y, p, n_bins=2, strategy="uniform")
    assert curve.n.tolist() == [3, 3]
    assert curve.observed.tolist() == pytest.approx([1 / 3, 2 / 3])
    assert curve.mean_predicted.tolist() == pytest.approx([0.1, 0.9])


def test_net_benefit_hand_case():
    y = [1, 0, 1, 0]
    p = [0.8, 0.3, 0.2, 0.1]
    # t = 0.25: treat cases 1 and 2 -> TP 1, FP 1: 1/4 - 1/4 * (0.25 / 0.75)
    assert net_benefit(y, p, [0.25])[0] == pytest.approx(0.25 - 0.25 / 3)
    curve = decision_curve(y, p, [0.25])
    assert curve.treat_all[0] == pytest.approx(0.5 - 0.5 / 3)
    assert curve.treat_none[0] == 0


def test_decision_curves_read_risks_recalibrated_on_internal_validation():
    import pandas as pd

    rng = np.random.default_rng(11)
    n = 4000
    risk = rng.uniform(0.02, 0.6, n)
    y = (rng.random(n) < risk).astype(int)
    inflated = 1 / (1 + np.exp(-(np.log(risk / (1 - risk)) + 1.5)))  # class-weighted training: risks too high
    split = np.where(np.arange(n) < n // 2, "val", "test")
    preds = pd.DataFrame({"case_id": np.arange(n).astype(str), "model": "m", "split": split, "label": y,
                          "prob": inflated})
    fixed, fits = recalibrated(preds)
    assert fits["m"].intercept == pytest.approx(-1.5, abs=0.2) and fits["m"].slope == pytest.approx(1.0, abs=0.1)
    test = (split == "test")
    # the external rows get the map fitted on validation, not one refitted on themselves
    expected = fits["m"].apply(inflated[test])
    np.testing.assert_allclose(fixed.prob[test], expected)
    assert fits["m"] == Recalibration.fit(y[~test], inflated[~test])
    # read as risks, the raw scores overtreat: recalibrated net benefit tracks the true risks' benefit
    t = [0.2, 0.3]
    truth = net_benefit(y[test], risk[test], t)
    assert np.abs(net_benefit(y[test], fixed.prob[test], t) - truth).max() < 0.015
    assert np.abs(net_benefit(y[test], inflated[test], t) - truth).max() > 0.03


def _exact_cluster_bootstrap(y, a, b, clusters):
    """Every equally likely label-stratified cluster resample, enumerated: the bootstrap distribution
    of AUC(a) - AUC(b) that the Monte Carlo sampler approximates."""
    import itertools

    ids = sorted(set(clusters))
    members = {c: [i for i, k in enumerate(clusters) if k == c] for c in ids}
    pos = [c for c in ids if any(y[i] == 1 for i in members[c])]
    neg = [c for c in ids if c not in pos]
    y, a, b = np.asarray(y), np.asarray(a, dtype=float), np.asarray(b, dtype=float)

    def pair_auc(idx, s):  # the share of (positive, negative) pairs ranked right, ties halved
        yy, ss = y[idx], s[idx]
        return float(np.mean([[psi(p, n) for n in ss[yy == 0]] for p in ss[yy == 1]]))

    diffs = []
    for draw_pos in itertools.product(pos, repeat=len(pos)):
        for draw_neg in itertools.product(neg, repeat=len(neg)):
            idx = np.array([i for c in (*draw_pos, *draw_neg) for i in members[c]])
            diffs.append(pair_auc(idx, a) - pair_auc(idx, b))
    return np.array(diffs)


def test_clustered_paired_bootstrap_matches_the_enumerated_bootstrap():
    # 7 patients, 3 with an upgrade; some patients hold two or three cases
    clusters = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5, 6, 6]
    y = [1, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    a = [0.9, 0.3, 0.7, 0.8, 0.6, 0.5, 0.2, 0.4, 0.1, 0.65, 0.35, 0.3]
    b = [0.5, 0.6, 0.4, 0.9, 0.2, 0.3, 0.45, 0.1, 0.7, 0.8, 0.15, 0.5]
    exact = _exact_cluster_bootstrap(y, a, b, clusters)
    test = clustered_bootstrap_auc_difference(y, a, b, clusters, n_boot=40000, seed=1)
    assert test.method == "bootstrap" and test.n == len(y)
    assert test.difference == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
    se = exact.std(ddof=0)
    assert test.z == pytest.approx(test.difference / se, rel=0.03)
    assert test.p == pytest.approx(2 * stats.norm.sf(abs(test.difference / se)), abs=0.01)
    lo, hi = np.quantile(exact, [0.025, 0.975])
    assert test.ci[0] == pytest.approx(lo, abs=0.03) and test.ci[1] == pytest.approx(hi, abs=0.03)
    # the single-score version resamples the same way: its SD matches the enumerated AUC(a) spread
    one = clustered_bootstrap_auc(y, a, clusters, n_boot=20000, seed=2)
    assert one.method == "bootstrap" and one.auc == pytest.approx(roc_auc_score(y, a))


def test_paired_bootstrap_keeps_the_pairing():
    rng = np.random.default_rng(8)
    y = (rng.random(90) < 0.4).astype(int)
    s = y + rng.normal(0, 1, 90)
    patients = np.repeat(np.arange(45), 2)
    # a monotone transform ranks every resample the same way: no difference in any replicate
    same = clustered_bootstrap_auc_difference(y, s, np.exp(s), patients, n_boot=1000)
    assert same.p == 1.0 and same.ci == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 1000"):
        clustered_bootstrap_auc_difference(y, s, s, patients, n_boot=500)


def test_auto_takes_delong_for_one_case_per_patient_and_the_bootstrap_otherwise():
    rng = np.random.default_rng(9)
    y = (rng.random(60) < 0.4).astype(int)
    a, b = y + rng.normal(0, 1, 60), y + rng.normal(0, 1.5, 60)
    singles, pairs = np.arange(60), np.repeat(np.arange(30), 2)
    options = CIOptions("auto", n_boot=1000)
    assert auc_with_ci(y, a, options, groups=singles) == auc_delong_ci(y, a)
    assert paired_auc_test(y, a, b, options, groups=singles) == delong_test(y, a, b)
    clustered = paired_auc_test(y, a, b, options, groups=pairs)
    assert clustered == clustered_bootstrap_auc_difference(y, a, b, pairs, n_boot=1000)
    assert auc_with_ci(y, a, options, groups=pairs).method == "bootstrap"
    assert has_repeated_clusters(pairs) and not has_repeated_clusters(singles) and not has_repeated_clusters(None)


def test_the_roc_band_resamples_patients():
    from diffkd.evaluate.figures import _roc_band

    rng = np.random.default_rng(12)
    y = (rng.random(80) < 0.4).astype(int)
    s = y + rng.normal(0, 1, 80)
    grid = np.linspace(0, 1, 21)
    width = lambda band: float(np.mean(band[1] - band[0]))  # noqa: E731
    single = width(_roc_band(y, s, grid, 400, 0, 0.95))
    # every patient imaged twice with the same result: no new information, the band must not narrow
    twice = dict(y=np.repeat(y, 2), s=np.repeat(s, 2), grid=grid, n_boot=400, seed=0, level=0.95)
    clustered = width(_roc_band(**twice, groups=np.repeat(np.arange(80), 2)))
    assert clustered == pytest.approx(single, rel=0.15)
    assert width(_roc_band(**twice)) < 0.85 * clustered
