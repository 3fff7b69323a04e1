"""The baselines of An et al. 2025: mRMR + LASSO recovers planted features; the clinical model finds planted
predictors; everything is fitted on training rows only."""
import numpy as np
import pandas as pd
import pytest

from diffkd.evaluate.baselines import (ClinicalEncoder, ClinicalModel, DeepFeatureModel, DeepFeatures,
                                       cross_fitted_features, discrete_mutual_info, extractor_folds, fit_baselines,
                                       mrmr_select, quantile_codes)

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
    assert ors.loc["birads", "lo"] > 1  # one odds ratio per BI-RADS step: the scale is ordinal
    assert model.summary()["imputation"]["birads"] == {"kind": "ordinal", "fill": 3.0}  # median rank: 4b
    assert {"variable", "p"} <= set(model.univariate.columns)
    probs = model.predict_proba(df)
    assert probs.shape == (len(df),) and np.all((probs > 0) & (probs < 1))


def test_separated_level_gets_a_finite_odds_ratio():
    df, y = clinical_cohort()
    y = y.copy()
    kind = np.random.default_rng(1).choice(["mass", "non_mass", "calcification"], len(df), p=[0.6, 0.25, 0.15])
    df = df.assign(lesion_type=kind)
    y[kind == "calcification"] = 1  # every calcification upgraded: quasi-complete separation
    model = ClinicalModel().fit(df, y, ["lesion_type", "palpable"])
    ors = model.odds_ratios.set_index("term")
    assert model.fit_.converged and np.isfinite(ors.loc["lesion_type=calcification", "hi"])
    assert ors.loc["lesion_type=calcification", "odds_ratio"] > 10
    assert ors.loc["lesion_type=calcification", "reference"] == "mass"  # most frequent level


def test_encoder_imputes_from_training_rows_only():
    train = pd.DataFrame({"age": [40.0, 50.0, np.nan, 60.0], "birads": ["4a", "4a", None, "5"],
                          "palpable": [True, False, True, None]})
    enc = ClinicalEncoder(min_level_count=1).fit(train, ["age", "birads", "palpable"])
    assert enc.fill == {"age": 50.0, "birads": 2.0, "palpable": True}  # BI-RADS: the median rank (4a)
    other = pd.DataFrame({"age": [np.nan, 99.0], "birads": [None, "6"], "palpable": [None, False]})
    x = enc.transform(other)
    assert x["age"].tolist() == [50.0, 99.0]
    assert x["birads"].tolist() == [2.0, 6.0]  # ordinal: 2 < 3 < 4a < 4b < 4c < 5 < 6, missing -> median
    assert x["palpable"].tolist() == [1.0, 0.0]


def test_fit_baselines_uses_training_labels_only():
    x, y = planted_features(n=240, p=130)
    df, _ = clinical_cohort(n=240)
    cases = df.assign(case_id=[f"c{i}" for i in range(240)], patient_id=[f"p{i}" for i in range(240)],
                      center=np.where(np.arange(240) < 180, "A", "B"),
                      split=np.where(np.arange(240) < 140, "train", np.where(np.arange(240) < 180, "val", "test")),
                      label=y)
    columns = ["birads", "palpable", "age", "lesion_size_mm"]
    first = fit_baselines(cases, DeepFeatures.frozen(x, "given"), columns)
    assert set(first.predictions.model) == {"clinical", "deep_features", "combined"}
    assert len(first.predictions) == 3 * 240 and first.params["deep_features"] >= 2
    shuffled = cases.copy()
    held_out = shuffled.split != "train"
    shuffled.loc[held_out, "label"] = 1 - shuffled.loc[held_out, "label"]  # flip every non-training label
    second = fit_baselines(shuffled, DeepFeatures.frozen(x, "given"), columns)
    np.testing.assert_allclose(first.predictions.prob, second.predictions.prob)
    assert first.summary["clinical"]["odds_ratios"]
    with pytest.raises(ValueError, match="align"):
        fit_baselines(cases, DeepFeatures.frozen(x[:10], "given"), columns)
    with pytest.raises(TypeError, match="DeepFeatures"):
        fit_baselines(cases, x, columns)  # a bare matrix does not say which cases its extractor was trained on


def _cohort_with_patients(n=240, seed=3):
    x, y = planted_features(n=n, p=130, seed=seed)
    df, _ = clinical_cohort(n=n, seed=seed)
    patient = np.arange(n) // 2  # two cases per patient
    split = np.where(patient < 70, "train", np.where(patient < 95, "val", "test"))
    return x, df.assign(case_id=[f"c{i}" for i in range(n)], patient_id=[f"p{i}" for i in patient],
                        center=np.where(split == "test", "B", "A"), split=split, label=y)


def memorising_extractor(cases, x):
    """A stand-in for a CNN trained from scratch: on the cases it was trained on, feature 0 is the label
    (memorised) and feature 1 flags them; on others feature 0 is noise and the flag is 0. The rest
    are the planted informative features, as any case's image would give them."""
    rng = np.random.default_rng(0)

    def fit_and_extract(k, fitted):
        memorised = np.where(fitted, cases.label.to_numpy() * 3.0, rng.normal(size=len(cases)))
        return np.column_stack([memorised, fitted.astype(float), x])
    return fit_and_extract


