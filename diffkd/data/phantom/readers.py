"""Simulated radiologist reads: a senior and a junior reader per center.

Readers see the images, not the hidden truth: their suspicion is the reference score
(`clinical.imaging_suspicion`, a hand-weighted score of the drawn features, the same one BI-RADS is
built from) plus reader noise, larger for
the junior reader, who also over-calls. With the noise levels below the readers' AUCs on the phantom
land near the published radiologist range for upgrade prediction (0.54-0.68; docs/design.md), senior
above junior.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtri

from diffkd.data.phantom.clinical import BIRADS_RATES

READER_COLUMNS = ("reader", "experience", "case_id", "birads", "probability", "call")


@dataclass(frozen=True)
class ReaderProfile:
    experience: str
    noise: float  # reader noise, in units of the reference score
    overcall: float  # shifts the BI-RADS distribution up (juniors call more 4c/5)


READERS = (ReaderProfile("senior", 0.55, 0.0), ReaderProfile("junior", 1.4, 0.35))


def simulate_readers(truth: pd.DataFrame, seed: int, readers: tuple[ReaderProfile, ...] = READERS) -> pd.DataFrame:
    """One row per (reader, case). `truth` needs `center`, `case_id` and `reference_score` columns.

    `birads` is the reader's category, `probability` the reader's stated chance of the positive class
    and `call` 1 when the reader calls it positive (BI-RADS 4c or 5).
    """
    levels = np.asarray(list(BIRADS_RATES), dtype=object)
    rows = []
    for ci, center in enumerate(pd.unique(truth["center"])):
        cases = truth[truth["center"] == center]
        for ri, reader in enumerate(readers):
            rng = np.random.default_rng([seed, 7070, ci, ri])
            score = cases["reference_score"].to_numpy(float) + reader.noise * rng.standard_normal(len(cases))
            z = (score - score.mean()) / (score.std() + 1e-9) + reader.overcall
            birads = levels[np.searchsorted(ndtri(np.cumsum(list(BIRADS_RATES.values()))[:-1]), z)]
            probability = 1.0 / (1.0 + np.exp(-(-1.1 + 0.9 * z)))
            rows.append(pd.DataFrame({
                "reader": f"{center}_{reader.experience}", "experience": reader.experience,
                "case_id": cases["case_id"].to_numpy(), "birads": birads,
                "probability": np.round(probability, 3), "call": np.isin(birads, ["4c", "5"]).astype(int),
            }))
    return pd.concat(rows, ignore_index=True)[list(READER_COLUMNS)] if rows else pd.DataFrame(columns=READER_COLUMNS)
