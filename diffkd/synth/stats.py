"""The audit's measures, on plain arrays: no model, no dataset, so each is unit-testable on its own.

Feature-space distances (FID, KID), nearest neighbours and near copies, pixel vectors, and the label
measures (recovery of the conditioned label, the paired label effect on `LabelPairs`). Torch appears
only as an array library where it computes exactly what numpy would, faster (`nearest`, `pixel_vectors`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from diffkd.evaluate.metrics import ThresholdRule, auc_delong_ci, mean_t_ci


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # A tiny ridge keeps the product's square root defined when a set has fewer images than features.
    ridge = 1e-6 * np.eye(a.shape[1])
    covmean = np.real(linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge)))
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean)))


def kernel_distance(a: np.ndarray, b: np.ndarray, subset_size: int = 100, subsets: int = 50, seed: int = 0) -> float:
    """KID: unbiased MMD² with the cubic polynomial kernel, averaged over random subsets."""
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = ~np.eye(m, dtype=bool)
        values.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return float(np.mean(values))


def nearest(query: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance to, and index of, each query row's nearest reference row."""
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    dists, idx = [], []
    for start in range(0, len(query), chunk):
        q = torch.from_numpy(np.ascontiguousarray(query[start:start + chunk], dtype=np.float32))
        d = torch.cdist(q, ref, compute_mode="donot_use_mm_for_euclid_dist")  # exact: a copy must measure 0
        best = d.min(dim=1)
        dists.append(best.values.numpy())
        idx.append(best.indices.numpy())
    return np.concatenate(dists), np.concatenate(idx)


def pixel_vectors(unit_images: np.ndarray, side: int = 32) -> np.ndarray:
    """[N, 1, H, W] in [0, 1] -> per-image standardised pixels at <= `side` px, scaled to RMS units.

    Standardising removes overall gain, so a copy with a different brightness still counts as a copy.
    """
    x = torch.from_numpy(unit_images)
    if x.shape[-1] > side:
        x = F.adaptive_avg_pool2d(x, side)
    x = x.flatten(1)
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    return (x / np.sqrt(x.shape[1])).numpy()


def unit_range(normalised: np.ndarray, pipe_cfg) -> np.ndarray:
    """Pipeline-normalised images back to [0, 1] (what figures show and pixel distances compare)."""
    return np.clip(normalised * pipe_cfg.norm_std + pipe_cfg.norm_mean, 0.0, 1.0).astype(np.float32)


def to_pipeline_range(unit_images: np.ndarray, pipe_cfg) -> np.ndarray:
    """[N, 1, h, w] in [0, 1] -> the audit's size and the pipeline's normalisation (the inverse of `unit_range`)."""
    x = torch.from_numpy(np.ascontiguousarray(unit_images, dtype=np.float32))
    if x.shape[-1] != pipe_cfg.image_size:
        x = F.interpolate(x, size=(pipe_cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    return ((x - pipe_cfg.norm_mean) / pipe_cfg.norm_std).numpy()


def label_recovery(train_labels: np.ndarray, train_probs: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                   real_labels: np.ndarray, real_probs: np.ndarray) -> dict[str, Any]:
    """How well a real-trained label classifier recovers the conditioned labels, beside real images.

    Balanced accuracy, not plain accuracy: synthetic sets are often label-balanced while the real ones
    are not, and a classifier that calls every case DCIS would otherwise score the real prevalence on
    real images and 0.5 on a balanced synthetic set whatever the images show. The threshold is fixed
    once, by Youden's index on the classifier's real training images, and applied to both sets.
    """
    def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
        called = p >= threshold
        return float(np.mean([(called[y == k] == bool(k)).mean() for k in (0, 1) if (y == k).any()]))

    threshold = (ThresholdRule("youden").fit(train_labels, train_probs) if len(np.unique(train_labels)) == 2
                 else 0.5)
    out: dict[str, Any] = {"conditional_accuracy": balanced_accuracy(labels, probs),
                           "conditional_accuracy_real": balanced_accuracy(real_labels, real_probs),
                           "conditional_auc": float("nan"), "conditional_auc_ci": [float("nan")] * 2,
                           "label_threshold": threshold}
    if len(np.unique(labels)) == 2:
        estimate = auc_delong_ci(labels, probs)
        out["conditional_auc"], out["conditional_auc_ci"] = estimate.auc, list(estimate.ci)
    return out


@dataclass
class LabelPairs:
    """Images generated from the same conditions, mask and noise, once per label."""

    rows: pd.DataFrame  # the real training rows whose conditions were drawn
    dcis: np.ndarray  # [N, 1, H, W] in [0, 1]
    upgrade: np.ndarray
    masks: np.ndarray  # [N, H, W] the lesion mask both images were conditioned on (zeros: none)


def label_effect(p_dcis: np.ndarray, p_upgrade: np.ndarray) -> dict[str, Any]:
    """Paired difference of the classifier's upgrade probability (upgrade-conditioned minus DCIS-conditioned
    image of the same pair): mean with a 95% t interval, and the share of pairs where it is positive."""
    diff = np.asarray(p_upgrade, float) - np.asarray(p_dcis, float)
    mean, ci = mean_t_ci(diff)
    return {"label_effect": mean, "label_effect_ci": list(ci),
            "label_effect_positive_share": float((diff > 0).mean()) if len(diff) else float("nan"),
            "label_pairs": len(diff)}


def near_copies(real_train: dict, real_val: dict, synth: dict, f_train: np.ndarray, f_val: np.ndarray,
                f_syn: np.ndarray, pipe_cfg, quantile: float) -> dict:
    """Nearest training image of every synthetic one, in pixel and feature space, against thresholds
    calibrated on how close real validation images come to real training images."""
    pix_train = pixel_vectors(unit_range(real_train["image"], pipe_cfg))
    pix_val = pixel_vectors(unit_range(real_val["image"], pipe_cfg))
    pix_syn = pixel_vectors(unit_range(synth["image"], pipe_cfg))
    unit = lambda f: f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)  # noqa: E731 (cosine geometry)
    val_pix, _ = nearest(pix_val, pix_train)
    val_feat, _ = nearest(unit(f_val), unit(f_train))
    syn_pix, syn_pix_idx = nearest(pix_syn, pix_train)
    syn_feat, _ = nearest(unit(f_syn), unit(f_train))
    pix_threshold = float(np.quantile(val_pix, quantile))
    feat_threshold = float(np.quantile(val_feat, quantile))
    flagged = (syn_pix <= pix_threshold) & (syn_feat <= feat_threshold)
    return {
        "count": int(flagged.sum()),
        "count_pixel_only": int((syn_pix <= pix_threshold).sum()),
        "count_feature_only": int((syn_feat <= feat_threshold).sum()),
        "pixel_threshold": pix_threshold, "feature_threshold": feat_threshold,
        "quantile": quantile,
        "flagged_case_ids": [str(c) for c in synth["case_id"][flagged]],
        "synthetic_median_pixel_distance": float(np.median(syn_pix)),
        "real_median_pixel_distance": float(np.median(val_pix)),
        "synthetic_pixel": syn_pix, "synthetic_pixel_index": syn_pix_idx, "real_pixel": val_pix,
        "flagged": flagged,
    }
