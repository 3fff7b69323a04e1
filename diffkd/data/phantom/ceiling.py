"""What an image-only model could reach at best: P(label | what the renderer draws), from the phantom's
own generative model.

A rendered image is a function of a case's drawn features (lesion type, size, margin, posterior
feature, orientation, halo, echogenic foci; Adler grade on Doppler; pattern, size and margin on a
mammogram) and of random numbers that do not depend on the label; the center's scanner shows which
center it is. So the label is independent of the image given those features and the center, and by
the Neyman-Pearson lemma no image-only score has an ROC curve above that of

    P(label = 1 | features, center) = E[ P(label = 1 | a) | features ]

(a: the hidden aggressiveness). Given `a` the features are independent read-outs (clinical.py), so
the posterior is an integral over one variable:

    P(label = 1 | x) = Int P(1 | a) p(x | a) p(a) da / Int p(x | a) p(a) da,

with p(x | a) a product of normal-CDF intervals (categories cut from a latent), one normal density
(the size, a monotone map of its latent) and Bernoulli terms. It is computed on a fine grid of `a`,
exactly up to that quadrature; no fitted model, no sample. Its AUC on a center's cases is the image
ceiling; the Bayes ceiling (`label_probability`, P(label | a)) knows `a` itself. The old hand-weighted
`reference_score` (a radiologist-like suspicion score, used by the simulated readers) is neither.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from diffkd.data.phantom import clinical, mammo
from diffkd.data.phantom.clinical import CaseMix

GRID = np.linspace(-8.0, 8.0, 801)  # standard-normal offsets of `a` the integral runs over
CHUNK = 2000  # cases per block: (CHUNK, len(GRID)) arrays stay a few tens of MB


def posterior(log_likelihood: np.ndarray, prior_log: np.ndarray, label_given_latent: np.ndarray) -> np.ndarray:
    """P(label = 1 | x) per case from log p(x | a) on a grid of `a` (cases x grid), log p(a) and P(1 | a)
    on the same grid (broadcastable): the normalised quadrature of the module docstring."""
    log_joint = log_likelihood + prior_log
    weights = np.exp(log_joint - log_joint.max(axis=1, keepdims=True))
    return np.sum(weights * label_given_latent, axis=1) / np.sum(weights, axis=1)


def _interval(lower: np.ndarray, upper: np.ndarray, a: np.ndarray, r: float) -> np.ndarray:
    """P(lower < r a + sqrt(1 - r^2) e <= upper), e ~ N(0, 1): a category cut from a read-out latent."""
    scale = max(np.sqrt(1.0 - r * r), 1e-9)
    return ndtr((upper[:, None] - r * a) / scale) - ndtr((lower[:, None] - r * a) / scale)


def _category_bounds(values: np.ndarray, rates: dict, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The latent interval each category of `values` came from (clinical.cut: latent + shift in (e_k-1, e_k])."""
    edges = np.r_[-np.inf, ndtri(np.cumsum(list(rates.values()))[:-1]), np.inf] - shift
    index = {level: i for i, level in enumerate(rates)}
    where = np.array([index[v] for v in values])
    return edges[where], edges[where + 1]


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(p, 1e-300))


def ultrasound_probability(cases: pd.DataFrame, mix: CaseMix, difficulty: float) -> np.ndarray:
    """P(upgrade | the drawn features) for cases of `clinical.sample_latent_cases` (one center's mix).

    Needs the columns lesion_type, margin, posterior, taller_than_wide, calcs_on_us, size_mm and, for
    Doppler cases (modality us_doppler), vascularity; halo follows the margin alone and adds nothing.
    """
    out = np.empty(len(cases))
    for start in range(0, len(cases), CHUNK):
        out[start:start + CHUNK] = _ultrasound_block(cases.iloc[start:start + CHUNK], mix, difficulty)
    return out


