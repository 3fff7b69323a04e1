"""The image ceiling (diffkd.data.phantom.ceiling): the quadrature against a closed form on a toy
generative model, and the phantom's own posterior calibrated on cases it simulates."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from diffkd.data.phantom import ceiling, centers, clinical, mammo


def test_the_quadrature_matches_two_gaussians_in_closed_form():
    """y ~ Bernoulli(p), latent a | y ~ N(delta y, 1), the image shows x = a + N(0, sigma^2). Then
    P(y | x) is logistic in x, its AUC is Phi(delta / sqrt(2 (1 + sigma^2))), and P(y | a) has the
    Bayes AUC Phi(delta / sqrt 2)."""
    p, delta, sigma = 0.3, 1.5, 0.8
    grid = np.linspace(-8, 10, 1001)[None, :]
    log_one, log_zero = np.log(p) - 0.5 * (grid - delta) ** 2, np.log(1 - p) - 0.5 * grid ** 2
    prior_log = np.logaddexp(log_one, log_zero)
    label_given_a = np.exp(log_one - prior_log)

    x = np.linspace(-3, 4, 50)
    computed = ceiling.posterior(-0.5 * ((x[:, None] - grid) / sigma) ** 2, prior_log, label_given_a)
    closed = 1 / (1 + (1 - p) / p * np.exp(-(delta * x - delta ** 2 / 2) / (1 + sigma ** 2)))
    assert computed == pytest.approx(closed, abs=1e-6)

    rng = np.random.default_rng(0)
    y = rng.random(20_000) < p
    a = delta * y + rng.standard_normal(len(y))
    seen = a + sigma * rng.standard_normal(len(y))
    image = ceiling.posterior(-0.5 * ((seen[:, None] - grid) / sigma) ** 2, prior_log, label_given_a)
    bayes = 1 / (1 + (1 - p) / p * np.exp(-(delta * a - delta ** 2 / 2)))
    assert roc_auc_score(y, image) == pytest.approx(stats.norm.cdf(delta / np.sqrt(2 * (1 + sigma ** 2))), abs=0.01)
    assert roc_auc_score(y, bayes) == pytest.approx(stats.norm.cdf(delta / np.sqrt(2)), abs=0.01)


def _drawn_features(cases) -> np.ndarray:
    """What the ultrasound renderer draws, as a design matrix (an invisible lesion shows no size)."""
    shown = np.asarray(cases["lesion_type"] != "not_visible", float)
    columns = [shown * np.log(cases["size_mm"].to_numpy(float)),
               *(cases["lesion_type"] == t for t in ("non_mass", "calcification", "not_visible")),
               *(cases["margin"] == m for m in ("microlobulated", "indistinct", "angular", "spiculated")),
               *(cases["posterior"] == v for v in ("enhancement", "shadowing")),
               cases["taller_than_wide"], cases["halo"], cases["calcs_on_us"]]
    return np.column_stack([np.asarray(c, float) for c in columns])


def test_the_phantoms_image_ceiling_is_calibrated_and_above_any_image_score():
    """On 8,000 cases the generator draws (the evidence cohort's center3 mix, difficulty 0.5) the posterior
    is calibrated decile by decile, beats a logistic regression fitted on other cases' drawn features
    (up to chance) and the hand-weighted reference score, and stays below the Bayes ceiling."""
    mix = centers.center_profiles(4, "demo", 1200, 0)[2].mix
    fit = clinical.sample_latent_cases(20_000, mix, np.random.default_rng(1), 0.5, with_birads=False)
    cases = clinical.sample_latent_cases(8_000, mix, np.random.default_rng(2), 0.5, with_birads=False)
    image = ceiling.ultrasound_probability(cases, mix, 0.5)
    y = cases["label"].to_numpy()

    deciles = np.digitize(image, np.quantile(image, np.linspace(0.1, 0.9, 9)))
    for d in range(10):
        part = deciles == d
        se = np.sqrt(image[part].mean() * (1 - image[part].mean()) / part.sum())
        assert abs(y[part].mean() - image[part].mean()) < 4 * se + 0.005
    fitted = LogisticRegression(max_iter=2000).fit(_drawn_features(fit), fit["label"])
    logistic = roc_auc_score(y, fitted.predict_proba(_drawn_features(cases))[:, 1])
    auc = roc_auc_score(y, image)
    assert auc > logistic - 0.005
    assert auc > roc_auc_score(y, clinical.imaging_suspicion(cases, "calcs_on_us")) + 0.01
    assert auc < roc_auc_score(y, cases["label_probability"]) - 0.05


def test_the_mammography_posterior_is_calibrated():
    profile = mammo.dataclasses.replace(mammo.center_profiles("demo")[0], dcis=2800, idc=5200)
    cases = mammo.sample_cases(profile, np.random.default_rng(3), 1.0)
    image = ceiling.mammo_probability(cases, profile, 1.0)
    y = cases["label"].to_numpy()
    assert image.mean() == pytest.approx(y.mean(), abs=0.01)
    deciles = np.digitize(image, np.quantile(image, np.linspace(0.1, 0.9, 9)))
    for d in range(10):
        part = deciles == d
        se = np.sqrt(image[part].mean() * (1 - image[part].mean()) / part.sum())
        assert abs(y[part].mean() - image[part].mean()) < 4 * se + 0.005
    assert roc_auc_score(y, image) > roc_auc_score(y, mammo.imaging_suspicion(cases))
