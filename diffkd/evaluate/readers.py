"""Radiologist reads: import, operating points, McNemar comparisons with a model, and reader AUCs.

A readers CSV has one row per (reader, case): `reader`, `experience` (e.g. senior / junior),
`case_id`, and at least one of `call` (0/1, yes/no, upgrade/DCIS), `probability` (0-1) or `birads`.
Each row's call is read from the first of those that is filled in: a call as given, a probability as
positive at >= `probability_threshold`, a BI-RADS category as positive from `birads_positive_from` up.
A reader whose every read also carries a score (the BI-RADS category as an ordinal number, else the
probability) gets an AUC of its own, set beside every model's on the same cases (`reader_aucs`).

A dataset whose cases carry the clinical `birads` column brings its own reader: the radiologists'
BI-RADS category recorded with each image (`dataset_birads_reads`), so a cohort such as BUS-BRA is
compared with its radiologists without a separate readers CSV.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from diffkd.data.schema import BIRADS_LEVELS, DEFAULT_LABEL_NAMES, birads_rank, label_aliases, normalize_birads
from diffkd.evaluate.metrics import CIOptions, OperatingPoint, auc_with_ci, paired_auc_test

REQUIRED_COLUMNS = ("reader", "experience", "case_id")
VALUE_COLUMNS = ("call", "probability", "birads")  # precedence when a row fills several
_CALL_WORDS = {**label_aliases(), "true": 1, "false": 0, "malignant": 1, "benign": 0}
EXACT_BELOW = 25  # discordant pairs under this use the exact mid-p McNemar test
DATASET_READER = "BI-RADS (dataset)"  # the reader made of the dataset's own `birads` column
READ_COLUMNS = ["reader", "experience", "case_id", "call", "basis", "birads", "probability"]


def birads_positive_from_default(label_names: Sequence[str]) -> str:
    """The BI-RADS category from which a read counts as positive, when the config names none: 4c for the
    DCIS-upgrade question (every lesion there was biopsied, so 4a, the biopsy cut, separates nothing),
    else 4a, the lexicon's own cut (category 4 or 5: biopsy recommended)."""
    return "4c" if tuple(label_names) == DEFAULT_LABEL_NAMES else "4a"


class ReadersError(ValueError):
    """A readers table that cannot be used; the message names the file, line and column."""


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == ""


