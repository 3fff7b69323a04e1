"""Leave-one-center-out validation as one distributed job: one Ray Tune trial per held-out center.

    leave_one_center_out("out/data", TeacherConfig(...), "out/loco", parallel=2)

Each trial is the ordinary teacher stage (`train_teacher` -> the shared loop's TorchTrainer) on the
other centers, with its internal validation drawn from them and the held-out center as its only
external set. Trials run in parallel as far as the cluster holds them (`diffkd.tune.plan_concurrency`
sizing, so a 2-CPU machine never starts a trial whose workers cannot be placed). A center added
later (`diffkd ingest` into the same dataset) gets its fold on the next call, and the other folds,
whose training sets it joins, are trained again; folds whose inputs did not change are kept, and an
interrupted job continues where it stopped.

Outputs in `out_dir`: `folds/<center>/` (the fold's teacher, predictions.parquet, training.json),
`loco.csv` (one row per held-out center: cases, positives (label 1), external AUC with its DeLong 95% CI,
internal-validation AUC), `loco_auc.png` (the same as a forest plot, with the pooled AUC over every
fold's external cases), and one Tune experiment per call (`experiment-<time>/`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from diffkd.config import from_dict, to_dict
from diffkd.data.schema import DEFAULT_LABEL_NAMES
from diffkd.files import atomic_write_json

if TYPE_CHECKING:
    import pandas as pd

    from diffkd.train.teacher import TeacherConfig

log = logging.getLogger(__name__)

EXPERIMENT = "experiment"
FOLDS = "folds"
PREDICTIONS = "predictions.parquet"
FOLD_INFO = "fold.json"  # what the fold was trained on; a fold whose inputs changed is trained again


@dataclass
class LocoOutcome:
    out_dir: str
    table: "pd.DataFrame"  # one row per held-out center, then a pooled row
    parallel: int  # trials that were allowed to run at once
    wall_s: float
    files: dict[str, str] = field(default_factory=dict)


def fold_dir(out_dir: str, center: str) -> str:
    return os.path.join(out_dir, FOLDS, center)


def run_fold(params: dict[str, Any], *, dataset: str, teacher: dict, out_dir: str, val_fraction: float,
             seed: int) -> None:
    """Tune's trainable: the teacher stage with `params["held_out"]` as the only external center."""
    import ray.tune

    from diffkd.data.splits import dataset_splits
    from diffkd.train.teacher import TeacherConfig, train_teacher

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
    from diffkd.data.dataset import ImageDataset
    from diffkd.runstate import fingerprint

    centers = {name: entry["files"] for name, entry in ImageDataset(dataset).manifest["centers"].items()}
    return fingerprint({"centers": centers, "teacher": teacher, "val_fraction": val_fraction, "seed": seed})


def fold_is_current(folder: str, key: str) -> bool:
    """True when `folder` holds a finished fold trained on exactly what `key` describes."""
    path = os.path.join(folder, FOLD_INFO)
    if not (os.path.exists(path) and os.path.exists(os.path.join(folder, PREDICTIONS))):
        return False
    with open(path) as f:
        return json.load(f).get("key") == key


def fold_predictions(out_dir: str, center: str) -> "pd.DataFrame":
    import pandas as pd

    return pd.read_parquet(os.path.join(fold_dir(out_dir, center), PREDICTIONS))


