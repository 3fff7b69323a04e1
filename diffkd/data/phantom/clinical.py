"""The latent case model: who is upgraded, and what that does to the images and the clinical record.

Every case has a hidden aggressiveness `a ~ N(shift, 1)`. The label and every observable feature are
separate noisy read-outs of it: for feature k, a standard-normal latent
`f_k = r_k * a + sqrt(1 - r_k^2) * e_k`, cut at fixed quantiles into the published category rates.
The label is the same kind of read-out, `upgrade = f_label > Phi^-1(1 - 0.26)`, so no feature decides
it and every feature overlaps between the classes (docs/design.md "The phantom is hard on purpose": single US
descriptors are weak; size, BI-RADS 4c/5, mass, palpable, suspicious node, high grade are stronger).

`difficulty` d rescales all couplings at once, r(d) = r / sqrt(r^2 + d^2 (1 - r^2)): d = 1 gives the
couplings below, d -> 0 makes everything a deterministic function of `a`, large d drives every AUC
to 0.5. Marginal rates do not depend on d (each latent stays standard normal).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

UPGRADE_RATE = 0.26

# Correlation of each feature latent with the aggressiveness at difficulty 1. Chosen so that the
# univariate odds ratios land near the published ones (tests/data/test_phantom.py pins the directions and
# the oracle AUC), never to favour any model.
COUPLING: dict[str, float] = {
    "label": 0.93,
    "size": 0.40,
    "grade": 0.33,
    "type": 0.33,
    "margin": 0.20,
    "orientation": 0.12,
    "posterior": 0.20,
    "calcs": 0.12,
    "palpable": 0.25,
    "node": 0.70,
    "vascularity": 0.70,
    "age": 0.05,
}

# Ordered from least to most aggressive, with their rates among DCIS cases (docs/design.md).
LESION_TYPE_RATES = {"not_visible": 0.07, "calcification": 0.13, "non_mass": 0.30, "mass": 0.50}
MARGIN_RATES = {"circumscribed": 0.20, "microlobulated": 0.25, "indistinct": 0.25, "angular": 0.15,
                "spiculated": 0.15}
POSTERIOR_RATES = {"enhancement": 0.25, "none": 0.60, "shadowing": 0.15}
GRADE_RATES = {1: 0.20, 2: 0.45, 3: 0.35}
VASCULARITY_RATES = {0: 0.30, 1: 0.30, 2: 0.25, 3: 0.15}  # Adler grade on Doppler
BIRADS_RATES = {"3": 0.03, "4a": 0.25, "4b": 0.30, "4c": 0.26, "5": 0.16}
CALCS_RATE = 0.60  # microcalcifications on any imaging (mammography sees most)
CALCS_US_VISIBLE = 0.60  # of those, visible as echogenic foci on US: 0.6 * 0.6 ~ 37% overall
PALPABLE_RATE = 0.20
NODE_RATE = 0.05
TALLER_THAN_WIDE_RATE = 0.15
HALO_RATE = {"indistinct": 0.7, "spiculated": 0.3, "angular": 0.2}

# Share of each clinical column left empty in the CSV (before the center's own scale).
MISSING_RATES = {"age": 0.01, "lesion_size_mm": 0.04, "birads": 0.03, "lesion_type": 0.01, "palpable": 0.08,
                 "axillary_node_suspicious": 0.10, "nuclear_grade": 0.12, "microcalcifications": 0.05}


@dataclass(frozen=True)
class CaseMix:
    """How one center's patients differ from the pooled population (referral pattern, age, habits)."""

    aggressiveness_shift: float = 0.0  # + : a referral center that sees larger, more invasive lesions
    type_shift: float = 0.0  # + : more masses, - : more calcifications / not visible (screening-heavy)
    size_scale: float = 1.0  # multiplies lesion sizes
    age_mean: float = 56.0
    views: tuple[float, float, float] = (0.30, 0.45, 0.25)  # P(1, 2, 3 images per patient)
    missing_scale: float = 1.0
    node_missing: float | None = None  # overrides the node-status missing rate (some centers rarely record it)


