"""A synthetic cohort's hidden truth, joined to the predictions for the report's ceilings.

The phantom (`diffkd phantom`) writes `truth.csv` beside its centers: per case the probability of an
upgrade that generated the label (`label_probability`), the probability of it given what the renderer
draws into the images (`image_probability`, diffkd.data.phantom.ceiling) and a hand-weighted suspicion
score of the drawn features (`reference_score`, what the simulated readers see). On a center's cases:

- Bayes AUC (`label_probability`): the best any model could do with everything the generator knew;
- image ceiling AUC (`image_probability`): the best any image-only model could do (its ROC curve
  lies above every image-only score's);
- reference score AUC (`reference_score`): a radiologist-like linear score, neither ceiling; shown
  when the file has it.

Only the report reads this file (`report.write_report`); no training stage receives its path.
truth.csv names cases by the ids the phantom wrote (center + raw case id); ingest stores salted
pseudonyms of them, so the join goes through the dataset's pseudonymizer. A truth file that already
holds the stored ids (any dataset whose own truth the user exports) joins directly.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import pandas as pd

from diffkd.data.ingest import pseudonymizer_for
from diffkd.evaluate.metrics import CIOptions, auc_with_ci

log = logging.getLogger(__name__)

TRUTH_COLUMNS = ("case_id", "label_probability", "image_probability")
OPTIONAL_COLUMNS = ("reference_score",)
SCORES = {"bayes": "label_probability", "image": "image_probability", "reference": "reference_score"}


class TruthError(ValueError):
    """A truth file that cannot be read or joined; the message names the file and what to do."""


def load_truth(path: str | os.PathLike, case_ids: Sequence[str], dataset: str | None = None) -> pd.DataFrame:
    """truth.csv as `case_id` (the stored ids of `case_ids`), `label`, `label_probability`, `image_probability`
    (and `reference_score` where the file has it).

    `dataset` (a diffkd dataset folder) maps the phantom's raw case ids to the pseudonyms ingest
    stored; it is needed unless the file already holds those ids.
    """
    try:
        raw = pd.read_csv(path, dtype={"case_id": str, "center": str})
    except FileNotFoundError:
        raise TruthError(f"truth file {path} does not exist (the phantom writes it as OUT/truth.csv)") from None
    missing = [c for c in TRUTH_COLUMNS if c not in raw.columns]
    if missing:
        older = " (a truth file from an older phantom: generate the cohort again)" if "visible_score" in raw else ""
        raise TruthError(f"{path}: missing column(s) {', '.join(missing)}; a truth file needs "
                         f"{', '.join(TRUTH_COLUMNS)} (and center, to map the phantom's case ids){older}")
    known = set(map(str, case_ids))
    truth = raw.copy()
    if not truth["case_id"].isin(known).any():
        truth["case_id"] = _stored_ids(truth, path, dataset)
    joined = truth[truth["case_id"].isin(known)]
    if joined.empty:
        raise TruthError(f"{path}: none of its {len(truth)} cases is among the {len(known)} predicted cases; "
                         "give the truth.csv of the phantom this dataset was ingested from")
    scores = [c for c in (*TRUTH_COLUMNS[1:], *OPTIONAL_COLUMNS) if c in joined.columns]
    for column in scores:
        values = pd.to_numeric(joined[column], errors="coerce")
        if values.isna().any():
            row = int(values.index[values.isna()][0])
            raise TruthError(f"{path}: row {row + 2} (case {raw.loc[row, 'case_id']!r}), column {column!r} is "
                             f"{raw.loc[row, column]!r}; need a number")
    unmatched = len(known - set(joined["case_id"]))
    if unmatched:
        log.warning("%s: %d predicted case(s) have no truth row; the ceilings use the other %d", path, unmatched,
                    len(known) - unmatched)
    columns = [c for c in ("case_id", "label", *scores) if c in joined.columns]
    return joined[columns].astype({c: float for c in scores}).reset_index(drop=True)


def center_ceilings(predictions: pd.DataFrame, truth: pd.DataFrame, reference: str,
                    options: CIOptions = CIOptions()) -> dict[str, dict]:
    """Per center: the Bayes, image-ceiling (and reference-score) AUCs on the cases the models are evaluated
    on there.

    predictions: validated predictions (summary.validate_predictions); truth: load_truth(...). The
    cases are the center's evaluated ones (internal validation or external test) that `reference`
    scored, as its per-center AUC is, or every model's evaluated cases where `reference` scored none.
    """
    evaluated = predictions[predictions.split.isin(("val", "test"))]
    columns = [c for c in ("case_id", "label", *TRUTH_COLUMNS[1:], *OPTIONAL_COLUMNS) if c in truth.columns]
    with_truth = evaluated.merge(truth[columns].rename(columns={"label": "truth_label"}), on="case_id", how="inner")
    if "truth_label" in with_truth.columns:
        wrong = with_truth[pd.to_numeric(with_truth.truth_label) != with_truth.label]
        if len(wrong):
            raise TruthError(f"case {wrong.case_id.iloc[0]!r}: label {int(wrong.label.iloc[0])} in the predictions "
                             f"but {wrong.truth_label.iloc[0]} in the truth file; it belongs to another cohort")
    out: dict[str, dict] = {}
    for center, part in with_truth.groupby("center", sort=True):
        scored = part[part.model == reference]
        cases_of = reference if len(scored) else "all models"
        cases = (scored if len(scored) else part).drop_duplicates("case_id")
        y = cases.label.to_numpy()
        entry: dict = {"n": len(cases), "n_pos": int(y.sum()), "cases_of": cases_of,
                       "split": "+".join(sorted(cases.split.unique()))}
        if 0 < y.sum() < len(y):
            groups, strata = cases.patient_id.to_numpy(), cases.center.to_numpy()
            for name, column in SCORES.items():
                if column not in cases:
                    continue
                est = auc_with_ci(y, cases[column].to_numpy(), options, groups=groups, strata=strata)
                entry.update({f"{name}_auc": est.auc, f"{name}_auc_ci": list(est.ci)})
        else:
            entry.update(bayes_auc=None, image_auc=None, note="one class only: AUC undefined")
        out[center] = entry
    return out


def _stored_ids(truth: pd.DataFrame, path: str | os.PathLike, dataset: str | None) -> list[str]:
    if "center" not in truth.columns:
        raise TruthError(f"{path}: its case ids are not the dataset's and it has no center column to map them "
                         "with (ingest names a case by center and raw id)")
    if not dataset:
        raise TruthError(f"{path}: its case ids are the phantom's raw ids; give the dataset they were ingested "
                         "into (diffkd report --dataset DS) so they can be mapped to the stored pseudonyms")
    pseudo = pseudonymizer_for(dataset)
    return [pseudo.case(center, raw) for center, raw in zip(truth["center"], truth["case_id"])]