def fold_row(center: str, preds: "pd.DataFrame") -> dict[str, Any]:
    """The held-out center's external AUC (DeLong 95% CI) and the fold's internal-validation AUC."""
    from diffkd.evaluate.metrics import auc_delong_ci
    from diffkd.train.teacher import auc_or_nan

    external = preds[preds["split"] == "test"]
    internal = preds[preds["split"] == "val"]
    row: dict[str, Any] = {"held_out": center, "cases": len(external), "positives": int(external["label"].sum())}
    if external["label"].nunique() == 2:
        estimate = auc_delong_ci(external["label"], external["prob"])
        row.update(external_auc=estimate.auc, ci_low=estimate.ci[0], ci_high=estimate.ci[1])
    else:  # a center with one class has no AUC; say so in the table instead of failing the job
        row.update(external_auc=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
    row["internal_auc"] = auc_or_nan(internal["label"].tolist(), internal["prob"].tolist())
    return row


def leave_one_center_out(dataset: str, cfg: "TeacherConfig", out_dir: str, *, parallel: int = 0,
                         val_fraction: float = 0.2, seed: int = 0) -> LocoOutcome:
    """Train one teacher per held-out center, `parallel` at a time (0 = as many as the cluster holds)."""
    import ray
    from ray import tune

    from diffkd.data.dataset import ImageDataset
    from diffkd.data.splits import leave_one_center_out as folds_of
    from diffkd.raycompat import init as ray_init
    from diffkd.tune import DRIVER_CPUS, placement_group_sweeper, settle_placement_groups, trial_footprint, trials_that_fit

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
    grid = tuner.fit()
    settle_placement_groups()
    failed = [str(r.error).splitlines()[0] for r in grid if r.error]
    if failed:
        raise RuntimeError(f"{len(failed)} fold(s) failed: {'; '.join(failed)}; rerun the same command to retry them")
    table = summarize(out_dir, centers)
    files = write_outputs(out_dir, table)
    return LocoOutcome(out_dir=out_dir, table=table, parallel=concurrent, wall_s=time.perf_counter() - start,
                       files=files)


def summarize(out_dir: str, centers: list[str]) -> "pd.DataFrame":
    """One row per held-out center and a pooled row over every fold's external cases."""
    import pandas as pd

    from diffkd.evaluate.metrics import auc_delong_ci

    folds = {center: fold_predictions(out_dir, center) for center in centers}
    rows = [fold_row(center, preds) for center, preds in folds.items()]
    pooled = pd.concat([preds[preds["split"] == "test"] for preds in folds.values()], ignore_index=True)
    estimate = auc_delong_ci(pooled["label"], pooled["prob"])
    rows.append({"held_out": "pooled", "cases": len(pooled), "positives": int(pooled["label"].sum()),
                 "external_auc": estimate.auc, "ci_low": estimate.ci[0], "ci_high": estimate.ci[1],
                 "internal_auc": float("nan")})
    return pd.DataFrame(rows)


def format_table(table: "pd.DataFrame", positive_name: str = DEFAULT_LABEL_NAMES[1]) -> str:
    """The LOCO table for a terminal; `positive_name` heads the count of label-1 cases (the dataset's name)."""
    width = max(5, len(positive_name))
    lines = [f"{'held-out center':<16} {'cases':>5} {positive_name:>{width}}  {'external AUC (95% CI)':<22} "
             f"{'internal AUC':>12}"]
    for _, r in table.iterrows():
        ext = "n/a (one class)" if math.isnan(r["external_auc"]) else (
            f"{r['external_auc']:.3f} ({r['ci_low']:.3f}-{r['ci_high']:.3f})")
        internal = "" if math.isnan(r["internal_auc"]) else f"{r['internal_auc']:.3f}"
        lines.append(f"{r['held_out']:<16} {r['cases']:>5} {r['positives']:>{width}}  {ext:<22} {internal:>12}")
    return "\n".join(lines)


def write_outputs(out_dir: str, table: "pd.DataFrame") -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffkd.files import atomic_write_text, save_figure

    files = {"table": os.path.join(out_dir, "loco.csv"), "plot": os.path.join(out_dir, "loco_auc.png")}
    atomic_write_text(files["table"], table.to_csv(index=False))
    shown = table.dropna(subset=["external_auc"]).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(shown) + 1.4))
    y = range(len(shown))
    for position, (_, row) in zip(y, shown.iterrows()):
        ax.errorbar(row["external_auc"], position, fmt="o", capsize=3,
                    xerr=[[row["external_auc"] - row["ci_low"]], [row["ci_high"] - row["external_auc"]]],
                    color="black" if row["held_out"] == "pooled" else "tab:blue")
    ax.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(list(y), [f"{c} (n={n})" for c, n in zip(shown["held_out"], shown["cases"])])
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUC on the held-out center (DeLong 95% CI)")
    ax.set_title("Leave-one-center-out")
    fig.tight_layout()
    save_figure(fig, files["plot"])
    return files
