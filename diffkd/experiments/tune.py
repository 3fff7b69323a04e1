"""Ray Tune over the student stage: temperature and loss weights, ASHA + Optuna, internal AUC only.

    tune_student(dataset, splits, StudentConfig(...), load_space("tune_spaces/kd.yaml"), out_dir)

Each trial is a driver function that runs the ordinary student stage (`train_student` -> the shared
loop's TorchTrainer) with Tune's `TuneReportCallback`, the Train V2 way. The driver itself holds a
sliver of a CPU; the Train workers and the Ray Data pipeline hold the real resources, and the number
of trials in flight is sized so that every started trial can get them (a trial whose workers cannot
be placed would wait forever: the deadlock seen on 2 CPUs, docs/design.md "Logical CPUs above the
physical ones").

The objective is the internal-validation metric the space names (`val_auc`, per case as the report
scores). Trials are handed the train and val rows of the splits table and nothing else: the external
centers never reach a trial.

Outputs in `out_dir`: `trials.csv` (one row per trial), `curves.csv` (every epoch of every trial),
`objective_vs_params.png`, `learning_curves.png`, `best_config.yaml` (the `student` section with
the best values, ready for the final student: `diffkd train student --config best_config.yaml`), and the
Tune experiment `search/` that `resume=True` continues after an interruption. Space paths are
relative to the student section (`distill.terms.logit.temperature`, `loop.lr`,
`pipeline.synthetic_ratio`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import yaml

from diffkd.config import ConfigError, from_dict, load_yaml, to_dict
from diffkd.data.dataset import ImageDataset
from diffkd.data.pipeline import required_cpus
from diffkd.data.source_cache import shared_source_cache
from diffkd.distill import loss_defaults
from diffkd.experiments.tune_space import TuneSpace, apply_params, plain
from diffkd.runtime.files import atomic_write_text, save_figure
from diffkd.runtime.placement import placement_group_sweeper, settle_placement_groups
from diffkd.runtime.raycompat import init as ray_init
from diffkd.train.student import StudentConfig, train_student

log = logging.getLogger(__name__)

EXPERIMENT = "search"  # the Tune experiment's folder inside out_dir
TRIAL_RUNS = "trial_runs"  # the trials' Ray Train runs (their checkpoints), inside out_dir
DRIVER_CPUS = 0.01  # a trial's driver only waits on its TorchTrainer; {"CPU": 0} is refused by Ray
BEST_CONFIG = "best_config.yaml"


@dataclass
class TuneOutcome:
    out_dir: str
    experiment_path: str
    best_params: dict[str, Any]
    best_objective: float
    best_config: "StudentConfig"
    num_trials: int
    complete: bool  # False when the search was interrupted (resume it with resume=True)
    trial_epochs: int  # epochs run, summed over trials (what ASHA saves against a full-budget search)
    files: dict[str, str] = field(default_factory=dict)


def training_rows(assignments: pd.DataFrame) -> pd.DataFrame:
    """The rows a search may see: train and internal validation. The external test split is cut here."""
    if "split" not in assignments.columns:
        raise ValueError("the splits table lacks its `split` column")
    return assignments[assignments["split"].isin(("train", "val"))].reset_index(drop=True)


def search_base(cfg: "StudentConfig", space: TuneSpace) -> dict[str, Any]:
    """`cfg` as the nested dict the space's dotted paths name, with the default of every distillation
    option the space varies filled in: a config that leaves the logit term's temperature at its
    default holds no `temperature` key, yet `distill.terms.logit.temperature` is a field to search."""
    base = to_dict(cfg)
    terms = base.get("distill", {}).get("terms", {})
    for name in space.params:
        keys = name.split(".")
        if len(keys) == 4 and keys[:2] == ["distill", "terms"] and keys[2] in terms:
            defaults = loss_defaults(keys[2])
            if keys[3] in defaults:
                terms[keys[2]].setdefault(keys[3], defaults[keys[3]])
    return base


def arm_space(space: TuneSpace, cfg: "StudentConfig") -> TuneSpace:
    """`space` restricted to the parameters that apply to the arm `cfg`: fields of its config that it uses.

    Distillation settings apply only to arms that distil, and only to the terms an arm has switched on
    (weight > 0: searching a term's weight must not switch on a loss the arm's config leaves off, as
    instance KD in the pairing-free arm). Other paths apply when they name a field of the arm's
    config. Every arm searched this way gets the same number of trials; an arm left with no parameter
    would get none, so that is an error.
    """
    base = to_dict(cfg)
    kept = {}
    for name, dist in space.params.items():
        keys = name.split(".")
        if keys[0] == "distill":
            terms = cfg.distill.terms if cfg.distills else {}
            if len(keys) < 3 or keys[1] != "terms" or not terms.get(keys[2], {}).get("weight", 0) > 0:
                continue
        else:
            try:
                apply_params(base, {name: None})
            except ConfigError:
                continue
        kept[name] = dist
    if not kept:
        raise ConfigError(f"{space.source or 'the search space'}: none of its parameters ({', '.join(space.params)}) "
                          f"applies to this arm ({'distils' if cfg.distills else 'no teacher'}, mode {cfg.mode}); "
                          "add one every arm uses (e.g. loop.lr) so each arm gets the same search budget")
    return dataclasses.replace(space, params=kept)


# ---- resources -----------------------------------------------------------------------------------

def student_from_dict(data: dict[str, Any], where: str = "student") -> "StudentConfig":
    return from_dict(StudentConfig, data, where)


def trial_footprint(cfg) -> dict[str, float]:
    """What one running trial of a stage (student, or teacher in leave-one-center-out) holds: its
    driver, its Train workers, its data pipeline's minimum."""
    loop = cfg.loop
    return {"CPU": DRIVER_CPUS + loop.num_workers * loop.cpus_per_worker + required_cpus(cfg.pipeline),
            "GPU": float(loop.num_workers if loop.use_gpu else 0)}


