"""The baselines of An et al. 2025 ("Differentiation of Suspicious Microcalcifications Using Deep Learning:
DCIS or IDC"): clinical, deep-feature and combined models.

- clinical: each clinical variable is screened alone (likelihood-ratio test, p < `screen_p`); the
  survivors enter a multivariate logistic regression; variables that stay significant there
  (p < `keep_p`) are the independent predictors, and the final model is refitted on them alone
  (odds ratios with Wald 95% CIs). Categorical variables are one-hot coded against their most
  frequent training level; ordered categories (BI-RADS) enter as their rank, one odds ratio per
  category step (2 < 3 < 4a < 4b < 4c < 5 < 6), as a radiologist's scale is read. Variables are
  chosen with ordinary maximum-likelihood ratio tests (unit-invariant, and finite even under
  separation); the final model's coefficients use Firth's
  penalized likelihood, so a level seen only with upgrades (separation, common in small cohorts)
  gets a large but finite odds ratio instead of an infinite one.
- deep_features: penultimate-layer features of a CNN (the caller extracts them, `DeepFeatures`),
  standardized, mutual-information mRMR, then L1 (LASSO) logistic regression with the penalty chosen
  by stratified cross-validation on the training set. Feature selection never sees features of a case
  made by an extractor that was trained on that case: a CNN trained from scratch on the training
  split has memorised those images, and mRMR + LASSO would select features that separate memorised
  labels. The extractor is either frozen (pretrained elsewhere), or cross-fitted: K extractors, each
  trained without one fold of training patients (`extractor_folds`), give the out-of-fold features
  the selection is fitted on; every other case is scored through each extractor and the K
  probabilities are averaged, so training and scored cases both reach the model through an
  extractor that never saw them.
- combined: the LASSO-selected deep features plus the clinical model's design columns, again L1
  logistic regression with the penalty chosen by cross-validation.

Everything is fitted on the training rows only: imputation values, category levels, scalers, the
mRMR ranking and the penalties. Missing values: numeric and ordinal -> training median, boolean and
categorical -> most frequent training value; categorical levels unseen in training fall to the reference level.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler

from diffkd.data.schema import BIRADS_LEVELS
from diffkd.evaluate.logistic import LogisticFit, fit_logistic, likelihood_ratio_p
from diffkd.evaluate.metrics import binary_labels

log = logging.getLogger(__name__)

# scikit-learn 1.8 replaced penalty="l1" by l1_ratio=1.0; older versions ignore l1_ratio without
# penalty="elasticnet", which would silently fit an L2 model.
_HAS_L1_RATIO = tuple(int(x) for x in sklearn.__version__.split(".")[:2]) >= (1, 8)


def _l1_logistic(c: float) -> LogisticRegression:
    # liblinear's coordinate descent visits features in random order: fix it for reproducible fits
    if _HAS_L1_RATIO:
        return LogisticRegression(C=c, l1_ratio=1.0, solver="liblinear", max_iter=1000, random_state=0)
    return LogisticRegression(C=c, penalty="l1", solver="liblinear", max_iter=1000, random_state=0)


ORDINAL_LEVELS = {"birads": BIRADS_LEVELS}  # ordered categories, entered as their rank in these levels


def _sigmoid(eta: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-eta))


# --------------------------------------------------------------------------------------------------
# Clinical design matrix


@dataclass
class ClinicalEncoder:
    """Imputation and one-hot coding learnt from the training rows."""

    min_level_count: int = 5  # rarer training levels merge into "other" (keeps ORs estimable)
    kinds: dict[str, str] = field(default_factory=dict)  # variable -> numeric | ordinal | binary | categorical
    fill: dict[str, object] = field(default_factory=dict)
    levels: dict[str, list[str]] = field(default_factory=dict)  # non-reference levels
    reference: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)  # variable -> why it was left out

    def fit(self, frame: pd.DataFrame, columns: Sequence[str]) -> "ClinicalEncoder":
        for col in columns:
            values = frame[col].dropna()
            if values.empty:
                self.dropped[col] = "no training values"
            elif values.nunique() < 2:
                self.dropped[col] = "constant in training data"
            elif col in ORDINAL_LEVELS:
                self.kinds[col], self.fill[col] = "ordinal", float(_ranks(values, col).median())
            elif pd.api.types.is_bool_dtype(values) or set(values.unique()) <= {True, False}:
                self.kinds[col], self.fill[col] = "binary", bool(values.astype(bool).mode().iloc[0])
            elif pd.api.types.is_numeric_dtype(values):
                self.kinds[col], self.fill[col] = "numeric", float(values.median())
            else:
                text = values.astype(str)
                counts = text.value_counts()
                rare = counts.index[counts < self.min_level_count]
                if len(rare) > 1:
                    counts = text.where(~text.isin(rare), "other").value_counts()
                reference = str(counts.index[0])
                self.kinds[col], self.fill[col], self.reference[col] = "categorical", reference, reference
                self.levels[col] = sorted(level for level in counts.index if level != reference)
        return self

    @property
    def variables(self) -> list[str]:
        return list(self.kinds)

    def columns_of(self, variable: str) -> list[str]:
        if self.kinds[variable] == "categorical":
            return [f"{variable}={level}" for level in self.levels[variable]]
        return [variable]

    def transform(self, frame: pd.DataFrame, variables: Sequence[str] | None = None) -> pd.DataFrame:
        out = {}
        for var in self.variables if variables is None else variables:
            kind, values = self.kinds[var], frame[var]
            if kind == "numeric":
                out[var] = pd.to_numeric(values, errors="coerce").fillna(self.fill[var]).astype(float)
            elif kind == "ordinal":
                out[var] = _ranks(values, var).fillna(self.fill[var])
            elif kind == "binary":
                out[var] = values.astype(object).where(values.notna(), self.fill[var]).astype(bool).astype(float)
            else:
                text = values.astype(object).where(values.notna(), self.fill[var]).astype(str)
                known = set(self.levels[var]) | {self.reference[var]}
                if "other" in known:  # rare training levels were merged into "other"
                    text = text.where(text.isin(known), "other")
                unseen = ~text.isin(known)
                if unseen.any():
                    log.warning("clinical %s: %d value(s) unseen in training (%s) coded as the reference %r",
                                var, int(unseen.sum()), ", ".join(sorted(text[unseen].unique())[:3]),
                                self.reference[var])
                for level in self.levels[var]:
                    out[f"{var}={level}"] = (text == level).astype(float)
        return pd.DataFrame(out, index=frame.index)


def _ranks(values: pd.Series, variable: str) -> pd.Series:
    """An ordered category's values as their rank (float); missing stays NaN, an unknown level is an error."""
    levels = ORDINAL_LEVELS[variable]
    unknown = sorted(set(values.dropna().astype(str)) - set(levels))
    if unknown:
        raise ValueError(f"clinical {variable}: value(s) {', '.join(unknown[:3])} are not among {', '.join(levels)}")
    return values.map(lambda v: float(levels.index(str(v))) if pd.notna(v) else np.nan).astype(float)