def test_feature_selection_never_sees_extractor_fit_rows(monkeypatch):
    x, cases = _cohort_with_patients()
    columns = ["birads", "palpable", "age", "lesion_size_mm"]
    seen = []
    fit = DeepFeatureModel.fit
    monkeypatch.setattr(DeepFeatureModel, "fit", lambda self, f, y: seen.append(np.array(f)) or fit(self, f, y))
    features = cross_fitted_features(cases, 2, 0, memorising_extractor(cases, x), "cross-fitted test extractor")
    result = fit_baselines(cases, features, columns)
    (selection_input,) = seen
    train = (cases.split == "train").to_numpy()
    assert len(selection_input) == train.sum()
    assert not selection_input[:, 1].any()  # no feature vector from an extractor trained on that case
    assert 0 not in result.summary["deep_features"]["selected"]  # the memorised label column is noise here
    assert result.summary["deep_features"]["features"] == "cross-fitted test extractor"
    # every case is scored through the extractors that never trained on it: val/test through both
    scored = result.predictions[result.predictions.model == "deep_features"].set_index("case_id").prob
    deep = DeepFeatureModel(32, 0).fit(selection_input, cases.label[train])
    held = ~train
    expected = np.mean([deep.predict_proba(m[held]) for m in features.matrices], axis=0)
    np.testing.assert_allclose(scored[cases.case_id[held]].to_numpy(), expected)

    # the old behaviour, one extractor trained on every training case, is refused outright
    old = memorising_extractor(cases, x)(0, train)
    with pytest.raises(ValueError, match="every extractor was trained on it"):
        DeepFeatures([old], train[None, :], "trained on the training split")


def test_extractor_folds_split_patients_and_keep_the_upgrade_rate():
    _, cases = _cohort_with_patients(n=400)
    folds = extractor_folds(cases, 3, seed=1)
    train = (cases.split == "train").to_numpy()
    assert set(folds[~train]) == {-1} and set(folds[train]) == {0, 1, 2}
    assert cases.assign(fold=folds)[train].groupby("patient_id").fold.nunique().max() == 1
    rates = cases[train].groupby(folds[train]).label.mean()
    assert rates.max() - rates.min() < 0.12
    with pytest.raises(ValueError, match="feature_folds"):
        extractor_folds(cases, 500)


def test_a_pretrained_feature_model_is_used_frozen_and_nothing_trains(tmp_path, monkeypatch):
    """`baselines.feature_model.pretrained`: features of every case straight from those weights; no
    extractor is trained on the cohort, and the report learns where the weights came from."""
    from pathlib import Path

    import torch

    import diffkd.train.teacher
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.ingest import ingest
    from diffkd.data.phantom import generate_cohort
    from diffkd.data.pipeline import PipelineConfig
    from diffkd.data.splits import make_splits
    from diffkd.evaluate.baselines import BaselineConfig
    from diffkd.models.classifiers import create_classifier, save_classifier
    from diffkd.experiments.experiment import BaselineStage
    from diffkd.experiments.stages import baselines
    from diffkd.train.teacher import TeacherConfig

    generate_cohort(tmp_path / "phantom", size="demo", centers=2, patients=60, seed=5)
    for center in ("center1", "center2"):
        ingest(tmp_path / "phantom" / center, center, tmp_path / "data",
               clinical_csv=tmp_path / "phantom" / center / "clinical.csv")
    ds = ImageDataset(tmp_path / "data")
    assignments = make_splits(ds.metadata().to_pandas(), ["center2"], 0.25, 0)
    torch.manual_seed(0)
    save_classifier(create_classifier("resnet18", in_chans=1), str(tmp_path / "weights"))
    monkeypatch.setattr(diffkd.train.teacher, "train_teacher",
                        lambda *a, **k: pytest.fail("a frozen pretrained extractor must not be trained"))
    stage = BaselineStage(config=BaselineConfig(n_mrmr=8),
                          feature_model=TeacherConfig(arch="resnet18", pretrained=str(tmp_path / "weights"),
                                                      pipeline=PipelineConfig(image_size=32)))
    out = baselines(ds, assignments, stage, tmp_path / "run", "us")
    deep = out["summary"]["deep_features"]
    assert deep["extractors"] == 1 and deep["features"].startswith("frozen pretrained resnet18")
    assert deep["initialised_from"].startswith("weights (sha256 ")  # the weights' name and digest, not a path
    preds = pd.read_parquet(Path(out["predictions"]))
    assert set(preds.model) == {"clinical", "deep_features", "combined"} and preds.prob.between(0, 1).all()


def test_without_clinical_values_only_the_deep_feature_model_is_fitted():
    """A dataset without clinical data (e.g. BUSI): the clinical and combined models are skipped, with why."""
    x, y = planted_features(n=120, p=130)
    cases = pd.DataFrame({"case_id": [f"c{i}" for i in range(120)], "patient_id": [f"p{i}" for i in range(120)],
                          "center": "A", "split": np.where(np.arange(120) < 90, "train", "val"), "label": y,
                          "age": np.nan, "birads": None})
    result = fit_baselines(cases, DeepFeatures.frozen(x, "given"), ["age", "birads"])
    assert set(result.predictions.model) == {"deep_features"} and set(result.params) == {"deep_features"}
    assert set(result.summary["skipped"]) == {"clinical", "combined"}
    assert "no usable clinical variable among age, birads" in result.summary["skipped"]["clinical"]
    assert "deep_features" in result.summary
    with pytest.raises(ValueError, match="no usable clinical variable"):  # nothing left to fit
        fit_baselines(cases, None, ["age", "birads"])