def plan_concurrency(space: TuneSpace, cfg: "StudentConfig", cluster: dict[str, float]) -> int:
    """Trials in flight: as many as the cluster's CPUs (and GPUs) hold at one trial's footprint.

    More would start trials whose workers can never be placed, so an explicit larger number is
    lowered with a warning; a cluster that cannot hold even one trial is an error.
    """
    capacity = trials_that_fit(cfg, cluster)
    wanted = space.num_samples if space.max_concurrent_trials == "auto" else int(space.max_concurrent_trials)
    if wanted > capacity and space.max_concurrent_trials != "auto":
        log.warning("max_concurrent_trials=%d but the cluster holds %d trial(s) at once; running %d",
                    wanted, capacity, capacity)
    return max(1, min(wanted, capacity, space.num_samples))


def trials_that_fit(cfg, cluster: dict[str, float]) -> int:
    """Trials of the stage config `cfg` that the cluster's CPUs (and GPUs) hold at once; an error when none."""
    need = trial_footprint(cfg)
    capacity = min(math.floor(cluster.get(kind, 0.0) / amount + 1e-9) for kind, amount in need.items() if amount > 0)
    if capacity < 1:
        raise ValueError(f"one trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU (driver {DRIVER_CPUS}, "
                         f"{cfg.loop.num_workers} worker(s) x {cfg.loop.cpus_per_worker:g} CPU, data pipeline), "
                         f"the cluster has {cluster.get('CPU', 0):g} CPU and {cluster.get('GPU', 0):g} GPU; "
                         "lower loop.num_workers / loop.cpus_per_worker")
    return capacity


# ---- one trial -----------------------------------------------------------------------------------

