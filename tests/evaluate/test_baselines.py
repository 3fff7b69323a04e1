"""Seed-001 baselines: mRMR + LASSO recovers planted features; the clinical model finds planted
predictors; everything is fitted on training rows only."""
import numpy as np
import pandas as pd
import pytest

from diffkd.evaluate.baselines import (ClinicalEncoder, ClinicalModel, DeepFeatureModel, discrete_mutual_info,
                                       fit_baselines, mrmr_select, quantile_codes)

INFORMATIVE = [3, 17, 42, 88, 120]


def planted_features(n=300, p=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p))
    eta = x[:, INFORMATIVE] @ np.array([2.0, -2.0, 2.0, -2.0, 2.0])
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
    return x, y


def test_discrete_mutual_info_matches_sklearn():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 6))
    codes = quantile_codes(x, 5)
    assert codes.min() == 0 and codes.max() == 4 and np.all(np.bincount(codes[:, 0]) == 40)
    target = (x[:, 0] + rng.normal(0, 1, 200) > 0).astype(int)
    expected = [mutual_info_score(codes[:, j], target) for j in range(6)]
    np.testing.assert_allclose(discrete_mutual_info(codes, target), expected, atol=1e-12)
    np.testing.assert_allclose(discrete_mutual_info(codes, codes[:, 1])[1], mutual_info_score(codes[:, 1], codes[:, 1]))


def test_mrmr_avoids_redundant_copies():
    x, y = planted_features()
    x[:, 150] = x[:, 3] + np.random.default_rng(1).normal(0, 0.05, len(x))  # a near copy of a strong feature
    chosen = mrmr_select(x, y, k=8)
    assert len(set(chosen) & {3, 150}) == 1  # relevance alone would take both
    assert set(INFORMATIVE) - {3} <= set(chosen)


def test_mrmr_lasso_recovers_planted_features():
    x, y = planted_features()
    model = DeepFeatureModel(n_mrmr=20).fit(x, y)
    assert set(INFORMATIVE) <= set(model.mrmr_)
    assert set(model.selected[:5]) == set(INFORMATIVE)  # the five largest coefficients are the planted ones
    # at the CV-chosen penalty LASSO keeps some noise with small weights, but it does drop features
    assert len(model.selected) <= len(model.mrmr_) - 3
    x_new, y_new = planted_features(seed=9)
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y_new, model.predict_proba(x_new)) > 0.8


def clinical_cohort(n=400, seed=0):
    rng = np.random.default_rng(seed)
    birads = rng.choice(["4a", "4b", "4c", "5"], size=n, p=[0.35, 0.3, 0.2, 0.15])
    palpable = rng.random(n) < 0.3
    age = rng.normal(55, 10, n)  # no effect
    size = rng.gamma(4, 5, n)
    eta = -1.6 + np.select([birads == "4c", birads == "5"], [1.2, 2.0], 0.0) + 1.3 * palpable + 0.03 * size
    y = (rng.random(n) < 1 / (1 + np.exp(-eta))).astype(int)
    df = pd.DataFrame({"birads": birads, "palpable": palpable, "age": age, "lesion_size_mm": size})
    # missing values, as in real records
    df.loc[rng.random(n) < 0.08, "age"] = np.nan
    df.loc[rng.random(n) < 0.05, "birads"] = None
    return df, y


def test_clinical_model_finds_planted_predictors():
    df, y = clinical_cohort()
    model = ClinicalModel().fit(df, y, ["birads", "palpable", "age", "lesion_size_mm"])
    assert "birads" in model.selected and "palpable" in model.selected
    assert "age" not in model.selected
    ors = model.odds_ratios.set_index("term")
    assert ors.loc["palpable", "odds_ratio"] > 1.5 and ors.loc["palpable", "lo"] > 1
    assert ors.loc["birads=5", "odds_ratio"] > ors.loc["birads=4b", "odds_ratio"]
    assert ors.loc["birads=5", "reference"] == "4a"  # most frequent level
    assert {"variable", "p"} <= set(model.univariate.columns)
    probs = model.predict_proba(df)
    assert probs.shape == (len(df),) and np.all((probs > 0) & (probs < 1))


def test_separated_level_gets_a_finite_odds_ratio():
    df, y = clinical_cohort()
    y = y.copy()
    y[df.birads.to_numpy() == "5"] = 1  # every BI-RADS 5 lesion upgraded: quasi-complete separation
    model = ClinicalModel().fit(df, y, ["birads", "palpable"])
    ors = model.odds_ratios.set_index("term")
    assert model.fit_.converged and np.isfinite(ors.loc["birads=5", "hi"])
    assert ors.loc["birads=5", "odds_ratio"] > 10


def test_encoder_imputes_from_training_rows_only():
    train = pd.DataFrame({"age": [40.0, 50.0, np.nan, 60.0], "birads": ["4a", "4a", None, "5"],
                          "palpable": [True, False, True, None]})
    enc = ClinicalEncoder(min_level_count=1).fit(train, ["age", "birads", "palpable"])
    assert enc.fill == {"age": 50.0, "birads": "4a", "palpable": True}
    other = pd.DataFrame({"age": [np.nan, 99.0], "birads": [None, "6"], "palpable": [None, False]})
    x = enc.transform(other)
    assert x["age"].tolist() == [50.0, 99.0]
    assert x["birads=5"].tolist() == [0.0, 0.0]  # missing -> reference; unseen "6" -> reference
    assert x["palpable"].tolist() == [1.0, 0.0]


def test_fit_baselines_uses_training_labels_only():
    x, y = planted_features(n=240, p=130)
    df, _ = clinical_cohort(n=240)
    cases = df.assign(case_id=[f"c{i}" for i in range(240)], patient_id=[f"p{i}" for i in range(240)],
                      center=np.where(np.arange(240) < 180, "A", "B"),
                      split=np.where(np.arange(240) < 140, "train", np.where(np.arange(240) < 180, "val", "test")),
                      label=y)
    columns = ["birads", "palpable", "age", "lesion_size_mm"]
    first = fit_baselines(cases, x, columns)
    assert set(first.predictions.model) == {"clinical", "deep_features", "combined"}
    assert len(first.predictions) == 3 * 240 and first.params["deep_features"] >= 2
    shuffled = cases.copy()
    held_out = shuffled.split != "train"
    shuffled.loc[held_out, "label"] = 1 - shuffled.loc[held_out, "label"]  # flip every non-training label
    second = fit_baselines(shuffled, x, columns)
    np.testing.assert_allclose(first.predictions.prob, second.predictions.prob)
    assert first.summary["clinical"]["odds_ratios"]
    with pytest.raises(ValueError, match="align"):
        fit_baselines(cases, x[:10], columns)
