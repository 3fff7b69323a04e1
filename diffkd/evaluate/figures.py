"""The report's figures, each a PNG (bytes) computed from predictions (and the metrics and reads
derived from them), so every figure can be rebuilt from predictions.parquet.

Uses matplotlib's object API on an Agg canvas: no pyplot state, no display needed.
"""
from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from diffkd.evaluate.calibration import calibration, reliability_curve
from diffkd.evaluate.decision import DEFAULT_THRESHOLDS, net_benefit, recalibrated, treat_all_net_benefit
from diffkd.evaluate.metrics import CIOptions, OperatingPoint, auc_with_ci
from diffkd.data.schema import DEFAULT_LABEL_NAMES
from diffkd.evaluate.summary import COHORT_SPLITS, ordered_models

DPI = 110
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22"]
_READER_MARKERS = {"senior": "s", "junior": "^"}  # shape = experience, fill = reader
_READER_FACES = ["#ffd24d", "#a6e3a1", "#f5a3c7", "#9ad0f5", "#d9b3ff", "#ffb38a"]


def model_colors(models: Sequence[str]) -> dict[str, str]:
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(ordered_models(models))}


def to_png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _cohort(predictions: pd.DataFrame, cohort: str) -> pd.DataFrame:
    return predictions[predictions.split == COHORT_SPLITS[cohort]]


def _no_cases(ax, cohort: str) -> None:
    ax.text(0.5, 0.5, f"no {cohort} cases", ha="center", va="center", transform=ax.transAxes, color="#777777")
    ax.set_axis_off()


def _roc_points(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Empirical ROC through every distinct threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tps, fps = np.cumsum(y)[last_of_tie], np.cumsum(1 - y)[last_of_tie]
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)]


def _roc_band(y: np.ndarray, s: np.ndarray, grid: np.ndarray, n_boot: int, seed: int,
              level: float, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band of sensitivity at fixed 1 - specificity. Patients (`groups`; each case its
    own when None) are resampled within label strata, as for the AUC's bootstrap interval."""
    rng = np.random.default_rng(seed)
    cluster_of_case = np.unique(np.arange(len(y)) if groups is None else groups, return_inverse=True)[1]
    members = [np.flatnonzero(cluster_of_case == c) for c in range(cluster_of_case.max() + 1)]
    positive = np.array([bool(y[m].any()) for m in members])
    strata = (np.flatnonzero(positive), np.flatnonzero(~positive))
    curves = np.empty((n_boot, len(grid)))
    for b in range(n_boot):
        idx = np.concatenate([members[c] for stratum in strata for c in rng.choice(stratum, len(stratum))])
        fpr, tpr = _roc_points(y[idx], s[idx])
        curves[b] = np.interp(grid, fpr, tpr, left=0, right=1)  # ties: np.interp takes the lower point
    alpha = (1 - level) / 2
    return np.quantile(curves, alpha, axis=0), np.quantile(curves, 1 - alpha, axis=0)


def roc_figure(predictions: pd.DataFrame, thresholds: Mapping[str, float], reference: str,
               reader_points: pd.DataFrame | None = None, ci: CIOptions = CIOptions(),
               band_boot: int = 300, label_names: Sequence[str] = DEFAULT_LABEL_NAMES) -> bytes:
    """Internal and external ROC curves side by side: every model, AUC (95% CI) in the legend, a
    bootstrap band and the fixed-threshold operating point for the reference model, reader points
    with Wilson 95% CIs."""
    colors = model_colors(predictions.model.unique())
    fig = Figure(figsize=(12, 7.5))
    for ax, cohort in zip(fig.subplots(1, 2), COHORT_SPLITS):
        part = _cohort(predictions, cohort)
        if part.empty:
            _no_cases(ax, cohort)
            continue
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls="--")
        for model in ordered_models(part.model.unique()):
            frame = part[part.model == model]
            y, s = frame.label.to_numpy(), frame.prob.to_numpy()
            if y.min() == y.max():
                continue
            est = auc_with_ci(y, s, ci, groups=frame.patient_id.to_numpy(), strata=frame.center.to_numpy())
            fpr, tpr = _roc_points(y, s)
            main = model == reference
            ax.plot(fpr, tpr, color=colors[model], lw=2.4 if main else 1.2, zorder=3 if main else 2,
                    label=f"{model}  {est.auc:.3f} ({est.ci[0]:.3f}-{est.ci[1]:.3f})")
            if main:
                grid = np.linspace(0, 1, 101)
                lo, hi = _roc_band(y, s, grid, band_boot, ci.seed, ci.level, groups=frame.patient_id.to_numpy())
                ax.fill_between(grid, lo, hi, color=colors[model], alpha=0.15, lw=0)
                op = OperatingPoint.at_threshold(y, s, thresholds[model]).as_dict()
                ax.plot(1 - op["specificity"], op["sensitivity"], "o", ms=9, mfc="white", mec=colors[model],
                        mew=2, zorder=5, label=f"{model} at fixed threshold {thresholds[model]:.3f}")
        if reader_points is not None and len(reader_points):
            face = {name: _READER_FACES[i % len(_READER_FACES)]
                    for i, name in enumerate(sorted(reader_points.reader.unique()))}
            for r in reader_points[reader_points.cohort == cohort].itertuples():
                x, yv = 1 - r.specificity, r.sensitivity
                xerr = [[x - (1 - r.specificity_ci[1])], [(1 - r.specificity_ci[0]) - x]]
                yerr = [[yv - r.sensitivity_ci[0]], [r.sensitivity_ci[1] - yv]]
                ax.errorbar(x, yv, xerr=xerr, yerr=yerr, fmt=_READER_MARKERS.get(r.experience, "D"), ms=8,
                            color="black", mfc=face[r.reader], ecolor="#555555", elinewidth=0.8, capsize=2, zorder=6,
                            label=f"reader {r.reader} ({r.experience})")
        n = part.drop_duplicates("case_id")
        ax.set_title(f"{cohort.capitalize()} (n={len(n)}, {label_names[1]} {int(n.label.sum())})")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=7, title="AUC (95% CI)",
                  title_fontsize=7, frameon=False)  # below the axes: reader points stay visible
    return to_png(fig)