def run_trial(params: dict[str, Any], *, dataset: str, assignments: pd.DataFrame, base: dict[str, dict],
              runs_dir: str) -> None:
    """Tune's trainable: one student-stage run with `params` applied, metrics forwarded to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    if (assignments["split"] == "test").any():  # training_rows() removed them; never let a trial see one
        raise RuntimeError("a tuning trial was handed external test rows")
    cfg = student_from_dict(apply_params(base, params))
    run_name = f"trial-{ray.tune.get_context().get_trial_id()}"
    loop = dataclasses.replace(cfg.loop, storage_path=runs_dir, run_name=run_name, progress=False,
                               resume=os.path.isdir(os.path.join(runs_dir, run_name)))  # a restored trial continues
    train_student(dataset, assignments, dataclasses.replace(cfg, loop=loop), out_dir=None,
                  callbacks=[TuneReportCallback()])


# ---- the search ----------------------------------------------------------------------------------

def _searcher(space: TuneSpace, concurrent: int):
    """The search algorithm, holding at most `concurrent` trials in flight itself: Ray Tune applies
    `TuneConfig.max_concurrent_trials` to a `Searcher` (Optuna) but silently ignores it for a
    `SearchGenerator` such as random search's BasicVariantGenerator, which then started every trial at
    once, more than the cluster could place."""
    if space.search.name == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=space.search.seed), max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=space.search.seed, max_concurrent=concurrent)


def _scheduler(space: TuneSpace, max_epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.name == "fifo":
        return FIFOScheduler()
    # time_attr "epoch" (reported by the loop), not Tune's iteration count: a resumed trial keeps its clock.
    return ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=min(space.scheduler.grace_period, max_epochs),
                         reduction_factor=space.scheduler.reduction_factor)


def tune_student(dataset: str, assignments: pd.DataFrame, cfg: "StudentConfig", space: TuneSpace, out_dir: str,
                 *, resume: bool = False) -> TuneOutcome:
    """Search `space` over the student stage; write the results table, plots and best config to `out_dir`.

    `resume=True` continues an interrupted search in `out_dir` (finished trials are kept, unfinished
    ones continue from their last checkpoint); without it an existing search there is an error.
    """
    import ray
    from ray import tune

    # trials run in their own working directories: every local path they get must be absolute
    dataset = ImageDataset(dataset).uri
    if cfg.teacher_dir and "://" not in cfg.teacher_dir:
        cfg = dataclasses.replace(cfg, teacher_dir=os.path.abspath(cfg.teacher_dir))
    base = search_base(cfg, space)
    for name in space.params:  # a typo in the space fails now, not inside every trial
        apply_params(base, {name: None}, where=space.source or "search space")
    rows = training_rows(assignments)
    out_dir = os.path.abspath(out_dir)
    experiment = os.path.join(out_dir, EXPERIMENT)
    runs_dir = os.path.join(out_dir, TRIAL_RUNS)
    os.makedirs(runs_dir, exist_ok=True)
    ray_init()

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, dataset=str(dataset), assignments=rows, base=base, runs_dir=runs_dir),
        {"CPU": DRIVER_CPUS})
    if resume:
        if not tune.Tuner.can_restore(experiment):
            raise ValueError(f"nothing to resume: no search at {experiment}; run without --resume to start one")
        log.info("resuming the search at %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True)
    else:
        if os.path.exists(experiment):
            raise ValueError(f"a search already exists at {experiment}; pass --resume to continue it, "
                             "or choose another output folder")
        concurrent = plan_concurrency(space, cfg, ray.cluster_resources())
        log.info("searching %d trial(s), %d at a time, objective %s (%s)", space.num_samples, concurrent,
                 space.objective, space.mode)
        tuner = tune.Tuner(
            trainable, param_space=space.ray_param_space(),
            tune_config=tune.TuneConfig(metric=space.objective, mode=space.mode, num_samples=space.num_samples,
                                        search_alg=_searcher(space, concurrent),
                                        scheduler=_scheduler(space, space.max_epochs(cfg.loop.epochs))),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=out_dir, callbacks=[placement_group_sweeper()],
                                      failure_config=tune.FailureConfig(max_failures=1)))
    with shared_source_cache():  # the trials decode their images once between them
        grid = tuner.fit()
    settle_placement_groups()
    return summarize(grid, space, base, out_dir, experiment)


# ---- results -------------------------------------------------------------------------------------

def _history(result) -> "pd.DataFrame | None":
    """A trial's reported metrics, one row per epoch.

    Ray Tune 2.60 reopens the JSON log of a trial that had already finished when a search is resumed,
    which empties its `result.json`; the trial's `progress.csv` keeps every row, so it is read then.
    """
    history = result.metrics_dataframe
    if (history is None or history.empty) and result.path:
        progress = posixpath.join(result.path, "progress.csv")
        try:
            with result.filesystem.open_input_stream(progress) as f:
                history = pd.read_csv(f)
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return history
    return history


def _trial_tables(grid, space: TuneSpace) -> tuple[pd.DataFrame, pd.DataFrame]:
    trials, curves = [], []
    for result in grid:
        history = _history(result)
        trial_id = str((result.metrics or {}).get("trial_id") or
                       (history["trial_id"].iloc[-1] if history is not None and "trial_id" in history else ""))
        config = result.config or {}
        row: dict[str, Any] = {"trial": trial_id, "error": str(result.error).splitlines()[0] if result.error else ""}
        row.update({name: plain(config.get(name)) for name in space.params})
        if history is not None and len(history) and space.objective in history:
            values = history[space.objective].astype(float)
            row[space.objective] = values.max() if space.mode == "max" else values.min()
            row[f"last_{space.objective}"] = float(values.iloc[-1])
            row["epochs"] = int(history["epoch"].max())
            for _, epoch in history.iterrows():
                curves.append({"trial": trial_id, "epoch": int(epoch["epoch"]),
                               **{k: float(epoch[k]) for k in (space.objective, "val_loss", "loss") if k in epoch}})
        else:
            row.update({space.objective: math.nan, f"last_{space.objective}": math.nan, "epochs": 0})
        trials.append(row)
    # Ties on the best epoch's value (common on small validation sets) go to the trial that ended better.
    order = [space.objective, f"last_{space.objective}"]
    table = pd.DataFrame(trials).sort_values(order, ascending=space.mode == "min", na_position="last")
    return table.reset_index(drop=True), pd.DataFrame(curves)


def summarize(grid, space: TuneSpace, base: dict[str, Any], out_dir: str, experiment: str) -> TuneOutcome:
    """Write trials.csv, curves.csv, the plots and best_config.yaml; return the outcome."""
    trials, curves = _trial_tables(grid, space)
    finished = trials.dropna(subset=[space.objective])
    if finished.empty:
        errors = "; ".join(e for e in trials["error"] if e)
        if errors:
            raise RuntimeError(f"every trial of the search at {experiment} failed: {errors}")
        raise ValueError(f"the search at {experiment} stopped before any trial reported {space.objective}; "
                         "continue it with resume=True (CLI: --resume)")
    best = finished.iloc[0]
    best_params = {name: plain(best[name]) for name in space.params}
    best_config = apply_params(base, best_params)
    files = {"trials": os.path.join(out_dir, "trials.csv"), "curves": os.path.join(out_dir, "curves.csv"),
             "best_config": os.path.join(out_dir, BEST_CONFIG)}
    atomic_write_text(files["trials"], trials.to_csv(index=False))
    atomic_write_text(files["curves"], curves.to_csv(index=False))
    header = (f"# best of {len(trials)} trial(s) of {space.source or 'the search'}: "
              f"{space.objective} = {float(best[space.objective]):.4f} (internal validation)\n"
              f"# tuned: {', '.join(f'{k}={v}' for k, v in best_params.items())}\n")
    atomic_write_text(files["best_config"], header + yaml.safe_dump({"student": best_config}, sort_keys=False))
    files.update(plot_search(trials, curves, space, out_dir))
    log.info("search: best of %d trial(s) %s %.4f (internal validation) with %s", len(trials), space.objective,
             float(best[space.objective]), ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                    for k, v in best_params.items()))
    complete = len(trials) >= space.num_samples and not (trials["epochs"] == 0).any()
    if not complete:
        log.warning("the search stopped before every trial finished (%d of %d reported); continue it with "
                    "resume=True (CLI: --resume)", int((trials["epochs"] > 0).sum()), space.num_samples)
    return TuneOutcome(out_dir=out_dir, experiment_path=experiment, best_params=best_params,
                       best_objective=float(best[space.objective]), best_config=student_from_dict(best_config),
                       num_trials=len(trials), complete=complete, trial_epochs=int(trials["epochs"].sum()),
                       files=files)


def load_best_config(path: str) -> "StudentConfig":
    """The student config a search wrote (`best_config.yaml`), for the final student."""
    data = load_yaml(path)
    if "student" not in data:
        raise ConfigError(f"{path} has no `student` section")
    return student_from_dict(data["student"], f"{path}: student")


def plot_search(trials: pd.DataFrame, curves: pd.DataFrame, space: TuneSpace, out_dir: str) -> dict[str, str]:
    """The objective against each searched parameter, and every trial's learning curve (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

    names = list(space.params)
    done = trials.dropna(subset=[space.objective])
    best = done.iloc[0] if len(done) else None
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 1, 3.4 * rows + 0.5), squeeze=False,
                             layout="constrained")
    points = None
    for ax, name in zip(axes.flat, names):
        if space.params[name].kind == "choice":
            labels = [str(v) for v in space.params[name].args]
            xs = [labels.index(str(v)) for v in done[name]]
            ax.set_xticks(range(len(labels)), labels)
            best_x = labels.index(str(best[name])) if best is not None else None
        else:
            xs = done[name].astype(float)
            best_x = float(best[name]) if best is not None else None
            low, high = space.params[name].args[:2]
            if space.params[name].log_scale:
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            margin = (high / low) ** 0.03 if space.params[name].log_scale else 0.03 * (high - low)
            ax.set_xlim((low / margin, high * margin) if space.params[name].log_scale else (low - margin, high + margin))
        points = ax.scatter(xs, done[space.objective], c=done["epochs"], cmap="viridis", vmin=0,
                            vmax=max(1, int(trials["epochs"].max())))
        if best is not None:
            ax.scatter([best_x], [best[space.objective]], marker="*", s=220, facecolor="none", edgecolor="red",
                       label="best")
        ax.set_xlabel(f"{name} (searched range)")
        ax.set_ylabel(space.objective)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if points is not None:
        fig.colorbar(points, ax=list(axes.flat), label="epochs run (ASHA stops weak trials early)",
                     ticks=MaxNLocator(integer=True))
    fig.suptitle(f"{space.objective} (internal validation, best epoch) against each searched parameter")
    files = {"objective_plot": os.path.join(out_dir, "objective_vs_params.png")}
    save_figure(fig, files["objective_plot"])

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if len(curves):
        for trial, curve in curves.groupby("trial", sort=False):
            is_best = best is not None and str(trial) == str(best["trial"])
            ax.plot(curve["epoch"], curve[space.objective], marker="o", ms=3, lw=2.5 if is_best else 1,
                    color="red" if is_best else None, alpha=1.0 if is_best else 0.6,
                    label=f"{trial} (best)" if is_best else str(trial))
        if curves["trial"].nunique() <= 12:
            ax.legend(fontsize=7, title="trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{space.objective} (internal validation)")
    ax.set_title("learning curves of every trial")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files["curves_plot"] = os.path.join(out_dir, "learning_curves.png")
    save_figure(fig, files["curves_plot"])
    return files