def _ultrasound_block(cases: pd.DataFrame, mix: CaseMix, d: float) -> np.ndarray:
    a = mix.aggressiveness_shift + GRID[None, :]
    r = {name: clinical.coupling(name, d) for name in clinical.COUPLING}
    kind = cases["lesion_type"].to_numpy(object)
    mass, non_mass = kind == "mass", kind == "non_mass"
    shown = kind != "not_visible"  # an invisible lesion draws nothing: no size, no features

    low, high = _category_bounds(kind, clinical.LESION_TYPE_RATES, mix.type_shift)
    log_lik = _log(_interval(low, high, a, r["type"]))

    margin = np.where(mass, cases["margin"].to_numpy(object), next(iter(clinical.MARGIN_RATES)))
    low, high = _category_bounds(margin, clinical.MARGIN_RATES)
    log_lik += np.where(mass[:, None], _log(_interval(low, high, a, r["margin"])), 0.0)

    # posterior: a category on masses; on non-mass lesions enhancement is drawn as none
    post = cases["posterior"].to_numpy(object)
    low, high = _category_bounds(post, clinical.POSTERIOR_RATES)
    low = np.where(non_mass & (post == "none"), -np.inf, low)
    log_lik += np.where((mass | non_mass)[:, None], _log(_interval(low, high, a, r["posterior"])), 0.0)

    # size: a monotone map of its latent, clipped to [4, 38] mm
    size = cases["size_mm"].to_numpy(float)
    latent = np.log(size / (14.0 * mix.size_scale)) / 0.45
    lowest, highest = np.log(4.0 / (14.0 * mix.size_scale)) / 0.45, np.log(38.0 / (14.0 * mix.size_scale)) / 0.45
    scale = np.sqrt(1.0 - r["size"] ** 2)
    density = -0.5 * ((latent[:, None] - r["size"] * a) / scale) ** 2
    at_low, at_high = size <= 4.0 + 1e-9, size >= 38.0 - 1e-9
    density = np.where(at_low[:, None], _log(ndtr((lowest - r["size"] * a) / scale)), density)
    density = np.where(at_high[:, None], _log(1.0 - ndtr((highest - r["size"] * a) / scale)), density)
    log_lik += np.where(shown[:, None], density, 0.0)

    # taller than wide: drawn only on masses under 20 mm
    oriented = mass & (size < 20)
    p_taller = 1.0 - ndtr((ndtri(1 - clinical.TALLER_THAN_WIDE_RATE) - r["orientation"] * a)
                          / np.sqrt(1.0 - r["orientation"] ** 2))
    taller = cases["taller_than_wide"].to_numpy(bool)[:, None]
    log_lik += np.where(oriented[:, None], _log(np.where(taller, p_taller, 1.0 - p_taller)), 0.0)

    # echogenic foci on masses and non-mass lesions: calcifications, seen on US with a fixed chance
    p_calcs = clinical.CALCS_US_VISIBLE * (1.0 - ndtr((ndtri(1 - clinical.CALCS_RATE) - r["calcs"] * a)
                                                       / np.sqrt(1.0 - r["calcs"] ** 2)))
    foci = cases["calcs_on_us"].to_numpy(bool)[:, None]
    log_lik += np.where((mass | non_mass)[:, None], _log(np.where(foci, p_calcs, 1.0 - p_calcs)), 0.0)

    if "modality" in cases and "vascularity" in cases:  # the Doppler overlay draws the Adler grade
        doppler = cases["modality"].to_numpy(object) == "us_doppler"
        grade = np.where(doppler, cases["vascularity"].to_numpy(), 0).astype(int)
        low, high = _category_bounds(grade, clinical.VASCULARITY_RATES)
        log_lik += np.where(doppler[:, None], _log(_interval(low, high, a, r["vascularity"])), 0.0)

    threshold, r_label = ndtri(1.0 - clinical.UPGRADE_RATE), r["label"]
    label_given_a = 1.0 - ndtr((threshold - r_label * a) / max(np.sqrt(1.0 - r_label ** 2), 1e-9))
    return posterior(log_lik, -0.5 * GRID[None, :] ** 2, label_given_a)


def mammo_probability(cases: pd.DataFrame, profile: "mammo.MammoProfile", difficulty: float) -> np.ndarray:
    """P(invasive | pattern, size, margin) for cases of `mammo.sample_cases` (one center's profile).

    There the label comes first and a = separation x label + N(0, 1); the posterior integrates over
    `a` under each label. A fine pleomorphic cluster is drawn with a mass by a coin that ignores the
    label, so the lesion type adds nothing beyond the pattern.
    """
    out = np.empty(len(cases))
    for start in range(0, len(cases), CHUNK):
        out[start:start + CHUNK] = _mammo_block(cases.iloc[start:start + CHUNK], profile, difficulty)
    return out


def _mammo_block(cases: pd.DataFrame, profile: "mammo.MammoProfile", difficulty: float) -> np.ndarray:
    sep = mammo.SEPARATION / max(difficulty, 1e-3)
    p = profile.idc / profile.patients
    a = sep * p + GRID * np.sqrt(1.0 + sep * sep * p * (1 - p))  # wide enough for both labels' a
    a = a[None, :]
    a_std = (a - sep * p) / np.sqrt(1.0 + sep * sep * p * (1 - p))
    r = {name: clinical.effective_coupling(value, difficulty) for name, value in mammo.COUPLING.items()}

    pattern = cases["pattern"].to_numpy(object)
    low, high = _category_bounds(pattern, mammo.PATTERN_RATES)
    log_lik = _log(_interval(low, high, a_std, r["pattern"]))

    is_mass = cases["lesion_type"].to_numpy(object) == "mass"
    spiculated = (cases["margin"].to_numpy(object) == "spiculated")[:, None]
    p_spiculated = 1.0 - ndtr(-r["spiculation"] * a_std / np.sqrt(1.0 - r["spiculation"] ** 2))
    log_lik += np.where(is_mass[:, None], _log(np.where(spiculated, p_spiculated, 1.0 - p_spiculated)), 0.0)

    size = cases["size_mm"].to_numpy(float)
    stretch = np.where(pattern == "fine_linear_branching", 1.3, 1.0)
    scale = np.sqrt(1.0 - r["size"] ** 2)
    latent = np.log(size / (15.0 * stretch)) / 0.35
    density = -0.5 * ((latent[:, None] - r["size"] * a_std) / scale) ** 2
    lowest, highest = np.log(5.0 / (15.0 * stretch)) / 0.35, np.log(26.0 / (15.0 * stretch)) / 0.35
    density = np.where((size <= 5.0 + 1e-9)[:, None], _log(ndtr((lowest[:, None] - r["size"] * a_std) / scale)),
                       density)
    density = np.where((size >= 26.0 - 1e-9)[:, None],
                       _log(1.0 - ndtr((highest[:, None] - r["size"] * a_std) / scale)), density)
    log_lik += density

    # P(a) = p N(a; sep, 1) + (1 - p) N(a; 0, 1); P(IDC | a) as mammo.sample_cases writes it
    log_idc, log_dcis = np.log(p) - 0.5 * (a - sep) ** 2, np.log(1 - p) - 0.5 * a ** 2
    prior_log = np.logaddexp(log_idc, log_dcis)
    return posterior(log_lik, prior_log, np.exp(log_idc - prior_log))
