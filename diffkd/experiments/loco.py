"""Leave-one-center-out validation as one distributed job: one Ray Tune trial per held-out center.

    leave_one_center_out("out/data", TeacherConfig(...), "out/loco", parallel=2)

Each trial is the ordinary teacher stage (`train_teacher` -> the shared loop's TorchTrainer) on the
other centers, with its internal validation drawn from them and the held-out center as its only
external set. Trials run in parallel as far as the cluster holds them (`diffkd.experiments.tune.plan_concurrency`
sizing, so a 2-CPU machine never starts a trial whose workers cannot be placed). A center added
later (`diffkd ingest` into the same dataset) gets its fold on the next call, and the other folds,
whose training sets it joins, are trained again; folds whose inputs did not change are kept, and an
interrupted job continues where it stopped.

Outputs in `out_dir`: `folds/<center>/` (the fold's teacher, predictions.parquet, training.json),
`loco.csv` (one row per held-out center: cases, positives (label 1), external AUC with its 95% CI, internal-
validation AUC, random-effects weight; then the pooled row), `loco_pooled.json` (the pooled AUC and
its heterogeneity), `loco_auc.png` (the same as a forest plot), and one Tune experiment per call
(`experiment-<time>/`).

Each fold is a different model scored on a different center, so the folds' scores are not pooled
into one ROC curve: the pooled AUC is a random-effects meta-analysis of the folds' AUCs
(DerSimonian-Laird on logit AUC, each fold's variance from its own CI method: DeLong, or the
patient-clustered bootstrap where a patient has several cases), with tau^2 and I^2 for how much the
centers differ.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from diffkd.config import from_dict, to_dict
from diffkd.data.dataset import ImageDataset
from diffkd.data.source_cache import shared_source_cache
from diffkd.data.splits import dataset_splits, leave_one_center_out as folds_of
from diffkd.evaluate.metrics import CIOptions, auc_or_nan, auc_with_ci, pooled_auc
from diffkd.evaluate.summary import jsonable
from diffkd.experiments.runstate import outputs_current
from diffkd.experiments.tune import DRIVER_CPUS, trial_footprint, trials_that_fit
from diffkd.runtime.digest import fingerprint
from diffkd.runtime.files import atomic_write_json, atomic_write_text, save_figure
from diffkd.runtime.placement import placement_group_sweeper, settle_placement_groups
from diffkd.runtime.raycompat import init as ray_init
from diffkd.train.teacher import TeacherConfig, train_teacher

log = logging.getLogger(__name__)

EXPERIMENT = "experiment"
FOLDS = "folds"
PREDICTIONS = "predictions.parquet"
FOLD_INFO = "fold.json"  # what the fold was trained on; a fold whose inputs changed is trained again


@dataclass
class LocoOutcome:
    out_dir: str
    table: pd.DataFrame  # one row per held-out center, then a pooled row
    pooled: dict  # the random-effects pooled AUC and its heterogeneity (loco_pooled.json)
    parallel: int  # trials that were allowed to run at once
    wall_s: float
    files: dict[str, str] = field(default_factory=dict)


def fold_dir(out_dir: str, center: str) -> str:
    return os.path.join(out_dir, FOLDS, center)


def run_fold(params: dict[str, Any], *, dataset: str, teacher: dict, out_dir: str, val_fraction: float,
             seed: int) -> None:
    """Tune's trainable: the teacher stage with `params["held_out"]` as the only external center."""
    import ray.tune

    center = params["held_out"]
    target = fold_dir(out_dir, center)
    key = fold_key(dataset, teacher, val_fraction, seed)
    if not fold_is_current(target, key):
        cfg = from_dict(TeacherConfig, teacher, "teacher")
        runs = os.path.join(out_dir, "checkpoints")
        name = f"fold-{center}-{key[:10]}"
        loop = dataclasses.replace(cfg.loop, storage_path=runs, run_name=name,
                                   resume=os.path.isdir(os.path.join(runs, name)))
        assignments = dataset_splits(dataset, [center], val_fraction=val_fraction, seed=seed, synthetic=False)
        train_teacher(dataset, assignments, dataclasses.replace(cfg, loop=loop), target)
        atomic_write_json(os.path.join(target, FOLD_INFO), {"key": key, "held_out": center})
    row = fold_row(center, fold_predictions(out_dir, center))
    ray.tune.report({k: v for k, v in row.items() if isinstance(v, (int, float))})


def fold_key(dataset: str, teacher: dict, val_fraction: float, seed: int) -> str:
    """What a fold's result depends on: every center's files (a new or re-ingested center changes the
    training set of every other fold), the teacher config and the split settings."""
    centers = {name: entry["files"] for name, entry in ImageDataset(dataset).manifest["centers"].items()}
    return fingerprint({"centers": centers, "teacher": teacher, "val_fraction": val_fraction, "seed": seed})