def calibration_figure(predictions: pd.DataFrame, reference: str, n_bins: int = 8,
                       label_names: Sequence[str] = DEFAULT_LABEL_NAMES) -> bytes:
    """Reliability curves (quantile bins; Wilson CIs for the reference model) per cohort, with the
    reference model's distribution of predicted risk underneath."""
    colors = model_colors(predictions.model.unique())
    fig = Figure(figsize=(11, 6))
    axes = fig.subplots(2, 2, height_ratios=[4, 1], sharex="col")
    for col, cohort in enumerate(COHORT_SPLITS):
        ax, hist_ax = axes[0, col], axes[1, col]
        part = _cohort(predictions, cohort)
        if part.empty:
            _no_cases(ax, cohort)
            hist_ax.set_axis_off()
            continue
        ax.plot([0, 1], [0, 1], color="#bbbbbb", lw=0.8, ls="--", label="ideal")
        for model in ordered_models(part.model.unique()):
            frame = part[part.model == model]
            curve = reliability_curve(frame.label, frame.prob, n_bins=n_bins)
            main = model == reference
            label = model
            if main and frame.label.nunique() == 2:
                cal = calibration(frame.label, frame.prob)
                label = f"{model} (slope {cal.slope:.2f}, intercept {cal.intercept:+.2f})"
            ax.plot(curve.mean_predicted, curve.observed, marker="o" if main else None, ms=4,
                    lw=2.2 if main else 1, alpha=1 if main else 0.45, color=colors[model], label=label,
                    zorder=3 if main else 2)
            if main:
                ax.errorbar(curve.mean_predicted, curve.observed,
                            yerr=[curve.observed - curve.lo, curve.hi - curve.observed],
                            fmt="none", ecolor=colors[model], elinewidth=1, capsize=2)
                hist_ax.hist(frame.prob, bins=np.linspace(0, 1, 41), color=colors[model], alpha=0.7)
        ax.set_title(f"{cohort.capitalize()}: observed vs predicted risk")
        ax.set_ylabel(f"observed {label_names[1]} rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        hist_ax.set_xlabel(f"predicted risk ({reference} histogram below)")
        hist_ax.set_ylabel("cases")
    return to_png(fig)


def decision_figure(predictions: pd.DataFrame, reference: str,
                    thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> bytes:
    """Net benefit over 5-40% threshold probability per cohort, against treat-all and treat-none, of each
    model's risks recalibrated on its internal validation predictions (decision.recalibrated)."""
    colors = model_colors(predictions.model.unique())
    risks, _ = recalibrated(predictions)
    fig = Figure(figsize=(11, 5.2))
    fig.suptitle("Risks recalibrated on internal validation (logistic recalibration per model) before net benefit",
                 fontsize=10)
    titles = {"internal": "Internal (where the recalibration was fitted)", "external": "External"}
    for ax, cohort in zip(fig.subplots(1, 2), COHORT_SPLITS):
        part = _cohort(risks, cohort)
        if part.empty:
            _no_cases(ax, cohort)
            continue
        cases = part.drop_duplicates("case_id")
        treat_all = treat_all_net_benefit(cases.label, thresholds)
        ax.plot(thresholds, treat_all, color="#555555", lw=1.2, ls="--", label="treat all")
        ax.axhline(0, color="black", lw=1, label="treat none")
        top = max(0.02, float(treat_all.max()))
        for model in ordered_models(part.model.unique()):
            frame = part[part.model == model]
            nb = net_benefit(frame.label, frame.prob, thresholds)
            top = max(top, float(nb.max()))
            main = model == reference
            ax.plot(thresholds, nb, color=colors[model], lw=2.2 if main else 1, label=model, zorder=3 if main else 2)
        ax.set_ylim(-0.05, top * 1.15)
        ax.set_xlim(min(thresholds), max(thresholds))
        ax.set_title(f"{titles[cohort]}: decision curve", fontsize=10)
        ax.set_xlabel("threshold probability")
        ax.set_ylabel("net benefit")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    return to_png(fig)


def forest_figure(metrics: Mapping) -> bytes:
    """AUC with 95% CI per model, one panel per center (internal centers on validation cases), with the
    synthetic cohort's Bayes and image-ceiling AUCs as vertical lines where metrics hold "ceilings"."""
    models = ordered_models(metrics["models"])
    centers = sorted({c for m in models for c in metrics["models"][m]["per_center"]})
    colors = model_colors(models)
    fig = Figure(figsize=(2.6 * max(len(centers), 2) + 1.2, 0.32 * len(models) + 1.4))
    axes = np.atleast_1d(fig.subplots(1, len(centers), sharey=True, squeeze=False)[0])
    lows = [m["auc_ci"][0] for e in metrics["models"].values() for m in e["per_center"].values()
            if m.get("auc") is not None]
    lows += [c[k] for c in metrics.get("ceilings", {}).values() for k in ("bayes_auc", "image_auc")
             if c.get(k) is not None]
    x_min = min([0.3, *lows]) - 0.02
    for ax, center in zip(axes, centers):
        for row, model in enumerate(models):
            m = metrics["models"][model]["per_center"].get(center)
            if not m or m.get("auc") is None:
                continue
            lo, hi = m["auc_ci"]
            ax.errorbar(m["auc"], row, xerr=[[m["auc"] - lo], [hi - m["auc"]]], fmt="o", color=colors[model],
                        ms=5, capsize=2)
        split = next((metrics["models"][m]["per_center"][center].get("split") for m in models
                      if center in metrics["models"][m]["per_center"]), "")
        ceiling = metrics.get("ceilings", {}).get(center, {})
        for key, style, label in (("bayes_auc", "-", "Bayes AUC"), ("image_auc", "--", "image ceiling AUC")):
            if ceiling.get(key) is not None:
                ax.axvline(ceiling[key], color="#2b7a3d", lw=1.2, ls=style, label=label)
        if ceiling and ax is axes[0]:
            ax.legend(fontsize=7, loc="lower left")
        ax.set_title(f"{center} ({'external' if split == 'test' else 'internal'})", fontsize=9)
        ax.axvline(0.5, color="#bbbbbb", lw=0.8, ls="--")
        ax.set_xlim(x_min, 1.01)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("AUC (95% CI)")
    axes[0].set_yticks(range(len(models)))
    axes[0].set_yticklabels(models, fontsize=8)
    axes[0].invert_yaxis()
    return to_png(fig)


def efficiency_figure(metrics: Mapping) -> bytes | None:
    """External AUC (95% CI) against parameter count (log scale); latency in the labels. None without params."""
    rows = [(m, e["params"], e["latency_ms"], e["external"]) for m, e in metrics["models"].items()
            if e.get("params") and (e.get("external") or {}).get("auc") is not None]
    if not rows:
        return None
    colors = model_colors([r[0] for r in rows])
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for model, params, latency, ext in rows:
        lo, hi = ext["auc_ci"]
        ax.errorbar(params, ext["auc"], yerr=[[ext["auc"] - lo], [hi - ext["auc"]]], fmt="o", ms=7,
                    color=colors[model], capsize=3, zorder=3)
        text = model + (f"\n{latency:.1f} ms" if latency is not None else "")
        ax.annotate(text, (params, ext["auc"]), textcoords="offset points", xytext=(6, 4), fontsize=7)
    lows = [r[3]["auc_ci"][0] for r in rows]
    highs = [r[3]["auc_ci"][1] for r in rows]
    ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(highs) + 0.05))
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("external AUC (95% CI)")
    ax.grid(alpha=0.3)
    ax.set_title("Discrimination vs model size")
    return to_png(fig)