def load_readers(source: str | Path | pd.DataFrame, *, birads_positive_from: str = "4c",
                 probability_threshold: float = 0.5) -> pd.DataFrame:
    """Read and validate reads; returns reader, experience, case_id, call (0/1), basis, and the read's
    BI-RADS level and probability where given (for `reader_aucs`)."""
    if birads_positive_from not in BIRADS_LEVELS:
        raise ValueError(f"birads_positive_from={birads_positive_from!r}; choose one of {', '.join(BIRADS_LEVELS)}")
    if isinstance(source, pd.DataFrame):
        raw, name, first_line = source.copy(), "readers table", 2
    else:
        name, first_line = str(source), 2  # line 1 is the header
        try:
            raw = pd.read_csv(source, dtype=str, keep_default_na=False)
        except FileNotFoundError:
            raise ReadersError(f"readers file {name} does not exist") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ReadersError(f"{name}: not a readable CSV ({err})") from err
    raw.columns = [str(c).strip().lower() for c in raw.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise ReadersError(f"{name}: missing column(s) {', '.join(missing)}; a readers CSV needs "
                           f"{', '.join(REQUIRED_COLUMNS)} and one of {', '.join(VALUE_COLUMNS)}")
    value_columns = [c for c in VALUE_COLUMNS if c in raw.columns]
    if not value_columns:
        raise ReadersError(f"{name}: no read column; add one of {', '.join(VALUE_COLUMNS)}")
    threshold_rank = BIRADS_LEVELS.index(birads_positive_from)

    rows = []
    for i, rec in enumerate(raw.to_dict("records")):
        where = f"{name}, line {i + first_line}"
        for col in REQUIRED_COLUMNS:
            if _blank(rec[col]):
                raise ReadersError(f"{where}: column '{col}' is empty")
        values: dict[str, object] = {}  # every filled value column is checked, the first one decides the call
        for col in value_columns:
            value = rec[col]
            if _blank(value):
                continue
            text = str(value).strip().lower()
            if col == "call":
                if text.endswith(".0"):
                    text = text[:-2]
                if text not in _CALL_WORDS:
                    raise ReadersError(f"{where}, column 'call': {value!r} is not a call; use 0/1, yes/no "
                                       "or upgrade/DCIS")
                values[col] = _CALL_WORDS[text]
            elif col == "probability":
                try:
                    prob = float(text)
                except ValueError:
                    prob = math.nan
                if not 0 <= prob <= 1:
                    raise ReadersError(f"{where}, column 'probability': {value!r} is not a probability in [0, 1]")
                values[col] = prob
            else:
                try:
                    level = normalize_birads(value)
                except ValueError as err:
                    raise ReadersError(f"{where}, column 'birads': {err}") from None
                if level is not None:
                    values[col] = level
        if not values:
            raise ReadersError(f"{where}: none of {', '.join(value_columns)} is filled in")
        basis = next(col for col in VALUE_COLUMNS if col in values)
        call = {"call": lambda v: v, "probability": lambda v: int(v >= probability_threshold),
                "birads": lambda v: int(BIRADS_LEVELS.index(v) >= threshold_rank)}[basis](values[basis])
        rows.append({"reader": str(rec["reader"]).strip(), "experience": str(rec["experience"]).strip().lower(),
                     "case_id": str(rec["case_id"]).strip(), "call": call, "basis": basis,
                     "birads": values.get("birads"), "probability": values.get("probability", math.nan),
                     "line": i + first_line})
    reads = pd.DataFrame(rows, columns=[*READ_COLUMNS, "line"])
    if reads.empty:
        raise ReadersError(f"{name}: no reads")
    dup = reads[reads.duplicated(["reader", "case_id"], keep=False)]
    if not dup.empty:
        first = dup.iloc[0]
        lines = dup[(dup.reader == first.reader) & (dup.case_id == first.case_id)].line.tolist()
        raise ReadersError(f"{name}: reader {first.reader!r} read case {first.case_id!r} more than once "
                           f"(lines {', '.join(map(str, lines))})")
    levels = reads.groupby("reader")["experience"].nunique()
    if (levels > 1).any():
        reader = levels[levels > 1].index[0]
        raise ReadersError(f"{name}: reader {reader!r} has several experience levels "
                           f"({', '.join(sorted(reads[reads.reader == reader].experience.unique()))})")
    reads["call"] = reads["call"].astype(np.int8)
    return reads.drop(columns="line")


@dataclass(frozen=True)
class McNemar:
    """Paired comparison of two classifiers' correctness on the same cases."""

    model_only: int  # cases the model got right and the reader wrong
    reader_only: int  # cases the reader got right and the model wrong
    p: float
    method: str  # "exact mid-p" | "chi-square (continuity-corrected)" | "no discordant pairs"


def mcnemar(model_correct: Sequence[bool], reader_correct: Sequence[bool]) -> McNemar:
    """Two-sided McNemar test: exact mid-p for fewer than 25 discordant pairs, else chi-square with
    continuity correction (Fagerland et al. 2013 recommend mid-p for small samples)."""
    a, b = np.asarray(model_correct, dtype=bool), np.asarray(reader_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError("model and reader results must cover the same cases")
    m_only, r_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    discordant = m_only + r_only
    if discordant == 0:
        return McNemar(m_only, r_only, 1.0, "no discordant pairs")
    if discordant < EXACT_BELOW:
        k = min(m_only, r_only)
        # mid-p = exact two-sided p minus the probability of the observed table (cap only at the end)
        mid_p = 2 * stats.binom.cdf(k, discordant, 0.5) - stats.binom.pmf(k, discordant, 0.5)
        return McNemar(m_only, r_only, float(min(1.0, mid_p)), "exact mid-p")
    chi2 = (abs(m_only - r_only) - 1) ** 2 / discordant
    return McNemar(m_only, r_only, float(stats.chi2.sf(chi2, 1)), "chi-square (continuity-corrected)")


COHORTS = {"val": "internal", "test": "external"}


def _reads_with_truth(reads: pd.DataFrame, cases: pd.DataFrame) -> pd.DataFrame:
    """Join reads to the one-row-per-case table (case_id, split, label); unknown cases are an error."""
    unknown = sorted(set(reads.case_id) - set(cases.case_id))
    if unknown:
        raise ReadersError(f"readers table names {len(unknown)} case(s) absent from the predictions, "
                           f"e.g. {', '.join(unknown[:5])}; check the case ids")
    return reads.merge(cases[["case_id", "split", "label"]], on="case_id", how="inner")


def reader_operating_points(reads: pd.DataFrame, cases: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per reader and cohort (internal = val cases, external = test cases they read)."""
    joined = _reads_with_truth(reads, cases)
    rows = []
    for (reader, split), frame in joined[joined.split.isin(COHORTS)].groupby(["reader", "split"], sort=True):
        op = OperatingPoint.from_calls(frame.label.to_numpy(), frame.call.to_numpy(), level=level)
        rows.append({"reader": reader, "experience": frame.experience.iloc[0], "cohort": COHORTS[split],
                     "n": op.n, "basis": ",".join(sorted(frame.basis.unique())), **op.as_dict()})
    return pd.DataFrame(rows)


def compare_readers(reads: pd.DataFrame, model_predictions: pd.DataFrame, threshold: float,
                    level: float = 0.95) -> list[dict]:
    """Each reader vs one model at its fixed threshold on exactly the cases both saw, per cohort:
    sensitivity (McNemar on the positives) and specificity (McNemar on the negatives)."""
    cases = model_predictions[["case_id", "split", "label", "prob"]]
    joined = _reads_with_truth(reads, cases).merge(cases[["case_id", "prob"]], on="case_id")
    out = []
    for (reader, split), frame in joined[joined.split.isin(COHORTS)].groupby(["reader", "split"], sort=True):
        y = frame.label.to_numpy().astype(bool)
        model_call = frame.prob.to_numpy() >= threshold
        reader_call = frame.call.to_numpy().astype(bool)
        model_op = OperatingPoint.from_calls(y, model_call, threshold, level).as_dict()
        reader_op = OperatingPoint.from_calls(y, reader_call, None, level).as_dict()
        sens = mcnemar(model_call[y], reader_call[y])
        spec = mcnemar(~model_call[~y], ~reader_call[~y])
        out.append({
            "reader": reader, "experience": frame.experience.iloc[0], "cohort": COHORTS[split], "n": len(frame),
            **{f"reader_{k}": reader_op[k] for k in ("sensitivity", "sensitivity_ci", "specificity", "specificity_ci")},
            **{f"model_{k}": model_op[k] for k in ("sensitivity", "specificity")},
            "p_sensitivity": sens.p, "test_sensitivity": sens.method,
            "discordant_sensitivity": [sens.model_only, sens.reader_only],
            "p_specificity": spec.p, "test_specificity": spec.method,
            "discordant_specificity": [spec.model_only, spec.reader_only],
        })
    return out


def dataset_birads_reads(cases: pd.DataFrame) -> pd.DataFrame | None:
    """The dataset's `birads` column as one reader's reads (readers CSV format), or None when no case has one.

    `cases`: case_id and birads (one row per image is fine: a case's images agree on clinical values).
    """
    known = cases.loc[cases["birads"].notna(), ["case_id", "birads"]].drop_duplicates("case_id")
    if known.empty:
        return None
    return pd.DataFrame({"reader": DATASET_READER, "experience": "clinical report",
                         "case_id": known["case_id"].astype(str).to_numpy(), "birads": known["birads"].to_numpy()})


def read_scores(reads: pd.DataFrame) -> pd.Series:
    """Each read's score for an AUC: the BI-RADS category as an ordinal number (its rank in
    BIRADS_LEVELS: 2 < 3 < 4a < 4b < 4c < 5 < 6), else the probability; NaN for a bare call."""
    rank = reads["birads"].map(birads_rank).astype(float)
    return rank.fillna(reads["probability"].astype(float))


def reader_aucs(reads: pd.DataFrame, predictions: pd.DataFrame, options: CIOptions = CIOptions()) -> list[dict]:
    """Per reader whose every read has a score, and per cohort: the reader's AUC (CI) on the cases read,
    and each model's AUC minus the reader's on exactly the cases both scored (paired test: DeLong, or
    the patient-clustered bootstrap where a patient has several cases, the rule the models' comparisons use).

    predictions: one row per case and model (case_id, patient_id, center, split, label, model, prob).
    """
    cases = predictions.drop_duplicates("case_id")[["case_id", "patient_id", "center", "split", "label"]]
    scored = reads.assign(score=read_scores(reads))
    out = []
    for reader, mine in scored.groupby("reader", sort=True):
        if mine["score"].isna().any():
            continue  # bare calls: an operating point, no curve
        joined = _reads_with_truth(mine, cases).merge(cases[["case_id", "patient_id", "center"]], on="case_id")
        for split, frame in joined[joined.split.isin(COHORTS)].groupby("split", sort=True):
            y = frame.label.to_numpy()
            entry = {"reader": reader, "experience": frame.experience.iloc[0], "cohort": COHORTS[split],
                     "n": len(frame), "basis": "birads" if frame["birads"].notna().all() else "probability"}
            if y.min() == y.max():
                out.append({**entry, "auc": None, "auc_ci": [None, None], "note": "one class only: AUC undefined"})
                continue
            est = auc_with_ci(y, frame.score.to_numpy(), options, groups=frame.patient_id.to_numpy(),
                              strata=frame.center.to_numpy())
            entry.update(auc=est.auc, auc_ci=list(est.ci), auc_ci_method=est.method, models=[])
            for model, preds in predictions[predictions.split == split].groupby("model", sort=True):
                both = frame.merge(preds[["case_id", "prob"]], on="case_id")
                if both.label.nunique() < 2:
                    continue
                test = paired_auc_test(both.label.to_numpy(), both.prob.to_numpy(), both.score.to_numpy(), options,
                                       groups=both.patient_id.to_numpy(), strata=both.center.to_numpy())
                entry["models"].append({"model": model, "n": len(both), "auc_model": test.auc_a,
                                        "auc_reader": test.auc_b, "difference": test.difference,
                                        "difference_ci": list(test.ci), "p": test.p, "method": test.method})
            out.append(entry)
    return out