def fold_is_current(folder: str, key: str) -> bool:
    """True when `folder` holds a finished fold trained on exactly what `key` describes."""
    return outputs_current(folder, FOLD_INFO, PREDICTIONS, key)


def fold_predictions(out_dir: str, center: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(fold_dir(out_dir, center), PREDICTIONS))


def fold_row(center: str, preds: pd.DataFrame) -> dict[str, Any]:
    """The held-out center's external AUC (95% CI, standard error; DeLong, or the patient-clustered
    bootstrap where a patient has several cases) and the fold's internal-validation AUC."""
    external = preds[preds["split"] == "test"]
    internal = preds[preds["split"] == "val"]
    row: dict[str, Any] = {"held_out": center, "cases": len(external), "positives": int(external["label"].sum())}
    if external["label"].nunique() == 2:
        patients = external["patient_id"].to_numpy() if "patient_id" in external.columns else None
        estimate = auc_with_ci(external["label"].to_numpy(), external["prob"].to_numpy(), CIOptions("auto"),
                               groups=patients)
        row.update(external_auc=estimate.auc, ci_low=estimate.ci[0], ci_high=estimate.ci[1], se=estimate.se,
                   ci_method=estimate.method)
    else:  # a center with one class has no AUC; say so in the table instead of failing the job
        row.update(external_auc=float("nan"), ci_low=float("nan"), ci_high=float("nan"), se=float("nan"),
                   ci_method="")
    row["internal_auc"] = auc_or_nan(internal["label"].tolist(), internal["prob"].tolist())
    return row


def leave_one_center_out(dataset: str, cfg: TeacherConfig, out_dir: str, *, parallel: int = 0,
                         val_fraction: float = 0.2, seed: int = 0) -> LocoOutcome:
    """Train one teacher per held-out center, `parallel` at a time (0 = as many as the cluster holds)."""
    import ray
    from ray import tune

    start = time.perf_counter()
    ds = ImageDataset(dataset)
    centers = [held_out for held_out, _ in folds_of(ds.centers())]
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.join(out_dir, FOLDS), exist_ok=True)
    ray_init()
    capacity = trials_that_fit(cfg, ray.cluster_resources())
    concurrent = min(parallel or capacity, capacity, len(centers))
    if parallel > capacity:
        log.warning("parallel=%d but the cluster holds %d fold(s) at once; running %d", parallel, capacity, capacity)
    footprint = trial_footprint(cfg)
    log.info("leave-one-center-out over %d centers, %d at a time (each fold: %g CPU, %g GPU)", len(centers),
             concurrent, footprint["CPU"], footprint["GPU"])
    trainable = tune.with_resources(
        tune.with_parameters(run_fold, dataset=str(ds.uri), teacher=to_dict(cfg), out_dir=out_dir,
                             val_fraction=val_fraction, seed=seed),
        {"CPU": DRIVER_CPUS})
    # A new Tune experiment per call: folds whose inputs are unchanged return at once (their predictions
    # are on disk), unfinished ones resume from their checkpoints, and a center added since gets its fold.
    experiment = f"{EXPERIMENT}-{time.strftime('%Y%m%d-%H%M%S')}"
    tuner = tune.Tuner(
        trainable, param_space={"held_out": tune.grid_search(centers)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=experiment, storage_path=out_dir, callbacks=[placement_group_sweeper()],
                                  failure_config=tune.FailureConfig(max_failures=1)))
    with shared_source_cache():  # a center's images are decoded once for all the folds that train on it
        grid = tuner.fit()
    settle_placement_groups()
    failed = [str(r.error).splitlines()[0] for r in grid if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} fold(s) failed: {'; '.join(failed)}; rerun the same command to retry them")
    table, pooled = summarize(out_dir, centers)
    files = write_outputs(out_dir, table, pooled)
    return LocoOutcome(out_dir=out_dir, table=table, pooled=pooled, parallel=concurrent,
                       wall_s=time.perf_counter() - start, files=files)


def summarize(out_dir: str, centers: list[str]) -> tuple[pd.DataFrame, dict]:
    """One row per held-out center and a random-effects pooled row; the pooling details as a dict."""
    rows = [fold_row(center, fold_predictions(out_dir, center)) for center in centers]
    return pool_folds(rows)