def distillation_figure(students: Mapping[str, Mapping]) -> bytes | None:
    """Per epoch and student: internal-validation AUC, logit correlation with the teacher, and the loss
    terms (cross-entropy solid, distillation terms dashed). None without histories."""
    histories = {s: info.get("history") or [] for s, info in students.items()}
    histories = {s: h for s, h in histories.items() if h}
    if not histories:
        return None
    colors = model_colors(list(histories))
    fig = Figure(figsize=(11, 3.6))
    auc_ax, agree_ax, loss_ax = fig.subplots(1, 3)
    for student, history in histories.items():
        epochs = [h["epoch"] for h in history]
        color = colors[student]
        auc_ax.plot(epochs, [h.get("val_auc", np.nan) for h in history], "o-", color=color, label=student, ms=3)
        agree_ax.plot(epochs, [h.get("agree_corr", np.nan) for h in history], "o-", color=color, ms=3)
        loss_ax.plot(epochs, [h.get("ce", np.nan) for h in history], "-", color=color)
        for term in sorted({k for h in history for k in h if k.startswith("kd_")}):
            loss_ax.plot(epochs, [h.get(term, np.nan) for h in history], "--", color=color, label=f"{student} {term}")
        best = students[student].get("best_epoch")
        if best is not None:
            auc_ax.axvline(best, color=color, alpha=0.25, lw=1)
    for ax, title in ((auc_ax, "internal-validation AUC"), (agree_ax, "logit correlation with the teacher"),
                      (loss_ax, "loss terms (CE solid, KD dashed)")):
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    auc_ax.legend(fontsize=7)
    if loss_ax.get_legend_handles_labels()[0]:
        loss_ax.legend(fontsize=6)
    fig.tight_layout()
    return to_png(fig)


def cohort_figure(cohort: pd.DataFrame, label_names: Sequence[str] = DEFAULT_LABEL_NAMES) -> bytes:
    """Cases per center split by label (`label_names`: label 0, label 1); external centers hatched."""
    fig = Figure(figsize=(1.3 * len(cohort) + 3, 3.6))
    ax = fig.subplots()
    x = np.arange(len(cohort))
    negatives = cohort.cases - cohort.positives
    hatch = ["//" if role == "external" else "" for role in cohort.role]
    ax.bar(x, negatives, color="#9ecae1", hatch=hatch, edgecolor="#3b6e8f", label=f"{label_names[0]} (0)")
    ax.bar(x, cohort.positives, bottom=negatives, color="#fc9272", hatch=hatch, edgecolor="#a33b2c",
           label=f"{label_names[1]} (1)")
    for xi, row in zip(x, cohort.itertuples()):
        ax.text(xi, row.cases, f"{row.positive_rate:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{c}\n{r}" for c, r in zip(cohort.center, cohort.role)], fontsize=8)
    ax.set_ylabel("cases")
    ax.set_title(f"Cases per center ({label_names[1]} rate on top; hatched = external)")
    ax.legend(fontsize=8)
    return to_png(fig)