# --------------------------------------------------------------------------------------------------
# Clinical model


class NoClinicalVariable(ValueError):
    """No clinical column has values that vary in the training rows."""


@dataclass
class ClinicalModel:
    screen_p: float = 0.1
    keep_p: float = 0.05
    firth: bool = True
    encoder: ClinicalEncoder = field(default_factory=ClinicalEncoder)
    univariate: pd.DataFrame | None = None  # variable, p, odds ratios of its columns
    multivariate: pd.DataFrame | None = None  # term, odds_ratio, lo, hi, p
    odds_ratios: pd.DataFrame | None = None  # the final model's
    selected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fit_: LogisticFit | None = None

    def fit(self, frame: pd.DataFrame, labels: Sequence, columns: Sequence[str]) -> "ClinicalModel":
        y = binary_labels(labels)
        self.encoder.fit(frame, columns)
        self.notes += [f"{v} left out: {why}" for v, why in self.encoder.dropped.items()]
        if not self.encoder.variables:
            raise NoClinicalVariable(f"no usable clinical variable among {', '.join(columns) or 'no columns'}")
        design = self.encoder.transform(frame)
        null = fit_logistic(np.ones((len(y), 1)), y)

        rows = []
        for var in self.encoder.variables:
            cols = self.encoder.columns_of(var)
            fit = fit_logistic(self._with_intercept(design[cols]), y)
            rows.append({"variable": var, "p": likelihood_ratio_p(fit, null, len(cols)), "terms": len(cols)})
        self.univariate = pd.DataFrame(rows).sort_values("p").reset_index(drop=True)
        passed = set(self.univariate.variable[self.univariate.p < self.screen_p])
        screened = [v for v in self.encoder.variables if v in passed]
        if not screened:
            screened = [self.univariate.variable.iloc[0]]
            self.notes.append(f"no variable reached p < {self.screen_p} alone; kept the strongest, {screened[0]}")

        multi = self._fit_terms(design, y, screened)
        self.multivariate = self._or_table(multi, design, screened)
        kept = []
        for var in screened:
            others = [v for v in screened if v != var]
            reduced = self._fit_terms(design, y, others) if others else null
            if likelihood_ratio_p(multi, reduced, len(self.encoder.columns_of(var))) < self.keep_p:
                kept.append(var)
        if not kept:
            kept = screened
            self.notes.append(f"no variable stayed at p < {self.keep_p} in the multivariate model; "
                              "kept all screened variables")
        self.selected = kept
        self.fit_ = self._fit_terms(design, y, kept, firth=self.firth)
        self.odds_ratios = self._or_table(self.fit_, design, kept)
        if not self.fit_.converged:
            self.notes.append("final logistic regression did not converge: odds ratios unreliable")
        return self

    def _cols(self, variables: Sequence[str]) -> list[str]:
        return [c for v in variables for c in self.encoder.columns_of(v)]

    @staticmethod
    def _with_intercept(x: pd.DataFrame) -> np.ndarray:
        return np.column_stack([np.ones(len(x)), x.to_numpy(dtype=float)])

    def _fit_terms(self, design: pd.DataFrame, y: np.ndarray, variables: Sequence[str],
                   firth: bool = False) -> LogisticFit:
        return fit_logistic(self._with_intercept(design[self._cols(variables)]), y, firth=firth)

    def _or_table(self, fit: LogisticFit, design: pd.DataFrame, variables: Sequence[str]) -> pd.DataFrame:
        lo, hi = fit.wald_ci()
        terms = self._cols(variables)
        with np.errstate(over="ignore"):  # under separation an OR or its CI bound is +inf, shown as such
            ors, ors_lo, ors_hi = np.exp(fit.coef[1:]), np.exp(lo[1:]), np.exp(hi[1:])
        return pd.DataFrame({
            "term": terms, "odds_ratio": ors, "lo": ors_lo, "hi": ors_hi,
            "p": fit.wald_p()[1:],
            "reference": [self.encoder.reference.get(t.split("=")[0], "") if "=" in t else "" for t in terms],
        })

    def design(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The final model's design columns (used by the combined model)."""
        return self.encoder.transform(frame, self.selected)

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        return _sigmoid(self._with_intercept(self.design(frame)) @ self.fit_.coef)

    @property
    def n_params(self) -> int:
        return len(self.fit_.coef)

    def summary(self) -> dict:
        return {
            "univariate": self.univariate.to_dict("records"),
            "multivariate": self.multivariate.to_dict("records"),
            "odds_ratios": self.odds_ratios.to_dict("records"),
            "selected": self.selected,
            "screen_p": self.screen_p, "keep_p": self.keep_p, "firth": self.firth,
            "imputation": {v: {"kind": self.encoder.kinds[v], "fill": self.encoder.fill[v]}
                           for v in self.encoder.variables},
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------------
# mRMR + LASSO


def quantile_codes(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Each column of x cut at its own quantiles into at most `n_bins` integer codes 0..n_bins-1."""
    x = np.asarray(x, dtype=float)
    cuts = np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1], axis=0)  # (n_bins - 1, d)
    return (x[None, :, :] > cuts[:, None, :]).sum(axis=0)


def discrete_mutual_info(codes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Plug-in mutual information (nats) of every column of `codes` with `target` (both integer codes);
    the vectorized equivalent of sklearn.metrics.mutual_info_score per column."""
    codes = np.asarray(codes)
    target = np.unique(np.asarray(target), return_inverse=True)[1]
    n, d = codes.shape
    a, c = int(codes.max()) + 1, int(target.max()) + 1
    # one bincount over (feature, code, target) cells gives every feature's contingency table
    cells = (np.arange(d)[None, :] * (a * c) + codes * c + target[:, None]).ravel()
    joint = np.bincount(cells, minlength=d * a * c).reshape(d, a, c) / n
    outer = joint.sum(axis=2, keepdims=True) * joint.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(joint > 0, joint * np.log(joint / outer), 0.0)
    return terms.sum(axis=(1, 2))


def mrmr_select(x: np.ndarray, y: Sequence, k: int, n_bins: int = 5) -> list[int]:
    """Mutual-information mRMR (Peng, Long & Ding 2005, difference form), greedy.

    Each feature is cut into `n_bins` quantile bins, as in Peng et al.; then
    relevance(f) = I(f; y) and redundancy(f) = mean over already selected s of I(f; s), both by the
    same plug-in estimator so the difference is on one scale. (scikit-learn's kNN estimator was
    tried for relevance: on a few hundred cases it ranked planted features worse and ran ~30x
    slower.) Returns column indices in selection order.
    """
    codes = quantile_codes(x, n_bins)
    k = min(k, codes.shape[1])
    relevance = discrete_mutual_info(codes, binary_labels(y))
    selected = [int(np.argmax(relevance))]
    redundancy = np.zeros(codes.shape[1])
    while len(selected) < k:
        redundancy += discrete_mutual_info(codes, codes[:, selected[-1]])
        score = relevance - redundancy / len(selected)
        score[selected] = -np.inf
        selected.append(int(np.argmax(score)))
    return selected


@dataclass
class LassoCV:
    """L1 logistic regression, C chosen by stratified k-fold CV on log loss with the one-standard-error
    rule: the strongest penalty whose mean CV loss is within one SE of the best (Hastie et al.,
    glmnet's lambda.1se) -- sparser than the minimum and as good within CV noise."""

    cs: Sequence[float] = tuple(np.logspace(-2, 1, 25))  # standardized features: C = 10 is nearly unpenalized
    folds: int = 5
    random_state: int = 0
    c_: float | None = None
    model_: LogisticRegression | None = None
    cv_loss_: list[float] = field(default_factory=list)

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LassoCV":
        folds = min(self.folds, int(np.bincount(y).min()))
        if folds < 2:
            raise ValueError("LASSO cross-validation needs at least 2 cases of each class in training data")
        splitter = StratifiedKFold(folds, shuffle=True, random_state=self.random_state)
        splits = list(splitter.split(x, y))
        losses = np.array([[log_loss(y[te], _l1_logistic(c).fit(x[tr], y[tr]).predict_proba(x[te])[:, 1],
                                     labels=[0, 1]) for tr, te in splits] for c in self.cs])
        self.cv_loss_ = losses.mean(axis=1).tolist()
        best = int(np.argmin(self.cv_loss_))
        limit = self.cv_loss_[best] + losses[best].std(ddof=1) / np.sqrt(folds)
        cs = np.asarray(self.cs)
        self.c_ = float(cs[np.asarray(self.cv_loss_) <= limit].min())
        self.model_ = _l1_logistic(self.c_).fit(x, y)
        return self

    @property
    def coef(self) -> np.ndarray:
        return self.model_.coef_[0]

    @property
    def nonzero(self) -> np.ndarray:
        return np.flatnonzero(self.coef)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.model_.predict_proba(x)[:, 1]


@dataclass
class DeepFeatureModel:
    n_mrmr: int = 32
    random_state: int = 0
    scaler_: StandardScaler | None = None
    mrmr_: list[int] = field(default_factory=list)
    lasso_: LassoCV | None = None

    def fit(self, features: np.ndarray, labels: Sequence) -> "DeepFeatureModel":
        y = binary_labels(labels)
        self.scaler_ = StandardScaler().fit(features)
        z = self.scaler_.transform(features)
        self.mrmr_ = mrmr_select(z, y, self.n_mrmr)
        self.lasso_ = LassoCV(random_state=self.random_state).fit(z[:, self.mrmr_], y)
        return self

    @property
    def selected(self) -> list[int]:
        """Feature indices (into the original matrix) with non-zero LASSO coefficients, largest |coef| first."""
        order = sorted(self.lasso_.nonzero, key=lambda i: -abs(self.lasso_.coef[i]))
        return [self.mrmr_[i] for i in order]

    def standardized(self, features: np.ndarray) -> np.ndarray:
        return self.scaler_.transform(features)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        return self.lasso_.predict_proba(self.standardized(features)[:, self.mrmr_])

    @property
    def n_params(self) -> int:
        return len(self.lasso_.nonzero) + 1

    def summary(self) -> dict:
        coef = dict(zip(self.mrmr_, self.lasso_.coef))
        return {"n_features": int(self.scaler_.n_features_in_), "n_mrmr": len(self.mrmr_), "mrmr": self.mrmr_,
                "selected": self.selected, "coefficients": [float(coef[i]) for i in self.selected],
                "lasso_c": self.lasso_.c_}


@dataclass
class CombinedModel:
    """LASSO-selected deep features + the clinical model's design columns, L1 logistic with CV."""

    random_state: int = 0
    clinical_scaler_: StandardScaler | None = None
    lasso_: LassoCV | None = None
    terms_: list[str] = field(default_factory=list)

    def _matrix(self, deep: DeepFeatureModel, clinical: ClinicalModel, features: np.ndarray,
                frame: pd.DataFrame, fit: bool = False) -> np.ndarray:
        design = clinical.design(frame)
        if fit:
            self.clinical_scaler_ = StandardScaler().fit(design.to_numpy())
            self.terms_ = [f"deep[{i}]" for i in deep.selected] + list(design.columns)
        return np.column_stack([deep.standardized(features)[:, deep.selected],
                                self.clinical_scaler_.transform(design.to_numpy())])

    def fit(self, deep: DeepFeatureModel, clinical: ClinicalModel, features: np.ndarray, frame: pd.DataFrame,
            labels: Sequence) -> "CombinedModel":
        x = self._matrix(deep, clinical, features, frame, fit=True)
        self.lasso_ = LassoCV(random_state=self.random_state).fit(x, binary_labels(labels))
        return self

    def predict_proba(self, deep: DeepFeatureModel, clinical: ClinicalModel, features: np.ndarray,
                      frame: pd.DataFrame) -> np.ndarray:
        return self.lasso_.predict_proba(self._matrix(deep, clinical, features, frame))

    @property
    def n_params(self) -> int:
        return len(self.lasso_.nonzero) + 1

    def summary(self) -> dict:
        return {"terms": [self.terms_[i] for i in self.lasso_.nonzero],
                "coefficients": [float(self.lasso_.coef[i]) for i in self.lasso_.nonzero], "lasso_c": self.lasso_.c_}


# --------------------------------------------------------------------------------------------------
# All three, as predictions in the contract's shape


@dataclass(frozen=True)
class BaselineConfig:
    """The `baselines:` section of an experiment config."""

    screen_p: float = 0.1
    keep_p: float = 0.05
    n_mrmr: int = 32
    seed: int = 0
    # extractors trained from scratch are cross-fitted over this many folds of training patients
    # (each trains on (K-1)/K of them); a frozen pretrained extractor needs no folds
    feature_folds: int = 3

    def __post_init__(self):
        if self.feature_folds < 2:
            raise ValueError(f"baselines.config.feature_folds={self.feature_folds}: cross-fitting needs at least "
                             "2 folds (features of a case must come from an extractor not trained on it)")


@dataclass
class DeepFeatures:
    """Deep features of every case from one or more extractors, and which cases each was trained on.

    matrices[k][i] is extractor k's feature vector of case i (rows aligned with the cases table);
    fitted_on[k, i] is True when extractor k was trained on case i (its features of case i are
    memorised and never used).
    """

    matrices: list[np.ndarray]
    fitted_on: np.ndarray  # (n_extractors, n_cases) bool
    how: str  # how the features were made, for the report

    def __post_init__(self):
        self.matrices = [np.asarray(m, dtype=float) for m in self.matrices]
        self.fitted_on = np.asarray(self.fitted_on, dtype=bool)
        if not self.matrices:
            raise ValueError("DeepFeatures needs at least one extractor's features")
        n = len(self.matrices[0])
        shapes_differ = any(m.shape != self.matrices[0].shape for m in self.matrices)
        if shapes_differ or self.fitted_on.shape != (len(self.matrices), n):
            raise ValueError(f"DeepFeatures: {len(self.matrices)} feature matrices of shapes "
                             f"{[m.shape for m in self.matrices]} and fitted_on of shape {self.fitted_on.shape}; "
                             "every extractor needs one row per case and one fitted_on row")
        unseen = ~self.fitted_on
        if not unseen.any(axis=0).all():
            i = int(np.flatnonzero(~unseen.any(axis=0))[0])
            raise ValueError(f"case row {i}: every extractor was trained on it, so no feature vector of it is free "
                             "of memorisation; cross-fit the extractor (each case left out of one) or use a frozen one")

    @classmethod
    def frozen(cls, matrix: np.ndarray, how: str) -> "DeepFeatures":
        """Features of an extractor trained on none of the cases (pretrained elsewhere, kept frozen)."""
        matrix = np.asarray(matrix, dtype=float)
        return cls([matrix], np.zeros((1, len(matrix)), dtype=bool), how)

    def __len__(self) -> int:
        return len(self.matrices[0])

    def unseen(self, rows: np.ndarray) -> np.ndarray:
        """Each of `rows` (a boolean mask) as the mean of its feature vectors from extractors not trained on it."""
        weights = (~self.fitted_on[:, rows]).astype(float)  # (K, n_rows)
        stacked = np.stack([m[rows] for m in self.matrices])  # (K, n_rows, d)
        return (weights[:, :, None] * stacked).sum(axis=0) / weights.sum(axis=0)[:, None]

    def averaged(self, predict) -> np.ndarray:
        """predict(features) -> probabilities, run through every extractor and averaged over, for each case,
        the extractors not trained on it."""
        probs = np.stack([predict(m) for m in self.matrices])  # (K, n)
        unseen = ~self.fitted_on
        return (probs * unseen).sum(axis=0) / unseen.sum(axis=0)


def extractor_folds(cases: pd.DataFrame, n_folds: int, seed: int = 0) -> np.ndarray:
    """Each case's cross-fitting fold, 0..n_folds-1, for training cases (`split == "train"`); -1 otherwise.

    Folds split patients (all of a patient's cases share a fold) and keep the upgrade rate of each
    fold near the training rate.
    """
    train = (cases.split == "train").to_numpy()
    y = binary_labels(cases.label.to_numpy()[train])
    patients = cases.patient_id.to_numpy()[train]
    smallest = min(len(np.unique(patients[y == c])) for c in (0, 1)) if 0 < y.sum() < len(y) else 0
    if smallest < n_folds:
        raise ValueError(f"cross-fitting the feature extractor over {n_folds} folds needs at least {n_folds} "
                         f"training patients of each class; the smaller class has {smallest}. Lower "
                         "baselines.config.feature_folds or give a frozen pretrained feature_model")
    folds = np.full(len(cases), -1)
    splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
    train_index = np.flatnonzero(train)
    for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(y)), y, patients)):
        folds[train_index[held_out]] = k
    return folds