def pool_folds(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict]:
    """DerSimonian-Laird pooling of the folds' external AUCs (logit scale). Folds without an AUC (one
    class) or with an AUC of exactly 0 or 1 (no finite logit, zero variance) stay out, named."""

    usable = [r for r in rows if 0 < r["external_auc"] < 1 and r["se"] > 0]  # NaN compares False: left out
    left_out = [r["held_out"] for r in rows if r not in usable]
    for r in rows:
        r["weight"] = float("nan")
    pooled_row = {"held_out": "pooled", "cases": sum(r["cases"] for r in usable),
                  "positives": sum(r["positives"] for r in usable), "external_auc": float("nan"),
                  "ci_low": float("nan"), "ci_high": float("nan"), "se": float("nan"),
                  "ci_method": "random effects (DerSimonian-Laird, logit AUC)", "internal_auc": float("nan"),
                  "weight": float("nan")}
    info: dict[str, Any] = {"method": "random effects, DerSimonian-Laird, on logit AUC; each fold's variance from "
                                      "its own AUC standard error (delta method)",
                            "folds": [r["held_out"] for r in usable], "left_out": left_out}
    if usable:
        pooled = pooled_auc([r["external_auc"] for r in usable], [r["se"] for r in usable])
        for r, w in zip(usable, pooled.weights):
            r["weight"] = w
        pooled_row.update(external_auc=pooled.auc, ci_low=pooled.ci[0], ci_high=pooled.ci[1], weight=1.0)
        info.update(auc=pooled.auc, ci=list(pooled.ci), logit=pooled.logit, se_logit=pooled.se_logit,
                    tau2=pooled.tau2, i2=pooled.i2, q=pooled.q, p_heterogeneity=pooled.p_heterogeneity, k=pooled.k)
    else:
        info["note"] = "no fold has an external AUC strictly between 0 and 1: nothing to pool"
    if left_out:
        log.warning("left out of the pooled AUC: %s (one class, or an AUC of 0 or 1)", ", ".join(left_out))
    return pd.DataFrame([*rows, pooled_row]), info


def format_table(table: pd.DataFrame, pooled: dict | None = None, positive_name: str = "pos.") -> str:
    """The LOCO table for a terminal; `positive_name` (the dataset's name of label 1) heads the
    column counting label-1 cases (the `positives` column of loco.csv)."""
    width = max(5, len(positive_name))
    lines = [f"{'held-out center':<16} {'cases':>5} {positive_name:>{width}}  {'external AUC (95% CI)':<22} "
             f"{'internal AUC':>12} {'RE weight':>9}"]
    for _, r in table.iterrows():
        ext = ("n/a (one class)" if r["held_out"] != "pooled" else "n/a") if math.isnan(r["external_auc"]) else (
            f"{r['external_auc']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})")
        internal = "" if math.isnan(r["internal_auc"]) else f"{r['internal_auc']:.3f}"
        weight = "" if math.isnan(r["weight"]) or r["held_out"] == "pooled" else f"{100 * r['weight']:.0f}%"
        lines.append(f"{r['held_out']:<16} {r['cases']:>5} {r['positives']:>{width}}  {ext:<22} {internal:>12} "
                     f"{weight:>9}")
    if pooled and "tau2" in pooled:
        lines.append(f"pooled: random effects (DerSimonian-Laird, logit AUC) over {pooled['k']} fold(s); "
                     f"I^2 = {100 * pooled['i2']:.0f}%, tau^2 = {pooled['tau2']:.4f}, "
                     f"heterogeneity p = {pooled['p_heterogeneity']:.3g}")
    if pooled and pooled.get("left_out"):
        lines.append(f"left out of the pooled AUC (one class, or AUC 0 or 1): {', '.join(pooled['left_out'])}")
    return "\n".join(lines)


def write_outputs(out_dir: str, table: pd.DataFrame, pooled: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {"table": os.path.join(out_dir, "loco.csv"), "pooled": os.path.join(out_dir, "loco_pooled.json"),
             "plot": os.path.join(out_dir, "loco_auc.png")}
    atomic_write_text(files["table"], table.to_csv(index=False))
    atomic_write_json(files["pooled"], jsonable(pooled))
    shown = table.dropna(subset=["external_auc"]).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(shown) + 1.6))
    y = range(len(shown))
    for position, (_, row) in zip(y, shown.iterrows()):
        if row["held_out"] == "pooled":  # the meta-analytic diamond spans the pooled CI
            ax.fill([row["ci_low"], row["external_auc"], row["ci_high"], row["external_auc"]],
                    [position, position + 0.3, position, position - 0.3], color="black")
            continue
        size = 4 + 10 * math.sqrt(row["weight"]) if math.isfinite(row["weight"]) else 4
        ax.errorbar(row["external_auc"], position, fmt="s", ms=size, capsize=3, color="tab:blue",
                    xerr=[[row["external_auc"] - row["ci_low"]], [row["ci_high"] - row["external_auc"]]])
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    labels = [f"random-effects pooled (k={pooled.get('k', 0)})" if c == "pooled" else f"{c} (n={n})"
              for c, n in zip(shown["held_out"], shown["cases"])]
    ax.set_yticks(list(y), labels)
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUC on the held-out center (95% CI)\nmarker size: random-effects weight")
    title = "Leave-one-center-out"
    if "tau2" in pooled:
        title += f"\nDerSimonian-Laird on logit AUC: I² = {100 * pooled['i2']:.0f}%, τ² = {pooled['tau2']:.3f}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, files["plot"])
    return files