def effective_coupling(r: float, difficulty: float) -> float:
    """Coupling r at difficulty 1, rescaled for another difficulty (see the module docstring)."""
    if difficulty <= 0:
        return 1.0
    return r / np.sqrt(r * r + difficulty * difficulty * (1.0 - r * r))


def coupling(name: str, difficulty: float) -> float:
    return effective_coupling(COUPLING[name], difficulty)


def readout(a: np.ndarray, r: float, rng: np.random.Generator) -> np.ndarray:
    """A standard-normal latent with correlation r to the (standardised) aggressiveness a."""
    return r * a + np.sqrt(max(1.0 - r * r, 0.0)) * rng.standard_normal(a.shape)


def cut(latent: np.ndarray, rates: dict, shift: float = 0.0) -> np.ndarray:
    """Map a standard-normal latent onto ordered categories with the given rates (object array)."""
    levels = list(rates)
    edges = ndtri(np.cumsum([rates[k] for k in levels])[:-1])
    idx = np.searchsorted(edges, latent + shift)
    return np.asarray(levels, dtype=object)[idx]


def imaging_suspicion(df: pd.DataFrame, calcs_column: str = "calcs") -> np.ndarray:
    """How suspicious the imaging looks to a radiologist: built from what is visible, never from the label."""
    margin_rank = df["margin"].map({m: i for i, m in enumerate(MARGIN_RATES)}).fillna(2.0).to_numpy(float)
    return (
        0.45 * (margin_rank - 1.8)
        + 0.8 * (df["posterior"] == "shadowing") - 0.2 * (df["posterior"] == "enhancement")
        + 0.5 * df["taller_than_wide"] + 0.3 * df["halo"]
        + 0.9 * np.log(df["size_mm"] / 14.0)
        + 0.5 * df[calcs_column]
        + 0.4 * (df["lesion_type"] == "mass") - 0.6 * (df["lesion_type"] == "not_visible")
    ).to_numpy(float)


def _birads_score(df: pd.DataFrame, rng: np.random.Generator, noise: float) -> np.ndarray:
    """The reporting radiologist's suspicion: the imaging plus the clinical findings she knows of."""
    score = imaging_suspicion(df) + 0.5 * df["palpable"].to_numpy(float) + 0.8 * df["node"].to_numpy(float)
    return score + noise * rng.standard_normal(len(df))


@lru_cache(maxsize=None)
def _birads_edges(noise: float) -> tuple[float, ...]:
    """Score cut points that give BIRADS_RATES in the pooled population (fixed reference sample)."""
    ref = sample_latent_cases(200_000, CaseMix(), np.random.default_rng(20240611), 1.0, with_birads=False)
    score = _birads_score(ref, np.random.default_rng(7), noise)
    return tuple(np.quantile(score, np.cumsum(list(BIRADS_RATES.values()))[:-1]))


BIRADS_NOISE = 0.9


