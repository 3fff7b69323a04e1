"""The validation report: `DIR/report/index.html` + `metrics.json` + `predictions.parquet`.

The page is self-contained (inline CSS, figures as base64 data URIs, no scripts, no external
requests) and follows the TRIPOD+AI items as model-card headings. Every figure and table is computed
here from the predictions (plus the reads, the synthetic audit and the model sizes the caller
supplies), and everything needed to rebuild it is written beside it:

    report/index.html  metrics.json  predictions.parquet  report_inputs.json  [readers.csv]  [grids/*.png]

`diffkd report --predictions report/predictions.parquet --out NEW` rebuilds the page from those.
All files are written to temporary names and renamed into place only after everything rendered, so
a failure leaves a previous report whole.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib
import pandas as pd
import yaml

from diffkd.config import from_dict
from diffkd.data.schema import DEFAULT_LABEL_NAMES
from diffkd.evaluate import figures
from diffkd.evaluate.health import FLAG_TEXT, HealthThresholds
from diffkd.evaluate.readers import birads_positive_from_default, load_readers, reader_operating_points
from diffkd.evaluate.summary import (ABLATIONS, BASELINES, MODEL_DESCRIPTIONS, EvaluateConfig, build_metrics,
                                     cases_table, cohort_table, fit_thresholds, jsonable, ordered_models,
                                     validate_predictions)
from diffkd.evaluate.truth import load_truth
from diffkd.runtime.files import staged_directory

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("templates") / "report.html"
DEEP_FEATURE_EXTRACTOR = "deep_feature_model"  # the stage name of the deep-feature model's trained extractor(s)
INPUTS_FILE = "report_inputs.json"
READERS_FILE = "readers.csv"
PACKAGES = ("diffkd", "torch", "torchvision", "timm", "diffusers", "ray", "deepspeed", "numpy", "pandas", "scipy",
            "scikit-learn", "matplotlib", "pyarrow", "onnxruntime")

# Sections a caller may mark as skipped, with the report heading each belongs to.
SECTIONS = {
    "external": "External validation", "discrimination": "Discrimination", "per_center": "Per-center performance",
    "calibration": "Calibration",
    "decision": "Clinical utility", "ablations": "Ablations", "baselines": "Baselines (An et al. 2025)",
    "readers": "Reader study", "efficiency": "Model size and speed", "synthetic": "Synthetic-data audit",
    "distillation": "Distillation", "health": "Training health",
}


@dataclass
class ReportInputs:
    """What the report needs beyond predictions; saved as report_inputs.json beside them."""

    title: str = "diffkd validation report"
    # e.g. {"name", "modality", "external", "path"}; "intended_use" and "outcome" replace the default texts
    dataset: dict = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)  # model -> {"params", "latency_ms", "architecture", ...}
    synthetic: dict | None = None  # the synthetic-data audit: fid, kid, conditional_accuracy, near_copies, tstr_auc
    synthetic_grids: list[str] = field(default_factory=list)  # PNG paths of sample grids
    baselines: dict | None = None  # baselines.BaselineResult.summary
    flow: list[dict] = field(default_factory=list)  # cohort flow rows: {"center", "step", "n"}
    skipped: dict = field(default_factory=dict)  # section key (SECTIONS) -> reason
    notes: list = field(default_factory=list)  # stages left out (and why) and data set aside, listed under limitations
    config: dict | None = None  # the experiment config as run
    evaluate: dict = field(default_factory=dict)  # EvaluateConfig fields
    # model (classifiers, the generator, the feature model) -> "scratch" or the weights it started from
    initialised_from: dict = field(default_factory=dict)
    # a synthetic cohort's truth.csv (the phantom's): per-center Bayes and image AUC ceilings.
    # Its case ids are mapped to the stored ones with the salt of dataset["path"].
    truth: str | None = None
    label_names: list = field(default_factory=lambda: list(DEFAULT_LABEL_NAMES))  # the dataset's label 0, label 1
    # student -> {"teacher": the teacher's model name, "best_epoch", "history": per-epoch metrics with the
    # loss terms (ce, kd_<term>) and the agreement measures (agree_corr, agree_kl, agree_top1)}
    distillation: dict = field(default_factory=dict)
    # trained network (each classifier; each fold of the deep-feature extractor) -> {"checks", "flags"}
    # (diffkd.evaluate.health); metrics.json carries each under models.<name>.health
    health: dict = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.skipped) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown report section(s) {', '.join(unknown)} in skipped; known: {', '.join(SECTIONS)}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReportInputs":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"report inputs file {path} does not exist") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        inputs = cls(**data)
        # grid, dataset and truth paths are stored relative to the inputs file
        inputs.synthetic_grids = [str((path.parent / g).resolve()) for g in inputs.synthetic_grids]
        # (normalised, not resolved: the salt's default place is keyed by the dataset path as given)
        if inputs.dataset.get("path") and "://" not in inputs.dataset["path"]:
            inputs.dataset = {**inputs.dataset,
                              "path": os.path.normpath(path.parent.absolute() / inputs.dataset["path"])}
        if inputs.truth:
            inputs.truth = os.path.normpath(path.parent.absolute() / inputs.truth)
        return inputs


def _relative_to(location: str, folder: Path) -> str:
    """A local path relative to `folder` (a URI as it is)."""
    return location if "://" in location else os.path.relpath(os.path.abspath(location), os.path.abspath(folder))


@dataclass(frozen=True)
class ReportFiles:
    index: Path
    metrics: Path
    predictions: Path


# --------------------------------------------------------------------------------------------------
# Formatting


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, (int,)) and not isinstance(value, bool):
        return f"{value:,}"
    return f"{float(value):.{digits}f}"


def _pct(value: object) -> str:
    return "–" if value is None else f"{100 * float(value):.1f}%"


def _range(ci: Sequence, digits: int) -> str:
    sep = " to " if ci[0] < 0 else "–"  # "-0.1–-0.02" misreads
    return f"{_num(ci[0], digits)}{sep}{_num(ci[1], digits)}"


def _ci(value: object, ci: Sequence | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if not ci or ci[0] is None:
        return _num(value, digits)
    return f'{_num(value, digits)}<span class="ci">{_range(ci, digits)}</span>'


def _ci_inline(value: object, ci: Sequence | None, digits: int = 3) -> str:
    if value is None or not ci or ci[0] is None:
        return _num(value, digits)
    return f"{_num(value, digits)} (95% CI {_range(ci, digits)})"


def _p(value: object) -> str:
    if value is None:
        return "–"
    return "&lt;0.001" if value < 0.001 else f"{value:.3f}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = (),
           highlight: Iterable[int] = (), row_class: str = "reference") -> str:
    """Cells are pre-escaped HTML; `numeric` column indices are right-aligned; `highlight` rows get `row_class`."""
    numeric, highlight = set(numeric), set(highlight)
    head = "".join(f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f'<tr class="{row_class}">{cells}</tr>' if r in highlight else f"<tr>{cells}</tr>")
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _skipped(reason: str) -> str:
    return f'<p class="skipped">skipped: {_esc(reason)}</p>'


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass
class _Context:
    preds: pd.DataFrame
    metrics: dict
    inputs: ReportInputs
    config: EvaluateConfig
    thresholds: dict
    reads: pd.DataFrame | None
    grids: list[tuple[str, bytes]]
    skipped: dict = field(default_factory=dict)  # section -> reason, filled as sections render

    @property
    def reference(self) -> str:
        return self.config.reference

    @property
    def negative(self) -> str:
        return self.inputs.label_names[0]

    @property
    def positive(self) -> str:
        return self.inputs.label_names[1]

    def perf_headers(self) -> list[str]:
        return ["model", "cases", _esc(self.positive), "AUC (95% CI)", "sensitivity", "specificity", "PPV", "NPV",
                "accuracy"]

    def skip(self, section: str, default_reason: str) -> str:
        reason = self.inputs.skipped.get(section, default_reason)
        self.skipped[section] = reason
        return _skipped(reason)

    def caller_skipped(self, section: str) -> bool:
        if section in self.inputs.skipped:
            self.skipped[section] = self.inputs.skipped[section]
            return True
        return False


def _model_rows(ctx: _Context, cohort: str, models: Sequence[str]) -> tuple[list[list[str]], list[int]]:
    rows, highlight = [], []
    for model in models:
        m = ctx.metrics["models"][model].get(cohort)
        if not m:
            continue
        if model == ctx.reference:
            highlight.append(len(rows))
        rows.append([f"<code>{_esc(model)}</code>", _num(m["n"]), _num(m.get("n_pos")), _ci(m["auc"], m["auc_ci"]),
                     _ci(m["sensitivity"], m.get("sensitivity_ci")), _ci(m["specificity"], m.get("specificity_ci")),
                     _ci(m.get("ppv"), m.get("ppv_ci")), _ci(m.get("npv"), m.get("npv_ci")),
                     _ci(m["accuracy"], m.get("accuracy_ci"))])
    return rows, highlight


def _summary_section(ctx: _Context) -> str:
    models = ordered_models(ctx.metrics["models"])
    rows, highlight = _model_rows(ctx, "external", models)
    ref = ctx.metrics["models"].get(ctx.reference)
    lead = ""
    if ref and ref.get("external"):
        e = ref["external"]
        lead = (f"<p>On the external centers the full pipeline (<code>{_esc(ctx.reference)}</code>) reached an AUC of "
                f"<b>{_ci_inline(e['auc'], e['auc_ci'])}</b> on {_num(e['n'])} cases, with sensitivity "
                f"{_num(e['sensitivity'])} and specificity {_num(e['specificity'])} at the threshold fixed on internal "
                f"validation ({_num(ref['threshold'])}).</p>")
        external = [(c, e) for c, e in ctx.metrics.get("ceilings", {}).items()
                    if e.get("split") == "test" and e.get("image_auc") is not None]
        if external:
            lead += ("<p>What the synthetic cohort allows there (its truth file): " + "; ".join(
                f"{_esc(c)}: image ceiling AUC {_num(e['image_auc'])}, Bayes AUC {_num(e['bayes_auc'])}"
                for c, e in external) + ' (see <a href="#per-center">per-center performance</a>).</p>')
    if not rows:
        rows, highlight = _model_rows(ctx, "internal", models)
        lead = "<p>There is no external cohort; the table shows internal validation.</p>"
    table = _table(ctx.perf_headers(), rows, numeric=range(1, 9), highlight=highlight)
    return lead + table + (f'<p class="note">Sensitivity, specificity, PPV, NPV and accuracy at each model\'s own '
                           f"threshold fixed on internal validation ({_esc(ctx.config.threshold_rule.describe())}); "
                           "Wilson 95% CIs.</p>")


def _model_details_section(ctx: _Context) -> str:
    rows = []
    for model in ordered_models(ctx.metrics["models"]):
        info = ctx.inputs.model_info.get(model, {})
        rows.append([f"<code>{_esc(model)}</code>", _esc(info.get("description") or MODEL_DESCRIPTIONS.get(model, "")),
                     _esc(info.get("architecture", "")), _num(ctx.metrics["models"][model]["params"]),
                     _esc(ctx.inputs.initialised_from.get(model, ""))])
    ds = dict(ctx.inputs.dataset)
    if (ctx.negative, ctx.positive) == DEFAULT_LABEL_NAMES:  # the DCIS-upgrade study's own words
        default_use = ("Research use: estimate, before surgery, the probability that ductal carcinoma in situ (DCIS) "
                       "diagnosed at core biopsy is upgraded to invasive carcinoma at surgical excision, from the "
                       "breast image. Not a medical device; not validated prospectively.")
        default_outcome = ("label = 1 when surgery found invasive disease (upgrade), 0 when it stayed DCIS; "
                           "the positive class is the upgrade.")
    else:
        default_use = (f"Research use: estimate the probability of {ctx.positive} (rather than {ctx.negative}) from "
                       "the image. Not a medical device; not validated prospectively.")
        default_outcome = f"label = 1 is {ctx.positive}, 0 is {ctx.negative}; the positive class is {ctx.positive}."
    intended_use = ds.pop("intended_use", default_use)
    outcome = ds.pop("outcome", default_outcome)
    intended = (f"<p><b>Intended use.</b> {_esc(intended_use)}</p><p><b>Outcome.</b> {_esc(outcome)}</p>")
    ds.pop("path", None)  # where the dataset lies on the user's machine is no reader's business (the name says it)
    data = ""
    if ds:
        data = _table(["dataset", "value"], [[_esc(k), _esc(v)] for k, v in ds.items()])
    listed = set(ordered_models(ctx.metrics["models"]))
    others = "".join(f'<p class="note"><code>{_esc(m)}</code> started from: {_esc(source)}</p>'
                     for m, source in ctx.inputs.initialised_from.items() if m not in listed)
    return intended + data + _table(["model", "what it is", "architecture", "parameters", "initialised from"], rows,
                                    numeric=[3]) + others


def _data_section(ctx: _Context) -> str:
    cohort = cohort_table(ctx.preds)
    rows = [[_esc(r.center), _esc(r.role), _num(r.patients), _num(r.cases), _num(r.positives), _pct(r.positive_rate),
             _num(r.n_train), _num(r.n_val), _num(r.n_test)] for r in cohort.itertuples()]
    out = _table(["center", "role", "patients", "cases", _esc(ctx.positive), f"{_esc(ctx.positive)} rate", "train",
                  "internal val", "external test"], rows, numeric=range(2, 9))
    out += _figure(figures.cohort_figure(cohort, ctx.inputs.label_names), "cases per center",
                   f"Cases per center with the share of {_esc(ctx.positive)}. Internal centers are split by patient "
                   "into training and internal validation; external centers are held out whole.")
    if ctx.inputs.flow:
        flow = pd.DataFrame(ctx.inputs.flow)
        out += "<h3>Participant flow</h3>" + _table([_esc(c) for c in flow.columns],
                                                    [[_esc(v) for v in row] for row in flow.itertuples(index=False)])
    else:
        out += '<p class="note">Participant flow (exclusions before ingest) was not provided by the pipeline.</p>'
    return out


def _methods_section(ctx: _Context) -> str:
    ev = ctx.metrics["evaluation"]
    items = [
        f"Internal validation: {_esc(ev['internal'])}. External validation: {_esc(ev['external'])}. "
        "No patient appears on two sides of a split.",
        f"AUC 95% CI: {_esc(ev['auc_ci'])}.",
        f"Decision threshold: {_esc(ev['threshold_rule'])}, then applied unchanged to the external cohort and to "
        "every center (a case is positive when its probability is at or above the threshold).",
        "Sensitivity, specificity, PPV, NPV and accuracy: Wilson score 95% CIs.",
        f"Comparisons: paired test of two AUCs on the same external cases (each model against "
        f"<code>{_esc(ctx.reference)}</code>, and the baseline models of An et al. 2025 against each other): DeLong "
        "where every patient has one case, else the patient-clustered paired bootstrap (each row names its test); "
        "internal vs external AUC of one model: unpaired z test with each AUC's standard error from the same method. "
        f"Patients with more than one case: {_num(ev.get('patients_with_several_cases'))}. Two-sided p values, "
        "not adjusted for multiplicity.",
        "Calibration: intercept (calibration-in-the-large, slope fixed at 1) and slope by logistic recalibration "
        "of the outcome on logit(p); Brier score; reliability curves over quantile bins with Wilson CIs.",
        "Clinical utility: decision-curve net benefit over threshold probabilities of 5–40%, against treating all "
        "and treating none, on risks recalibrated on internal validation (logistic recalibration per model).",
        "Readers: each reader's calls against the reference model's at its fixed threshold on the cases both read; "
        "McNemar test on the positives (sensitivity) and on the negatives (specificity), exact mid-p below 25 "
        "discordant pairs, continuity-corrected chi-square otherwise.",
        "Every number and figure here is recomputed from <code>predictions.parquet</code> (plus the reads, the "
        "synthetic audit and the model sizes in <code>report_inputs.json</code>).",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _discrimination_section(ctx: _Context) -> str:
    if ctx.caller_skipped("discrimination"):
        return _skipped(ctx.skipped["discrimination"])
    models = ordered_models(ctx.metrics["models"])
    # internal rows always exist (thresholds are fitted on them); external ones may not
    out = "" if (ctx.preds.split == "test").any() else ctx.skip("external", "no external ('test') predictions")
    points = (reader_operating_points(ctx.reads, cases_table(ctx.preds), ctx.config.level)
              if ctx.reads is not None else None)
    out += _figure(figures.roc_figure(ctx.preds, ctx.thresholds, ctx.reference, points, ctx.config.ci_options,
                                      label_names=ctx.inputs.label_names),
                  "ROC curves, internal and external",
                  "ROC curves. Shaded: pointwise 95% bootstrap band (patients resampled) for "
                  f"<code>{_esc(ctx.reference)}</code>; circle: its "
                  "operating point at the threshold fixed on internal validation; filled markers: readers (square "
                  "senior, triangle junior) with Wilson 95% CIs. Legend: AUC (95% CI).")
    for cohort in ("internal", "external"):
        rows, highlight = _model_rows(ctx, cohort, models)
        out += f"<h3>{cohort.capitalize()} validation</h3>" + _table(ctx.perf_headers(), rows, range(1, 9), highlight)
    rows = []
    for model in models:
        ive = ctx.metrics["models"][model].get("internal_vs_external")
        if ive:
            rows.append([f"<code>{_esc(model)}</code>", _ci(ive["difference"], ive["difference_ci"]), _p(ive["p"])])
    if rows:
        out += ("<h3>Internal vs external AUC</h3>" +
                _table(["model", "AUC internal − external (95% CI)", "p (unpaired)"], rows, numeric=[1, 2]))
    return out


def _per_center_section(ctx: _Context) -> str:
    if ctx.caller_skipped("per_center"):
        return _skipped(ctx.skipped["per_center"])
    rows, highlight = [], []
    for model in ordered_models(ctx.metrics["models"]):
        for center, m in ctx.metrics["models"][model]["per_center"].items():
            if model == ctx.reference:
                highlight.append(len(rows))
            role = "external" if m.get("split") == "test" else "internal"
            rows.append([_esc(center), role, f"<code>{_esc(model)}</code>", _num(m["n"]), _num(m.get("n_pos")),
                         _ci(m["auc"], m["auc_ci"]), _ci(m["sensitivity"], m.get("sensitivity_ci")),
                         _ci(m["specificity"], m.get("specificity_ci")), _ci(m["accuracy"], m.get("accuracy_ci"))])
    rows_sorted = sorted(range(len(rows)), key=lambda i: (rows[i][1] == "external", rows[i][0]))
    caption = "AUC with 95% CI per center and model (internal centers: their validation cases)."
    ceilings = ctx.metrics.get("ceilings")
    if ceilings:
        caption += (" Vertical lines: the synthetic cohort's ceilings on the same cases, the Bayes AUC of the "
                    "generator's own probability of label 1 (solid) and the image ceiling, the AUC of its probability "
                    "given what the images draw (dashed).")
    out = _figure(figures.forest_figure(ctx.metrics), "per-center AUC forest plot", caption)
    if ceilings:
        per_center = ctx.metrics["models"].get(ctx.reference, {}).get("per_center", {})
        ref_auc = {c: m.get("auc") for c, m in per_center.items()}
        crow = [[_esc(c), _num(e["n"]), _num(e["n_pos"]), _ci(e.get("bayes_auc"), e.get("bayes_auc_ci")),
                 _ci(e.get("image_auc"), e.get("image_auc_ci")), _ci(e.get("reference_auc"), e.get("reference_auc_ci")),
                 _num(ref_auc.get(c)), _esc(e["cases_of"])]
                for c, e in ceilings.items()]
        out += ("<h3>What the data allow: the synthetic cohort's ceilings</h3>" +
                _table(["center", "cases", _esc(ctx.positive), "Bayes AUC (label probability)",
                        "image ceiling AUC (image probability)", "reference score AUC", f"AUC {_esc(ctx.reference)}",
                        "cases of"], crow, range(1, 7)) +
                '<p class="note">From the phantom\'s truth file, read by the report only. The Bayes AUC scores '
                "each case by the probability that generated its label: no model can beat it but by chance. The "
                "image ceiling scores it by the probability of its label given what the renderer drew into its "
                "images (the generator's own model, integrated exactly): no image-only model can beat it but by "
                "chance, and one near it has learnt what there is to learn. The reference score is a hand-weighted "
                "suspicion score of the drawn features (what the simulated readers see); it is not a ceiling.</p>")
    headers = ["center", "role", "model", "cases", _esc(ctx.positive), "AUC (95% CI)", "sensitivity", "specificity",
               "accuracy"]
    every_model = _table(headers, [rows[i] for i in rows_sorted], range(3, 9),
                         [rows_sorted.index(i) for i in highlight])
    if not highlight:
        return out + every_model
    return (out + _table(headers, [rows[i] for i in rows_sorted if i in highlight], range(3, 9)) +
            f"<details><summary>All models per center</summary>{every_model}</details>")


def _calibration_section(ctx: _Context) -> str:
    if ctx.caller_skipped("calibration"):
        return _skipped(ctx.skipped["calibration"])
    out = _figure(figures.calibration_figure(ctx.preds, ctx.reference, label_names=ctx.inputs.label_names),
                  "calibration curves",
                  "Reliability curves (quantile bins). Error bars: Wilson 95% CIs for the reference model.")
    rows = []
    for model in ordered_models(ctx.metrics["models"]):
        for cohort in ("internal", "external"):
            m = ctx.metrics["models"][model].get(cohort)
            if m:
                rows.append([f"<code>{_esc(model)}</code>", cohort, _num(m.get("calibration_intercept")),
                             _num(m.get("calibration_slope")), _num(m.get("brier"))])
    return out + _table(["model", "cohort", "intercept (ideal 0)", "slope (ideal 1)", "Brier"], rows, [2, 3, 4])


def _decision_section(ctx: _Context) -> str:
    if ctx.caller_skipped("decision"):
        return _skipped(ctx.skipped["decision"])
    fits = {m: ctx.metrics["models"][m].get("recalibration") for m in ordered_models(ctx.metrics["models"])}
    rows = [[f"<code>{_esc(m)}</code>", _num(r["intercept"]), _num(r["slope"]), _num(r["n"])]
            for m, r in fits.items() if r]
    return _figure(figures.decision_figure(ctx.preds, ctx.reference), "decision curves",
                   "Net benefit = TP/N − FP/N × t/(1−t) at threshold probability t, computed on each model's "
                   "probabilities <b>recalibrated on internal validation</b>: logit(risk) = a + b·logit(p), fitted "
                   "on the model's internal validation predictions (Firth-penalised) and applied unchanged to the "
                   "external cohort. Models trained with class weights or rebalancing synthetic rows do not output "
                   "risks; recalibration makes the threshold probability mean what it says. The internal panel is "
                   "in-sample for the recalibration. A model is useful where its curve lies above both treat-all "
                   "and treat-none.") + _table(["model", "recalibration a", "recalibration b", "validation cases"],
                                               rows, [1, 2, 3])


def _comparison_rows(ctx: _Context, models: Sequence[str], against: str | None = None) -> list[list[str]]:
    rows = []
    for c in ctx.metrics["comparisons"]:
        if c["a"] in models and (against is None or c["b"] == against):
            rows.append([f"<code>{_esc(c['a'])}</code>", f"<code>{_esc(c['b'])}</code>", _num(c["n"]),
                         _num(c.get("auc_a")), _num(c.get("auc_b")),
                         _ci(c.get("difference"), c.get("difference_ci")), _p(c.get("p")),
                         _esc({"delong": "DeLong", "bootstrap": "clustered bootstrap"}.get(c.get("method"), "–"))])
    return rows


_CMP_HEADERS = ["model", "vs", "cases", "AUC model", "AUC vs", "difference (95% CI)", "p", "test"]


def _ablation_section(ctx: _Context) -> str:
    if ctx.caller_skipped("ablations"):
        return _skipped(ctx.skipped["ablations"])
    present = [m for m in ABLATIONS if m in ctx.metrics["models"]]
    if len(present) < 2:
        return ctx.skip("ablations", "fewer than two of the ablation models "
                        f"({', '.join(ABLATIONS)}) have predictions")
    missing = [m for m in ABLATIONS if m not in present]
    rows, highlight = _model_rows(ctx, "external", present)
    out = _table(ctx.perf_headers(), rows, range(1, 9), highlight)
    out += ("<h3>Against the full pipeline, same external cases</h3>" +
            _table(_CMP_HEADERS, _comparison_rows(ctx, present, ctx.reference), range(2, 7)))
    synthetic = _comparison_rows(ctx, ["teacher"], "teacher_real_only")
    if synthetic:
        out += ("<h3>The teacher with against without synthetic images, same external cases</h3>" +
                _table(_CMP_HEADERS, synthetic, range(2, 7)))
    if missing:
        out += _skipped(f"ablation(s) without predictions: {', '.join(missing)}")
    return out


def _distillation_section(ctx: _Context) -> str:
    if ctx.caller_skipped("distillation"):
        return _skipped(ctx.skipped["distillation"])
    students = ctx.metrics.get("distillation") or {}
    if not students:
        return ctx.skip("distillation", "no student's training history was provided")
    rows = []
    for student, e in students.items():
        at = e["at_best_epoch"]
        gap = e.get("external_gap") or {}
        rows.append([f"<code>{_esc(student)}</code>", f"<code>{_esc(e['teacher'] or '–')}</code>",
                     f"{_esc(e['best_epoch'])} of {e['epochs_run']}", _num(at.get("val_auc")),
                     _num(at.get("agree_corr")), _num(at.get("agree_kl")), _pct(at.get("agree_top1")),
                     _num(gap.get("auc_a")), _num(gap.get("auc_b")),
                     _ci(gap.get("difference"), gap.get("difference_ci")), _p(gap.get("p"))])
    out = _table(["student", "teacher", "epoch kept", "internal AUC", "logit correlation", "KL (T=1)",
                  "top-1 agreement", "external AUC", "teacher's", "student − teacher (95% CI)", "p"],
                 rows, range(2, 11))
    out += ('<p class="note">Agreement with the teacher on the internal-validation images at the epoch kept: '
            "correlation of the logit margins (the ranking AUC scores), KL(teacher ‖ student) at temperature 1 "
            "(the probabilities, scale included) and the share of images put in the same class. A student that "
            "learns no teacher (the plain control) is measured against the same teacher: the difference is "
            "what distillation adds to what the labels alone give. The external difference is paired, on the "
            "same cases.</p>")
    png = figures.distillation_figure(ctx.inputs.distillation)
    if png:
        out += _figure(png, "Distillation curves", "Per epoch: internal-validation AUC, agreement with the "
                       "teacher (logit correlation), and the loss terms (cross-entropy and each distillation term).")
    return out


def _health_section(ctx: _Context) -> str:
    if not ctx.inputs.health:
        return ctx.skip("health", "no trained model's training history was provided")
    rows, flagged = [], []
    for network, entry in ctx.inputs.health.items():
        c, flags = entry["checks"], entry["flags"]
        if flags:
            flagged.append(len(rows))
        auc_range = (f"{_num(c.get('val_auc_min'))}–{_num(c.get('val_auc_max'))}"
                     if c.get("val_auc_min") is not None else "–")
        rows.append([f"<code>{_esc(network)}</code>", _num(c.get("epochs")), _num(c.get("constant_ce")),
                     _num(c.get("train_ce_last")),
                     f"{c.get('epochs_ce_not_below_constant', 0)} of {c.get('epochs_judged', 0)}", auc_range,
                     _num(c.get("longest_run_auc_below_half")), _num(c.get("max_auc_change")),
                     _num(c.get("auc_change_limit")), _esc("; ".join(FLAG_TEXT.get(f, f) for f in flags) or "healthy")])
    t = HealthThresholds()
    out = _table(["network", "epochs", "constant CE", "train CE (last)", "epochs CE ≥ constant",
                  "internal AUC range", "epochs in a row AUC < 0.5", "largest AUC change", "noise limit", "finding"],
                 rows, range(1, 9), highlight=flagged, row_class="flagged")
    out += ('<p class="note">Checked on each run\'s per-epoch history. Constant CE: the cross-entropy of the best '
            "constant prediction under the stage's class weights (ln 2 = 0.693 with balanced weights); the training "
            f"cross-entropy must be below it on at least half the epochs after warm-up (the first "
            f"{t.warmup_share:.0%} of epochs). Inverted: internal-validation AUC below 0.5 for {t.inverted_epochs} "
            "epochs in a row. Swing: an epoch-to-epoch change of the internal-validation AUC beyond "
            f"{t.swing_z:g} standard errors of the difference (each epoch's DeLong SE on the validation set).</p>")
    return out


def _baseline_section(ctx: _Context) -> str:
    if ctx.caller_skipped("baselines"):
        return _skipped(ctx.skipped["baselines"])
    present = [m for m in BASELINES if m in ctx.metrics["models"]]
    if not present:
        return ctx.skip("baselines", "no baseline predictions (An et al. 2025: clinical, deep_features, combined)")
    rows, highlight = _model_rows(ctx, "external", [*present, ctx.reference] if ctx.reference in ctx.metrics["models"]
                                  else present)
    out = _table(ctx.perf_headers(), rows, range(1, 9), highlight)
    out += "<h3>Comparisons (paired, external)</h3>" + _table(_CMP_HEADERS, _comparison_rows(ctx, present), range(2, 7))
    summary = ctx.inputs.baselines or {}
    clinical = summary.get("clinical")
    if clinical:
        ors = [[f"<code>{_esc(r['term'])}</code>", _esc(r.get("reference") or ""),
                _ci(r["odds_ratio"], [r["lo"], r["hi"]], 2),
                _p(r["p"])] for r in clinical["odds_ratios"]]
        uni = [[_esc(r["variable"]), _num(r["terms"]), _p(r["p"])] for r in clinical["univariate"]]
        out += ("<h3>Clinical model: odds ratios (final multivariate model)</h3>" +
                _table(["term", "reference level", "OR (95% CI)", "p (Wald)"], ors, [2, 3]) +
                f"<details><summary>Univariate screening (p &lt; {clinical['screen_p']} enters the multivariate "
                f"model; p &lt; {clinical['keep_p']} there is kept)</summary>" +
                _table(["variable", "terms", "p (likelihood ratio)"], uni, [1, 2]) + "</details>")
        out += "".join(f'<p class="note">{_esc(n)}</p>' for n in clinical.get("notes", []))
    elif "clinical" in summary.get("skipped", {}):
        out += "".join(f'<p class="skipped">{_esc(model)} model skipped: {_esc(why)}</p>'
                       for model, why in summary["skipped"].items())
    else:
        out += '<p class="note">Clinical model details (odds ratios) were not provided.</p>'
    deep = summary.get("deep_features")
    if deep:
        how = deep.get("features") or "not recorded (an older run)"
        out += (f"<h3>Deep-feature model</h3><p><b>How the features were made:</b> {_esc(how)}.</p>"
                f"<p>{_num(deep['n_features'])} penultimate CNN features → mRMR kept "
                f"{_num(deep['n_mrmr'])} → LASSO (C = {_num(deep['lasso_c'])}, one-SE rule) kept "
                f"{len(deep['selected'])}: <code>{_esc(', '.join(map(str, deep['selected'])))}</code>.</p>")
    combined = summary.get("combined")
    if combined:
        out += (f"<p>Combined model terms kept by LASSO (C = {_num(combined['lasso_c'])}): "
                f"<code>{_esc(', '.join(combined['terms']))}</code>.</p>")
    return out


def _readers_section(ctx: _Context) -> str:
    if ctx.caller_skipped("readers"):
        return _skipped(ctx.skipped["readers"])
    if ctx.reads is None or "readers" not in ctx.metrics:
        return ctx.skip("readers", "no reader reads were provided")
    rows = []
    for r in ctx.metrics["readers"]["comparisons"]:
        rows.append([_esc(r["reader"]), _esc(r["experience"]), r["cohort"], _num(r["n"]),
                     _ci(r["reader_sensitivity"], r["reader_sensitivity_ci"]), _num(r["model_sensitivity"]),
                     _p(r["p_sensitivity"]), _ci(r["reader_specificity"], r["reader_specificity_ci"]),
                     _num(r["model_specificity"]), _p(r["p_specificity"])])
    model = ctx.metrics["readers"]["model"]
    cut = ctx.config.birads_positive_from or birads_positive_from_default(ctx.inputs.label_names)
    return (f"<p>Each reader against <code>{_esc(model)}</code> at its fixed threshold "
            f"({_num(ctx.thresholds[model])}), on exactly the cases the reader read. Reader points are on the ROC "
            f"figure above. A BI-RADS read counts as {_esc(ctx.positive)} from category {cut.upper()} up.</p>" +
            _table(["reader", "experience", "cohort", "cases", "sens. reader", "sens. model", "p", "spec. reader",
                    "spec. model", "p"], rows, range(3, 10)) +
            '<p class="note">p: McNemar test on the paired calls (positives for sensitivity, negatives for '
            "specificity).</p>" + _reader_auc_table(ctx.metrics["readers"].get("auc") or []))


def _reader_auc_table(entries: Sequence[Mapping]) -> str:
    """Readers with a score (BI-RADS as an ordinal number, or a probability) beside every model, as AUCs."""
    rows = []
    for e in entries:
        for m in e.get("models", []):
            rows.append([_esc(e["reader"]), e["cohort"], _ci(e["auc"], e["auc_ci"]), f"<code>{_esc(m['model'])}</code>",
                         _num(m["n"]), _num(m["auc_model"]), _ci(m["difference"], m["difference_ci"]), _p(m["p"]),
                         _esc(m["method"])])
    if not rows:
        return ""
    return ("<p>Readers whose reads carry a score (the BI-RADS category as an ordinal number, or a probability) "
            "have an AUC of their own; each model is set beside them on exactly the cases both scored "
            "(difference = model − reader).</p>" +
            _table(["reader", "cohort", "AUC reader", "model", "cases", "AUC model", "difference", "p", "test"],
                   rows, range(4, 8)))


def _efficiency_section(ctx: _Context) -> str:
    if ctx.caller_skipped("efficiency"):
        return _skipped(ctx.skipped["efficiency"])
    models = ctx.metrics["models"]
    # torch and ONNX Runtime at batch 1 and 32 when measured: a speed-up compares the same runtime and batch
    grid = [(runtime, batch) for runtime in ("torch", "onnx") for batch in ("b1", "b32")
            if any(batch in (e.get("latency") or {}).get(runtime, {}) for e in models.values())]
    rows = []
    for model in ordered_models(models):
        e = models[model]
        if e["params"] is not None or e["latency_ms"] is not None:
            architecture = ctx.inputs.model_info.get(model, {}).get("architecture", "")
            speeds = ([_num((e.get("latency") or {}).get(runtime, {}).get(batch), 2) for runtime, batch in grid]
                      if grid else [_num(e["latency_ms"], 2)])
            rows.append([f"<code>{_esc(model)}</code>", _esc(architecture), _num(e["params"]), *speeds,
                         _num((e.get("external") or {}).get("auc"))])
    if not rows:
        return ctx.skip("efficiency", "no parameter counts or latencies were provided")
    runtime_names = {"torch": "torch", "onnx": "ONNX Runtime"}
    speed_headers = ([f"{runtime_names[r]}, batch {b[1:]} (ms / image)" for r, b in grid] if grid
                     else ["latency (ms / image)"])
    out = _table(["model", "architecture", "parameters", *speed_headers, "external AUC"], rows,
                 range(2, 3 + len(speed_headers)))
    if grid:
        out += ('<p class="note">CPU, one thread, per image. Compare models within one column: at batch 1 '
                "per-call overhead weighs most on small inputs.</p>")
    png = figures.efficiency_figure(ctx.metrics)
    if png:
        out += _figure(png, "AUC against parameters", "External AUC against parameter count.")
    how = {m: i.get("latency_how") for m, i in ctx.inputs.model_info.items() if i.get("latency_how")}
    if how:
        out += "".join(f'<p class="note"><code>{_esc(m)}</code>: {_esc(h)}</p>' for m, h in how.items())
    return out


def _synthetic_section(ctx: _Context) -> str:
    if ctx.caller_skipped("synthetic"):
        return _skipped(ctx.skipped["synthetic"])
    audit = ctx.inputs.synthetic
    if not audit:
        return ctx.skip("synthetic", "no synthetic-data audit was provided")
    labels = {"fid": "FID (lower is closer to real)", "kid": "KID (lower is closer to real)",
              "conditional_accuracy": "conditional balanced accuracy (a classifier trained on real images "
                                      "recovers the requested label)",
              "conditional_accuracy_real": "the same classifier's balanced accuracy on real validation images",
              "conditional_auc": "conditional AUC (that classifier's score for the requested label)",
              "conditional_auc_ci": "conditional AUC, 95% CI (DeLong)",
              "trtr_auc": "the same classifier's AUC on real validation images",
              "label_threshold": "that classifier's threshold (Youden, real training images)",
              "label_effect": f"label pairs: mean rise of that classifier's probability of {ctx.positive} from the "
                              f"{ctx.negative}- to the {ctx.positive}-conditioned image (same noise, mask, conditions)",
              "label_effect_ci": "label pairs: 95% CI of that rise",
              "label_effect_positive_share": "label pairs: share of pairs where it rose",
              "label_pairs": "label pairs generated",
              "near_copies": "near copies of training images",
              "tstr_auc": "TSTR AUC (train on synthetic, test on real)"}

    def value(v) -> str:
        if isinstance(v, float):
            return _num(v, 4)
        if isinstance(v, list):  # an interval
            return " to ".join(_num(x, 3) for x in v)
        return str(v)

    rows = [[_esc(labels.get(k, k)), _esc(value(v))] for k, v in audit.items() if not isinstance(v, dict)]
    out = _table(["measure", "value"], rows, [1])
    if ctx.grids:
        out += '<div class="grid">' + "".join(
            _figure(png, f"synthetic sample grid {name}", _esc(name)) for name, png in ctx.grids) + "</div>"
    else:
        out += _skipped(ctx.inputs.skipped.get("synthetic_grids", "no synthetic image grids were provided"))
    return out


def _limitations_section(ctx: _Context) -> str:
    items = [f"<b>{_esc(SECTIONS[k])}</b> skipped: {_esc(v)}" for k, v in ctx.skipped.items()]
    items += [_esc(note[:1].upper() + note[1:]) for note in ctx.inputs.notes]  # stages left out and data set aside
    ref = ctx.metrics["models"].get(ctx.reference, {})
    ext = ref.get("external") or {}
    if ext.get("n_pos") is not None and ext["n_pos"] < 100:
        items.append(f"The external cohort holds {ext['n_pos']} cases of {_esc(ctx.positive)}: confidence intervals "
                     "are wide and small differences between models are not resolvable.")
    if ext and not ref.get("per_center"):
        items.append("No per-center breakdown was possible.")
    items.append("Retrospective data; p values are not adjusted for the number of comparisons.")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _reproducibility_section(ctx: _Context, predictions_sha256: str, versions: Mapping[str, str]) -> str:
    out = _table(["package", "version"], [[_esc(k), _esc(v)] for k, v in versions.items()])
    out += (f"<p><code>predictions.parquet</code> sha256 <code>{predictions_sha256}</code>. Rebuild this page with "
            "<code>diffkd report --predictions report/predictions.parquet --out NEW_DIR</code>.</p>")
    settings = yaml.safe_dump(dataclasses.asdict(ctx.config), sort_keys=False)
    out += f"<h3>Evaluation settings</h3><pre>{_esc(settings)}</pre>"
    if ctx.inputs.config:
        out += "<h3>Experiment config</h3><pre>" + _esc(yaml.safe_dump(ctx.inputs.config, sort_keys=False)) + "</pre>"
    else:
        out += '<p class="note">The experiment config was not provided.</p>'
    return out


# (anchor, heading, TRIPOD+AI item, builder)
_SECTIONS = [
    ("summary", "Summary", "TRIPOD+AI 1–2", _summary_section),
    ("model", "Model details and intended use", "items 3, 5, 7, 8", _model_details_section),
    ("data", "Data and participants", "items 5, 20", _data_section),
    ("methods", "Analysis methods", "items 12, 18", _methods_section),
    ("discrimination", "Discrimination", "item 23", _discrimination_section),
    ("per-center", "Per-center performance", "items 23, 24", _per_center_section),
    ("calibration", "Calibration", "item 23", _calibration_section),
    ("decision", "Clinical utility", "item 23", _decision_section),
    ("ablations", "Ablations", "item 23", _ablation_section),
    ("baselines", "Baselines (An et al. 2025)", "items 12, 22", _baseline_section),
    ("readers", "Reader study", "item 23", _readers_section),
    ("distillation", "Distillation", "item 10", _distillation_section),
    ("health", "Training health", "item 10", _health_section),
    ("efficiency", "Model size and speed", "item 22", _efficiency_section),
    ("synthetic", "Synthetic-data audit", "item 9", _synthetic_section),
]


def render_html(ctx: _Context, predictions_sha256: str) -> str:
    versions = package_versions()
    body, nav = [], []
    sections = [*_SECTIONS, ("limitations", "Limitations and skipped analyses", "item 26", _limitations_section),
                ("reproducibility", "Reproducibility", "items 14, 18, 27", None)]
    for anchor, heading, item, builder in sections:
        content = builder(ctx) if builder else _reproducibility_section(ctx, predictions_sha256, versions)
        nav.append(f'<li><a href="#{anchor}">{_esc(heading)}</a></li>')
        body.append(f'<section id="{anchor}"><h2>{_esc(heading)}<span class="tripod">{_esc(item)}</span></h2>'
                    f"{content}</section>")
    ds = ctx.inputs.dataset
    subtitle = [f"<p>Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by diffkd "
                f"{_esc(versions['diffkd'])}. Reference model: <code>{_esc(ctx.reference)}</code>.</p>"]
    if ds.get("name"):
        subtitle.insert(0, f"<p>Dataset: {_esc(ds['name'])}</p>")
    return string.Template(TEMPLATE.read_text()).substitute(
        title=_esc(ctx.inputs.title), version=_esc(versions["diffkd"]), subtitle="\n".join(subtitle),
        nav="\n".join(nav), body="\n".join(body))


# --------------------------------------------------------------------------------------------------
# Writing


def _read_grids(paths: Sequence[str]) -> list[tuple[str, bytes]]:
    grids = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"synthetic image grid {path} does not exist") from None
        if not data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"synthetic image grid {path} is not a PNG file")
        name, taken = Path(path).name, {n for n, _ in grids}
        for k in range(2, len(paths) + 2):  # same file name from two folders: keep both
            if name not in taken:
                break
            name = f"{Path(path).stem}_{k}.png"
        grids.append((name, data))
    return grids


def write_report(out_dir: str | os.PathLike, predictions: pd.DataFrame, inputs: ReportInputs | None = None,
                 readers: pd.DataFrame | str | os.PathLike | None = None,
                 config: EvaluateConfig | None = None) -> ReportFiles:
    """Build `out_dir/report/` (index.html, metrics.json, predictions.parquet, ...) from predictions.

    readers: a CSV path or a DataFrame in the readers CSV format (see readers.load_readers).
    config: evaluation settings; default from `inputs.evaluate`, else EvaluateConfig().
    """
    inputs = inputs or ReportInputs()
    config = config or from_dict(EvaluateConfig, inputs.evaluate, "evaluate")
    inputs.evaluate = dataclasses.asdict(config)
    report_dir = Path(out_dir) / "report"
    preds = validate_predictions(predictions)
    reads = None
    if readers is not None:
        cut = config.birads_positive_from or birads_positive_from_default(inputs.label_names)
        reads = load_readers(readers, birads_positive_from=cut,
                             probability_threshold=config.reader_probability_threshold)
    truth = None
    if inputs.truth:  # the one place truth is read: training stages never see it
        truth = load_truth(inputs.truth, preds.case_id.unique(), inputs.dataset.get("path"))
    metrics = build_metrics(preds, model_info=inputs.model_info, synthetic=inputs.synthetic, readers=reads,
                            baselines=inputs.baselines, config=config, truth=truth, label_names=inputs.label_names,
                            distillation=inputs.distillation)
    attach_health(metrics["models"], inputs.health)
    ctx = _Context(preds=preds, metrics=metrics, inputs=inputs, config=config,
                   thresholds=fit_thresholds(preds, config.threshold_rule), reads=reads,
                   grids=_read_grids(inputs.synthetic_grids))

    # every file is written into a staging folder that then replaces the whole report folder in one
    # step: a crash leaves the old report or the new one, and no stale file of an earlier report stays
    with staged_directory(report_dir) as stage:
        preds.to_parquet(stage / "predictions.parquet", index=False)
        digest = hashlib.sha256((stage / "predictions.parquet").read_bytes()).hexdigest()
        # names from the data (centers, outcomes, models) are shown as written: a "$" is no mathtext
        with matplotlib.rc_context({"text.parse_math": False}):
            page = render_html(ctx, digest)  # also records the skipped sections in ctx.skipped
        metrics["skipped"] = dict(ctx.skipped)
        metrics["initialised_from"] = dict(inputs.initialised_from)
        metrics["predictions_sha256"] = digest
        (stage / "metrics.json").write_bytes(json.dumps(metrics, indent=2, allow_nan=False).encode())
        saved = dataclasses.asdict(inputs)
        saved["synthetic_grids"] = [f"grids/{name}" for name, _ in ctx.grids]
        # local paths relative to the report folder, so the folder names no absolute path of this machine
        if saved["dataset"].get("path"):
            saved["dataset"] = {**saved["dataset"], "path": _relative_to(saved["dataset"]["path"], report_dir)}
        if saved["truth"]:
            saved["truth"] = _relative_to(saved["truth"], report_dir)
        if ctx.grids:
            (stage / "grids").mkdir()
        for name, png in ctx.grids:
            (stage / "grids" / name).write_bytes(png)
        (stage / INPUTS_FILE).write_bytes(json.dumps(jsonable(saved), indent=2, allow_nan=False).encode())
        if reads is not None:
            (stage / READERS_FILE).write_bytes(reads.drop(columns="basis").assign(call=reads.call.astype(int))
                                               .to_csv(index=False).encode())
        (stage / "index.html").write_bytes(page.encode("utf-8"))
    log.info("report written to %s", report_dir / "index.html")
    return ReportFiles(report_dir / "index.html", report_dir / "metrics.json", report_dir / "predictions.parquet")


def attach_health(models: dict, health: Mapping[str, dict]) -> None:
    """Each model's training health as models.<name>.health; the deep-feature model's is its extractors' (one
    per cross-fitting fold, `<stage>_fold<k>`), their checks by fold and their flags named with the fold."""
    for network, entry in health.items():
        if network in models:
            models[network]["health"] = entry
        elif network.startswith(DEEP_FEATURE_EXTRACTOR) and "deep_features" in models:
            merged = models["deep_features"].setdefault("health", {"checks": {}, "flags": []})
            merged["checks"][network] = entry["checks"]
            merged["flags"] += [f"{flag} ({network})" for flag in entry["flags"]]


def rebuild_report(predictions_path: str | os.PathLike, out_dir: str | os.PathLike,
                   inputs_path: str | os.PathLike | None = None, readers_path: str | os.PathLike | None = None,
                   config: EvaluateConfig | None = None, title: str | None = None, truth: str | None = None,
                   dataset: str | None = None) -> ReportFiles:
    """Rebuild a report from a predictions.parquet and, by default, the report_inputs.json and readers.csv
    found beside it (what `write_report` leaves). `truth` and `dataset` replace the stored truth file
    and the dataset its case ids are mapped with."""
    predictions_path = Path(predictions_path)
    try:
        preds = pd.read_parquet(predictions_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"predictions file {predictions_path} does not exist") from None
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise ValueError(f"{predictions_path}: not a readable Parquet file ({err})") from err
    beside = predictions_path.parent
    if inputs_path is None and (beside / INPUTS_FILE).exists():
        inputs_path = beside / INPUTS_FILE
    inputs = ReportInputs.load(inputs_path) if inputs_path else ReportInputs()
    if title:
        inputs.title = title
    if truth:
        inputs.truth = str(Path(truth).resolve())
    if dataset:
        inputs.dataset = {**inputs.dataset, "path": str(dataset)}
    if readers_path is None and (beside / READERS_FILE).exists():
        readers_path = beside / READERS_FILE
    # copy grids out first: they may live in the very directory being rewritten
    with tempfile.TemporaryDirectory() as tmp:
        copies = []
        for path in inputs.synthetic_grids:
            if Path(path).exists():
                copies.append(shutil.copy(path, Path(tmp) / Path(path).name))
            else:
                copies.append(path)  # write_report names the missing file
        inputs.synthetic_grids = [str(p) for p in copies]
        return write_report(out_dir, preds, inputs, readers_path, config)