def cross_fitted_features(cases: pd.DataFrame, n_folds: int, seed: int,
                          fit_and_extract: Callable[[int, np.ndarray], np.ndarray], how: str) -> DeepFeatures:
    """K extractors, extractor k trained on every training case outside fold k (`extractor_folds`).

    fit_and_extract(k, train_mask) trains extractor k on the training cases where `train_mask` is True
    (the caller may also use non-training rows, e.g. internal validation for early stopping; they
    never reach feature selection) and returns its features of every case, rows aligned with `cases`.
    """
    folds = extractor_folds(cases, n_folds, seed)
    train = (cases.split == "train").to_numpy()
    matrices, fitted_on = [], []
    for k in range(n_folds):
        fitted = train & (folds != k)
        matrices.append(fit_and_extract(k, fitted))
        fitted_on.append(fitted)
    return DeepFeatures(matrices, np.array(fitted_on), how)


@dataclass
class BaselineResult:
    predictions: pd.DataFrame  # case_id, patient_id, center, split, label, model, prob
    summary: dict  # JSON-able: odds ratios, selected features, penalties (for the report)
    params: dict[str, int]  # model -> fitted parameter count


CASE_COLUMNS = ("case_id", "patient_id", "center", "split", "label")


def fit_baselines(cases: pd.DataFrame, features: DeepFeatures | None, clinical_columns: Sequence[str],
                  config: BaselineConfig = BaselineConfig()) -> BaselineResult:
    """Fit on `split == "train"` rows; predict every row.

    cases: one row per case with CASE_COLUMNS and the clinical columns; features: deep features of
    every case (rows aligned with `cases`) with the cases each extractor was trained on, or None to
    fit the clinical model only. mRMR, the LASSO and the combined model are fitted on features of
    training cases from extractors not trained on them; every case is scored through the extractors
    not trained on it, their probabilities averaged. With no usable clinical variable (none given, or
    none varies in training) only the deep-feature model is fitted, and `summary["skipped"]` says why
    the clinical and combined models are not.
    """
    missing = [c for c in (*CASE_COLUMNS, *clinical_columns) if c not in cases.columns]
    if missing:
        raise ValueError(f"baseline cases table lacks column(s) {', '.join(missing)}")
    if features is not None and not isinstance(features, DeepFeatures):
        raise TypeError("features must be DeepFeatures (which cases each extractor was trained on), e.g. "
                        "DeepFeatures.frozen(matrix, how) for an extractor that saw none of them")
    if features is not None and len(features) != len(cases):
        raise ValueError(f"{len(features)} feature rows for {len(cases)} cases; they must align row by row")
    train = (cases.split == "train").to_numpy()
    y = cases.label.to_numpy()
    if train.sum() == 0:
        raise ValueError("no training rows (split == 'train') to fit the baselines on")

    probs, summary, params = {}, {}, {}
    try:
        clinical = ClinicalModel(config.screen_p, config.keep_p).fit(cases[train], y[train], clinical_columns)
    except NoClinicalVariable as err:
        if features is None:
            raise
        clinical = None  # the deep-feature model needs no clinical data; the other two are left out
        summary["skipped"] = {"clinical": str(err), "combined": f"{err} (it combines the clinical model)"}
    if clinical is not None:
        probs["clinical"] = clinical.predict_proba(cases)
        summary["clinical"] = clinical.summary()
        params["clinical"] = clinical.n_params
    if features is not None:
        train_x = features.unseen(train)  # out-of-fit features only: selection never sees memorised ones
        deep = DeepFeatureModel(config.n_mrmr, config.seed).fit(train_x, y[train])
        probs["deep_features"] = features.averaged(deep.predict_proba)
        summary["deep_features"] = {**deep.summary(), "features": features.how, "extractors": len(features.matrices)}
        params["deep_features"] = deep.n_params
        if clinical is not None:
            combined = CombinedModel(config.seed).fit(deep, clinical, train_x, cases[train], y[train])
            probs["combined"] = features.averaged(lambda x: combined.predict_proba(deep, clinical, x, cases))
            summary["combined"] = combined.summary()
            params["combined"] = combined.n_params

    base = cases.loc[:, list(CASE_COLUMNS)].reset_index(drop=True)
    frames = [base.assign(model=name, prob=p) for name, p in probs.items()]
    return BaselineResult(pd.concat(frames, ignore_index=True), summary, params)