def sample_latent_cases(n: int, mix: CaseMix, rng: np.random.Generator, difficulty: float = 1.0,
                        with_birads: bool = True) -> pd.DataFrame:
    """Draw n cases: the hidden truth (one row per patient/lesion), before any image is rendered.

    Columns: aggressiveness, label (0/1), label_probability, lesion_type, margin (masses only, else None), posterior,
    taller_than_wide, halo, calcs, calcs_on_us, size_mm (largest 3-D diameter), palpable, node, grade,
    vascularity, age, birads, n_views.
    """
    if n < 0:
        raise ValueError(f"number of cases must be >= 0, got {n}")
    d = float(difficulty)
    if d < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    a = mix.aggressiveness_shift + rng.standard_normal(n)
    read = {k: readout(a, coupling(k, d), rng) for k in COUPLING}

    threshold = ndtri(1.0 - UPGRADE_RATE)
    label = (read["label"] > threshold).astype(np.int8)
    r_label = coupling("label", d)
    # P(upgrade | aggressiveness): the Bayes ceiling for anything that could see `a` exactly
    label_probability = 1.0 - ndtr((threshold - r_label * a) / max(np.sqrt(1.0 - r_label ** 2), 1e-9))
    lesion_type = cut(read["type"], LESION_TYPE_RATES, mix.type_shift)
    is_mass = lesion_type == "mass"
    margin = np.where(is_mass, cut(read["margin"], MARGIN_RATES), None)
    posterior = cut(read["posterior"], POSTERIOR_RATES)
    posterior = np.where(np.isin(lesion_type, ["not_visible", "calcification"]), "none", posterior)
    posterior = np.where((lesion_type == "non_mass") & (posterior == "enhancement"), "none", posterior)
    size_mm = np.clip(14.0 * mix.size_scale * np.exp(0.45 * read["size"]), 4.0, 38.0)
    taller = is_mass & (read["orientation"] > ndtri(1 - TALLER_THAN_WIDE_RATE)) & (size_mm < 20)
    halo_p = np.array([HALO_RATE.get(m, 0.0) if m is not None else 0.0 for m in margin])
    halo = rng.random(n) < halo_p
    calcs = (read["calcs"] > ndtri(1 - CALCS_RATE)) | (lesion_type == "calcification")
    calcs_on_us = calcs & ((rng.random(n) < CALCS_US_VISIBLE) | (lesion_type == "calcification"))
    calcs_on_us &= lesion_type != "not_visible"
    # palpability also follows size: big lesions are felt more often
    size_z = (np.log(size_mm / (14.0 * mix.size_scale))) / 0.45
    palp_latent = (0.8 * read["palpable"] + 0.6 * size_z) / np.sqrt(1.0 + 0.96 * coupling("size", d) * coupling("palpable", d))
    palpable = palp_latent > ndtri(1 - PALPABLE_RATE)
    node = read["node"] > ndtri(1 - NODE_RATE)
    grade = cut(read["grade"], GRADE_RATES).astype(int)
    vascularity = cut(read["vascularity"], VASCULARITY_RATES).astype(int)
    age = np.clip(mix.age_mean + 11.0 * read["age"], 25, 92).round(0)
    n_views = rng.choice(3, size=n, p=np.asarray(mix.views) / np.sum(mix.views)) + 1

    df = pd.DataFrame({
        "aggressiveness": a, "label": label, "label_probability": label_probability, "lesion_type": lesion_type, "margin": margin,
        "posterior": posterior, "taller_than_wide": taller, "halo": halo, "calcs": calcs,
        "calcs_on_us": calcs_on_us, "size_mm": size_mm, "palpable": palpable, "node": node,
        "grade": grade, "vascularity": vascularity, "age": age, "n_views": n_views,
    })
    if with_birads:
        score = _birads_score(df, rng, BIRADS_NOISE)
        df["birads"] = np.asarray(list(BIRADS_RATES), dtype=object)[np.searchsorted(_birads_edges(BIRADS_NOISE),
                                                                                     score)]
    return df


def missing_mask(n: int, mix: CaseMix, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Which clinical values a center's records leave empty (True = missing)."""
    out = {}
    for name, rate in MISSING_RATES.items():
        p = rate * mix.missing_scale
        if name == "axillary_node_suspicious" and mix.node_missing is not None:
            p = mix.node_missing
        out[name] = rng.random(n) < min(p, 0.95)
    return out


def oracle_features(df: pd.DataFrame) -> np.ndarray:
    """The true latent features as a design matrix (what an oracle logistic regression would see)."""
    cols = [
        np.log(df["size_mm"].to_numpy(float)),
        *(np.asarray(df["lesion_type"] == t, float) for t in ("non_mass", "calcification", "not_visible")),
        *(np.asarray(df["margin"] == m, float) for m in ("microlobulated", "indistinct", "angular", "spiculated")),
        *(np.asarray(df["posterior"] == p, float) for p in ("enhancement", "shadowing")),
        df["taller_than_wide"].to_numpy(float), df["halo"].to_numpy(float), df["calcs"].to_numpy(float),
        df["palpable"].to_numpy(float), df["node"].to_numpy(float),
        np.asarray(df["grade"] == 2, float), np.asarray(df["grade"] == 3, float),
        *(np.asarray(df["vascularity"] == v, float) for v in (1, 2, 3)),
        df["age"].to_numpy(float) / 10.0,
    ]
    return np.column_stack(cols)
