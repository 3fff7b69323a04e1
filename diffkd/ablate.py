"""`diffkd ablate`: does each stage of the method help? Every arm over K seeds, as one Ray Tune job.

    ablate("out/data", ["center4"], load_experiment("configs/evidence.yaml"), "out/ablation", seeds=5)

Arms (the experiment config's `teacher` and `student` sections, no search: every arm trains with the
config's settings, so every arm has the same, zero, search budget):

    full          the student distilled (KD) from the teacher trained on real + synthetic rows, with
                  synthetic rows in its own training stream too (what `diffkd run` calls student_kd)
    no_synthesis  the student distilled from a teacher trained on real rows only, real rows only
    no_kd         the plain student (cross-entropy, no teacher) with synthetic rows
    neither       the plain student on real rows only
    teacher       the `full` arm's teacher itself
    pairing_free  group KD from a teacher of the second modality (where the dataset has two)

One trial = one arm x one seed. A seed sets the initial weights, augmentation and data order of the
teacher and the student (`loop.seed`, `pipeline.seed`); the splits are the same for every trial,
so every model is scored on the same external cases and arms are compared case by case. The stages
arms share, the diffusion model and its synthetic rows, run once for the whole ablation (one
generator for every seed) unless `per_seed_generators` asks for one per seed. Teachers are trained
once per (kind, seed) and shared by the trials that need them (a file lock keeps two trials from
training the same one).

Resumable: each trial's folder records a fingerprint of what it was trained on (data, configs,
seed, generator); rerunning the command starts a new Tune experiment in which finished trials
return at once and only missing or stale ones train.

Outputs in `out_dir`: `ablation.csv` (arm, seed, center, cases, upgrades, external AUC with its 95%
CI), `ablation_summary.csv` and `ablation.json` (per arm and center: the mean AUC over seeds and
the paired difference from `full` with its 95% CI, p and minimum detectable difference, by the
hierarchical bootstrap of `diffkd.evaluate.pooled`), `ablation_forest.png`, `distillation.csv` (per
student trial: its agreement with the teacher and its paired external gap to it), and `trials/`,
`teachers/`, `models/` (the generator), `run_state.json`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from diffkd.config import from_dict, to_dict
from diffkd.config.experiment import AblationConfig
from diffkd.files import atomic_write_json

if TYPE_CHECKING:
    import pandas as pd

    from diffkd.config.experiment import ExperimentConfig

log = logging.getLogger(__name__)

REFERENCE_ARM = "full"
SYNTHETIC_ARMS = ("full", "no_kd", "teacher")  # arms that read the generator's rows
ARM_TEACHER = {"full": "synthetic", "teacher": "synthetic", "no_synthesis": "real", "pairing_free": "second_modality"}
# The plain arms learn from no teacher, but their agreement is measured against the full arm's
# (the same teacher, trained once per seed), so that distillation's share of it shows.
COMPARED_TEACHER = {"no_kd": "synthetic", "neither": "synthetic"}

# Trials of one seed start in this order: the teacher first, beside an arm that needs no teacher, so
# that `full` (which distils from that same teacher) rarely has to wait for it; full and neither (the
# whole method against none of it) early, so that a time budget cuts the other arms first.
TRIAL_ORDER = ("teacher", "neither", "full", "no_kd", "no_synthesis", "pairing_free")
EXPERIMENT = "experiment"
TRIAL_INFO = "trial.json"
PREDICTIONS = "predictions.parquet"
ALL_EXTERNAL = "all external"


def teacher_kind(arm: str) -> str | None:
    """The teacher an arm learns from, or is compared with; None for none."""
    return ARM_TEACHER.get(arm) or COMPARED_TEACHER.get(arm)


@dataclass
class AblationOutcome:
    out_dir: str
    table: "pd.DataFrame"  # ablation.csv
    summary: "pd.DataFrame"  # ablation_summary.csv
    distillation: "pd.DataFrame"  # distillation.csv
    arms: list[str]
    seeds: list[int]
    parallel: int
    wall_s: float
    failed: list[str]
    notes: list[str]
    files: dict[str, str] = field(default_factory=dict)


# ---- what each trial trains ------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Everything a trial needs, shipped to it once through the object store."""

    dataset: str
    assignments: "pd.DataFrame"  # real rows' splits (the same for every trial)
    experiment: dict  # ExperimentConfig as a dict
    sources: dict[int, tuple[str, ...]]  # seed -> the synthesis run(s) its arms may read
    data_key: str  # the dataset's files, for the fingerprints
    out_dir: str


def seeded(stage_cfg, seed: int):
    """A teacher/student config whose initial weights, augmentation and data order follow `seed`."""
    return dataclasses.replace(stage_cfg, loop=dataclasses.replace(stage_cfg.loop, seed=seed),
                               pipeline=dataclasses.replace(stage_cfg.pipeline, seed=seed))


def _with_pipeline(stage_cfg, **changes):
    return dataclasses.replace(stage_cfg, pipeline=dataclasses.replace(stage_cfg.pipeline, **changes))


def teacher_setup(cfg: "ExperimentConfig", kind: str, seed: int, sources: tuple[str, ...]) -> tuple[Any, float]:
    """(TeacherConfig, synthetic ratio) of a teacher kind: synthetic, real, second_modality."""
    modality = cfg.pairing_free.teacher_modality if kind == "second_modality" else cfg.student.student_modality
    teacher = _with_pipeline(seeded(cfg.teacher, seed), modalities=(modality,), synthetic_sources=sources)
    return teacher, (cfg.synthetic_ratio if kind == "synthetic" else 0.0)


def student_setup(cfg: "ExperimentConfig", arm: str, seed: int, sources: tuple[str, ...], teacher_dir: str):
    """The StudentConfig of a student arm, as `diffkd run` builds its students."""
    from diffkd.run import pairing_free_student
    from diffkd.train.student import plain_variant

    kd = dataclasses.replace(
        _with_pipeline(seeded(cfg.student, seed), synthetic_ratio=cfg.synthetic_ratio, synthetic_sources=sources),
        teacher_dir=teacher_dir, mode="paired")
    if arm == "full":
        return kd
    if arm == "no_synthesis":
        return _with_pipeline(kd, synthetic_ratio=0.0)
    if arm == "no_kd":  # plain_variant also drops the synthetic rows; this arm keeps them
        return _with_pipeline(plain_variant(kd), synthetic_ratio=cfg.synthetic_ratio)
    if arm == "neither":
        return plain_variant(kd)
    if arm == "pairing_free":
        return pairing_free_student(kd, cfg.pairing_free, teacher_dir)
    raise ValueError(f"{arm!r} is not a student arm")


def teacher_dir(out_dir: str, kind: str, seed: int) -> str:
    return os.path.join(out_dir, "teachers", f"{kind}-s{seed}")


def trial_dir(out_dir: str, arm: str, seed: int) -> str:
    return os.path.join(out_dir, "trials", f"{arm}-s{seed}")


def _teacher_key(plan: Plan, cfg: "ExperimentConfig", kind: str, seed: int) -> str:
    from diffkd.runstate import fingerprint

    teacher, ratio = teacher_setup(cfg, kind, seed, plan.sources[seed])
    return fingerprint({"data": plan.data_key, "teacher": to_dict(teacher), "ratio": ratio,
                        "splits": to_dict(cfg.splits)})


def trial_key(plan: Plan, cfg: "ExperimentConfig", arm: str, seed: int) -> str:
    """What a trial's result depends on: data, splits, its configs, its teacher's, the generator run."""
    from diffkd.runstate import fingerprint

    kind = teacher_kind(arm)
    parts: dict[str, Any] = {"data": plan.data_key, "arm": arm, "splits": to_dict(cfg.splits),
                             "teacher": _teacher_key(plan, cfg, kind, seed) if kind else None}
    if arm != "teacher":
        student = to_dict(student_setup(cfg, arm, seed, plan.sources[seed], ""))
        if arm not in ARM_TEACHER:  # a plain student has no distillation terms: changing them leaves it current
            student.pop("distill")
        parts["student"] = student
    return fingerprint(parts)


def is_current(folder: str, key: str) -> bool:
    """True when `folder` holds finished predictions trained on exactly what `key` describes."""
    from diffkd.runstate import outputs_current

    return outputs_current(folder, TRIAL_INFO, PREDICTIONS, key)


@contextlib.contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if absent) while the block runs."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _loop_for(stage_cfg, out_dir: str, name: str):
    runs = os.path.join(out_dir, "checkpoints")
    loop = dataclasses.replace(stage_cfg.loop, storage_path=runs, run_name=name,
                               resume=os.path.isdir(os.path.join(runs, name)))
    return dataclasses.replace(stage_cfg, loop=loop)


def ensure_teacher(plan: Plan, cfg: "ExperimentConfig", kind: str, seed: int) -> str:
    """The teacher of `kind` for `seed`, trained now unless a current one exists; its folder."""
    from diffkd.train.teacher import train_teacher

    target = teacher_dir(plan.out_dir, kind, seed)
    key = _teacher_key(plan, cfg, kind, seed)
    with _exclusive(target + ".lock"):
        if not is_current(target, key):
            teacher, ratio = teacher_setup(cfg, kind, seed, plan.sources[seed])
            name = f"teacher_{kind}-s{seed}-{key[:10]}"
            train_teacher(plan.dataset, plan.assignments, _loop_for(teacher, plan.out_dir, name), target,
                          synthetic_ratio=ratio, model_name=f"teacher_{kind}")
            atomic_write_json(os.path.join(target, TRIAL_INFO), {"key": key, "kind": kind, "seed": seed})
    return target


def run_trial(params: dict[str, Any], *, plan: Plan) -> None:
    """Tune's trainable: one arm for one seed, trained unless current; reports its external AUC."""
    import pandas as pd
    import ray.tune

    from diffkd.files import atomic_write_parquet
    from diffkd.config.experiment import ExperimentConfig
    from diffkd.train.student import train_student

    started_at = time.time()
    arm, seed = params["trial"]["arm"], int(params["trial"]["seed"])
    cfg = from_dict(ExperimentConfig, plan.experiment, "experiment")
    target = trial_dir(plan.out_dir, arm, seed)
    key = trial_key(plan, cfg, arm, seed)
    if not is_current(target, key):
        kind = teacher_kind(arm)
        teacher = ensure_teacher(plan, cfg, kind, seed) if kind else ""
        if arm == "teacher":
            os.makedirs(target, exist_ok=True)
            predictions = pd.read_parquet(os.path.join(teacher, PREDICTIONS)).assign(model=arm)
            atomic_write_parquet(os.path.join(target, PREDICTIONS), predictions)
        else:
            student = student_setup(cfg, arm, seed, plan.sources[seed], teacher)
            train_student(plan.dataset, plan.assignments,
                          _loop_for(student, plan.out_dir, f"{arm}-s{seed}-{key[:10]}"), target, model_name=arm)
        atomic_write_json(os.path.join(target, TRIAL_INFO), {"key": key, "arm": arm, "seed": seed,
                                                             "teacher": teacher or None})
    external = pd.read_parquet(os.path.join(target, PREDICTIONS))
    external = external[external["split"] == "test"]
    # started_at, finished_at: the trial's wall-clock span (bench/ablate.py splits the job's time with them)
    ray.tune.report({"external_auc": _auc_or_nan(external), "cases": float(len(external)), "started_at": started_at,
                     "finished_at": time.time()})


def _auc_or_nan(rows: "pd.DataFrame") -> float:
    from diffkd.train.teacher import auc_or_nan

    return auc_or_nan(rows["label"].tolist(), rows["prob"].tolist())


# ---- the job --------------------------------------------------------------------------------------

def applicable_arms(arms: list[str], modalities: set[str], cfg: "ExperimentConfig") -> tuple[list[str], list[str]]:
    """The requested arms this dataset and config can train, and a note for each one left out."""
    kept, notes = [], []
    pf = cfg.pairing_free
    for arm in arms:
        if arm in SYNTHETIC_ARMS and not (cfg.diffusion.enabled and cfg.synthetic_ratio > 0):
            notes.append(f"arm {arm} left out: it reads synthetic rows, and the config makes none "
                         "(diffusion.enabled false or synthetic_ratio 0)")
        elif arm == "pairing_free" and not (pf.enabled and {pf.teacher_modality, pf.student_modality} <= modalities):
            notes.append(f"arm pairing_free left out: the dataset has no {pf.teacher_modality!r} images beside "
                         f"{pf.student_modality!r} (modalities: {', '.join(sorted(modalities))}) or "
                         "pairing_free.enabled is false")
        else:
            kept.append(arm)
    if REFERENCE_ARM not in kept:
        notes.append(f"no {REFERENCE_ARM!r} arm: the table has no paired differences")
    return kept, notes


def ordered_trials(arms: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Seed by seed (an ablation stopped early holds whole seeds), arms in TRIAL_ORDER within a seed."""
    return [{"arm": arm, "seed": seed} for seed in seeds for arm in TRIAL_ORDER if arm in arms]


def data_key(ds) -> str:
    from diffkd.runstate import fingerprint

    return fingerprint({name: entry["files"] for name, entry in ds.manifest["centers"].items()})


def ablate(dataset: str, external: list[str], cfg: "ExperimentConfig", out_dir: str,
           settings: AblationConfig | None = None, train: bool = True) -> AblationOutcome:
    """Train every arm x seed (one Tune trial each) and write the tables and the forest plot.

    `train=False` trains nothing: the tables and plot are written from the trials that have finished
    with the current settings (e.g. while a long ablation runs elsewhere, or after a time budget).
    """
    from diffkd import raycompat
    from diffkd.config import ConfigError
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.splits import check_no_leakage, make_splits
    from diffkd.run import generator_stage, plan_stages, stage_inputs
    from diffkd.runstate import RunState

    settings = settings or cfg.ablation
    start = time.perf_counter()
    out = Path(out_dir).resolve()
    (out / "models").mkdir(parents=True, exist_ok=True)
    ds = ImageDataset(dataset)
    if not ds.exists():
        raise ConfigError(f"{dataset} is not a diffkd dataset (no manifest.json): run `diffkd ingest` first")
    if not external:
        raise ConfigError("an ablation compares arms on external centers: give --external")
    if train:
        raycompat.init(cfg.ray.address or None, **({"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}))
    real = ds.metadata().to_pandas()
    assignments = make_splits(real, external, cfg.splits.val_fraction, cfg.splits.seed)
    check_no_leakage(assignments)
    seeds = list(range(settings.seeds))
    arms, notes = applicable_arms(list(settings.arms), set(real["modality"]), cfg)
    if not arms:
        raise ConfigError(f"no arm of {settings.arms} can run on this dataset: {'; '.join(notes)}")

    # ---- the shared stage: diffusion + synthesis, once (or once per seed) ---------------------------
    sources: dict[int, tuple[str, ...]] = {seed: () for seed in seeds}
    if cfg.diffusion.enabled and any(arm in SYNTHETIC_ARMS for arm in arms):
        state = RunState.load(out)
        common = stage_inputs(dataset, external, cfg)
        masks = plan_stages(ds, assignments, cfg, None).mask_conditioning if train else True

        def generator(stage_cfg: "ExperimentConfig", suffix: str = "") -> tuple[str, ...]:
            if not train:  # the generator run the trials read, as the shared stage recorded it
                if "synth" + suffix not in state.stages:
                    raise ConfigError(f"{out} holds no finished generator stage (synth{suffix}): nothing to report")
                return (state.stages["synth" + suffix]["result"]["run_id"],)
            synthesized = generator_stage(ds, external, stage_cfg, out, state, common, masks, suffix)[1]
            if synthesized is None:
                raise RuntimeError(f"the shared generator stage failed ({'; '.join(state.failed.values())}); "
                                   "rerun the same command to retry it")
            return (synthesized["run_id"],)

        if settings.per_seed_generators:
            for seed in seeds:
                diffusion = dataclasses.replace(cfg.diffusion, model=dataclasses.replace(cfg.diffusion.model, seed=seed),
                                                loop=dataclasses.replace(cfg.diffusion.loop, seed=seed))
                sources[seed] = generator(dataclasses.replace(cfg, diffusion=diffusion,
                                                              synth=dataclasses.replace(cfg.synth, seed=seed)), f"-s{seed}")
            notes.append(f"one diffusion model and synthesis per seed ({len(seeds)} generators)")
        else:
            shared = generator(cfg)
            sources = {seed: shared for seed in seeds}
            notes.append("the diffusion model and synthesis ran once and serve every seed: seeds vary the "
                         "teachers' and students' initial weights, augmentation and data order, not the generator")
    notes.append("no hyperparameter search in any arm: every arm trains with the config's settings")

    plan = Plan(dataset=str(ds.uri), assignments=assignments, experiment=to_dict(cfg), sources=sources,
                data_key=data_key(ds), out_dir=str(out))
    trials = ordered_trials(arms, seeds)
    concurrent, failed = 0, []
    if train:
        concurrent, failed = _run_trials(plan, trials, settings, cfg, str(out))
    finished = [t for t in trials if is_current(trial_dir(str(out), t["arm"], t["seed"]),
                                                trial_key(plan, cfg, t["arm"], t["seed"]))]
    if len(finished) < len(trials):
        notes.append(f"{len(trials) - len(finished)} of {len(trials)} trial(s) did not finish "
                     "(failed, past the time budget or not run); rerun the same command to finish them")
    table, summary = summarize(str(out), finished, settings.n_boot, settings.target_half_width)
    outcome = AblationOutcome(out_dir=str(out), table=table, summary=summary,
                              distillation=distillation_table(str(out), finished), arms=arms, seeds=seeds,
                              parallel=concurrent, wall_s=time.perf_counter() - start, failed=failed, notes=notes)
    outcome.files = write_outputs(outcome, settings)
    return outcome


def _run_trials(plan: Plan, trials: list[dict[str, Any]], settings: AblationConfig, cfg: "ExperimentConfig",
                out: str) -> tuple[int, list[str]]:
    """The Tune job: one trial per arm x seed; returns (trials at once, the failed trials' errors)."""
    import ray
    from ray import tune

    from diffkd.data.source_cache import shared_source_cache
    from diffkd.tune import DRIVER_CPUS, placement_group_sweeper, settle_placement_groups, trials_that_fit

    capacity = min(trials_that_fit(cfg.teacher, ray.cluster_resources()),
                   trials_that_fit(cfg.student, ray.cluster_resources()))
    concurrent = min(settings.parallel or capacity, capacity, len(trials))
    if settings.parallel > capacity:
        log.warning("parallel=%d but the cluster holds %d trial(s) at once; running %d", settings.parallel,
                    capacity, capacity)
    log.info("ablation: %d trials (arm x seed), %d at a time", len(trials), concurrent)
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": DRIVER_CPUS})
    # A new Tune experiment per call: current trials return at once, the rest (re)train.
    tuner = tune.Tuner(
        trainable, param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent,
                                    time_budget_s=settings.time_budget_min * 60 or None),
        run_config=tune.RunConfig(name=f"{EXPERIMENT}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=out,
                                  callbacks=[placement_group_sweeper()],
                                  failure_config=tune.FailureConfig(max_failures=1)))
    with shared_source_cache():  # the trials decode their images once between them
        grid = tuner.fit()
    settle_placement_groups()
    failed = [f"{r.config['trial']['arm']}-s{r.config['trial']['seed']}: {str(r.error).splitlines()[0]}"
              for r in grid if r.error]
    return concurrent, failed


# ---- tables ---------------------------------------------------------------------------------------

def external_predictions(out_dir: str, trials: list[dict[str, Any]]) -> "pd.DataFrame":
    """The external cases' probabilities of every finished trial: arm, seed, case_id, patient_id, center, label, prob."""
    import pandas as pd

    frames = []
    for t in trials:
        preds = pd.read_parquet(os.path.join(trial_dir(out_dir, t["arm"], t["seed"]), PREDICTIONS))
        preds = preds[preds["split"] == "test"]
        frames.append(preds[["case_id", "patient_id", "center", "label", "prob"]].assign(arm=t["arm"], seed=t["seed"]))
    columns = ["arm", "seed", "case_id", "patient_id", "center", "label", "prob"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _groups(predictions: "pd.DataFrame") -> list[tuple[str, "pd.DataFrame"]]:
    """Each external center, plus all of them together when there are several."""
    centers = sorted(predictions["center"].unique())
    groups = [(c, predictions[predictions["center"] == c]) for c in centers]
    return groups + ([(ALL_EXTERNAL, predictions)] if len(centers) > 1 else [])


def _auc_row(rows: "pd.DataFrame") -> dict[str, float]:
    """AUC with a 95% CI: DeLong, or the patient-clustered bootstrap where a patient has several cases."""
    from diffkd.evaluate.metrics import auc_with_ci

    if rows["label"].nunique() < 2:
        return {"auc": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    estimate = auc_with_ci(rows["label"], rows["prob"], groups=rows["patient_id"])
    return {"auc": estimate.auc, "ci_low": estimate.ci[0], "ci_high": estimate.ci[1]}


def score_matrix(rows: "pd.DataFrame", arm: str, seeds: list[int], cases: list[str]) -> "Any":
    """(len(seeds), len(cases)) probabilities of `arm`, row k from seeds[k], column i case cases[i]."""
    wide = rows[rows["arm"] == arm].pivot(index="seed", columns="case_id", values="prob")
    return wide.loc[seeds, cases].to_numpy()


def summarize(out_dir: str, trials: list[dict[str, Any]], n_boot: int = 2000,
              target_half_width: float = 0.04) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """ablation.csv (one row per arm x seed x center) and the pooled summary (one row per arm x center).

    `seeds_for_target`: seeds that would bring the difference's CI to +/- `target_half_width` on the
    same external cases ("more cases": the cases alone are wider; "unknown (one seed)")."""
    import pandas as pd

    from diffkd.evaluate.pooled import pooled_auc_difference

    predictions = external_predictions(out_dir, trials)
    rows = []
    for (arm, seed), preds in predictions.groupby(["arm", "seed"], sort=False):
        for center, group in _groups(preds):
            rows.append({"arm": arm, "seed": int(seed), "center": center, "cases": len(group),
                         "upgrades": int(group["label"].sum()), **_auc_row(group)})
    table = pd.DataFrame(rows, columns=["arm", "seed", "center", "cases", "upgrades", "auc", "ci_low", "ci_high"])

    summary = []
    arms = [a for a in TRIAL_ORDER if a in set(predictions["arm"])]
    for center, group in _groups(predictions):
        for arm in arms:
            mine = group[group["arm"] == arm]
            seeds = sorted(set(mine["seed"]))
            cases = _shared_cases(group, [arm], seeds)
            if not cases or group.set_index("case_id").loc[cases, "label"].groupby(level=0).first().nunique() < 2:
                continue
            labels, patients = _case_columns(group, cases)
            pooled = pooled_auc_difference(labels, score_matrix(group, arm, seeds, cases), patients=patients,
                                           n_boot=n_boot)
            row = {"arm": arm, "center": center, "seeds": len(seeds), "cases": len(cases),
                   "patients": pooled.patients, "upgrades": int(sum(labels)), "mean_auc": pooled.estimate,
                   "auc_ci_low": pooled.ci[0], "auc_ci_high": pooled.ci[1],
                   "auc_between_seed_sd": pooled.between_seed_sd}
            if arm != REFERENCE_ARM and REFERENCE_ARM in set(group["arm"]):
                paired = set(group.loc[group["arm"] == REFERENCE_ARM, "seed"]) & set(seeds)
                row.update(_difference(group, arm, sorted(paired), n_boot, target_half_width))
            summary.append(row)
    return table, pd.DataFrame(summary)


DISTILLATION_COLUMNS = ["arm", "seed", "params", "best_epoch", "epochs_run", "val_auc", "agree_corr", "agree_kl",
                        "agree_top1", "external_auc", "teacher_auc", "gap", "gap_ci_low", "gap_ci_high", "gap_p"]


def distillation_table(out_dir: str, trials: list[dict[str, Any]]) -> "pd.DataFrame":
    """distillation.csv: per student trial, the epoch kept, its internal-validation agreement with the
    teacher there (`diffkd.distill.agreement`; the plain arms are measured against the full arm's
    teacher) and its external AUC minus the teacher's on the same cases (paired, 95% CI)."""
    import json

    import pandas as pd

    from diffkd.train.teacher import TRAINING_INFO

    rows = []
    for t in trials:
        path = os.path.join(trial_dir(out_dir, t["arm"], t["seed"]), TRAINING_INFO)
        if t["arm"] == "teacher" or not os.path.exists(path):
            continue
        info = json.loads(Path(path).read_text())
        metrics = info["metrics"]
        best = next((h for h in info["history"] if h["epoch"] == metrics.get("best_epoch")), {})
        gap = metrics.get("teacher_gap") or {}
        ci = gap.get("difference_ci") or [math.nan, math.nan]
        rows.append({"arm": t["arm"], "seed": t["seed"], "params": metrics.get("params"),
                     "best_epoch": metrics.get("best_epoch"), "epochs_run": metrics.get("epochs_run"),
                     **{key: best.get(key, math.nan) for key in ("val_auc", "agree_corr", "agree_kl", "agree_top1")},
                     "external_auc": gap.get("auc_a", math.nan), "teacher_auc": gap.get("auc_b", math.nan),
                     "gap": gap.get("difference", math.nan), "gap_ci_low": ci[0], "gap_ci_high": ci[1],
                     "gap_p": gap.get("p", math.nan)})
    return pd.DataFrame(rows, columns=DISTILLATION_COLUMNS)


def _shared_cases(group: "pd.DataFrame", arms: list[str], seeds: list[int]) -> list[str]:
    """Cases every listed arm scored under every listed seed (the unit of pairing)."""
    cases = None
    for arm in arms:
        for seed in seeds:
            scored = set(group.loc[(group["arm"] == arm) & (group["seed"] == seed), "case_id"])
            cases = scored if cases is None else cases & scored
    return sorted(cases or ())


def _case_columns(group: "pd.DataFrame", cases: list[str]) -> tuple[list[int], list[str]]:
    """Labels and patient ids of `cases`. Patients are resampled within label strata only, not within
    centers: fixing each center's share of upgrades would leave out the variation a pooled AUC over
    several centers has from it (about half the SE on the evidence run's two centers)."""
    first = group.drop_duplicates("case_id").set_index("case_id").loc[cases]
    return first["label"].astype(int).tolist(), first["patient_id"].astype(str).tolist()


def _difference(group: "pd.DataFrame", arm: str, seeds: list[int], n_boot: int,
                target_half_width: float) -> dict[str, float]:
    """The arm minus `full`, paired by seed and case, pooled over seeds (diffkd.evaluate.pooled)."""
    from diffkd.evaluate.pooled import pooled_auc_difference

    cases = _shared_cases(group, [arm, REFERENCE_ARM], seeds)
    if not seeds or not cases:
        return {}
    labels, patients = _case_columns(group, cases)
    if len(set(labels)) < 2:
        return {}
    diff = pooled_auc_difference(labels, score_matrix(group, arm, seeds, cases),
                                 score_matrix(group, REFERENCE_ARM, seeds, cases), patients=patients,
                                 n_boot=n_boot)
    return {"paired_seeds": diff.seeds, "diff_vs_full": diff.estimate, "diff_ci_low": diff.ci[0],
            "diff_ci_high": diff.ci[1], "diff_se": diff.se, "p": diff.p, "mdd_80": diff.mdd,
            "diff_between_seed_sd": diff.between_seed_sd,
            "seeds_for_target": _seeds_needed(diff, target_half_width)}


def _seeds_needed(diff, target_half_width: float) -> str:
    """Seeds that would bring the CI to +/- the target on these cases, as a table cell."""
    from diffkd.evaluate.pooled import seeds_for_half_width

    if diff.seeds < 2:  # one seed: the seed part of the variance is unknown
        return "unknown (one seed)"
    needed = seeds_for_half_width(diff, target_half_width)
    return "more cases" if needed is None else str(needed)


def format_summary(summary: "pd.DataFrame", target_half_width: float = 0.04) -> str:
    target = f"K for +/-{target_half_width:g}"
    lines = [f"{'arm':<13} {'center':<13} {'seeds':>5} {'cases':>5}  {'mean ext. AUC (95% CI)':<24} "
             f"{'minus full (95% CI)':<26} {'p':>6} {'MDD80':>6}  {target}"]
    for _, r in summary.iterrows():
        auc_text = f"{r['mean_auc']:.3f} ({r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f})"
        diff = r.get("diff_vs_full", math.nan)
        if isinstance(diff, float) and not math.isnan(diff):
            diff_text = f"{diff:+.3f} ({r['diff_ci_low']:+.3f} to {r['diff_ci_high']:+.3f})"
            p_text, mdd_text = f"{r['p']:.3f}", f"{r['mdd_80']:.3f}"
            needed = str(r["seeds_for_target"])
        else:
            diff_text, p_text, mdd_text, needed = "reference" if r["arm"] == REFERENCE_ARM else "", "", "", ""
        lines.append(f"{r['arm']:<13} {r['center']:<13} {r['seeds']:>5} {r['cases']:>5}  {auc_text:<24} "
                     f"{diff_text:<26} {p_text:>6} {mdd_text:>6}  {needed}")
    return "\n".join(lines)


def write_outputs(outcome: AblationOutcome, settings: AblationConfig) -> dict[str, str]:
    from diffkd.evaluate.pooled import PooledEstimate
    from diffkd.files import atomic_write_text

    out = outcome.out_dir
    files = {"table": os.path.join(out, "ablation.csv"), "summary": os.path.join(out, "ablation_summary.csv"),
             "json": os.path.join(out, "ablation.json"), "plot": os.path.join(out, "ablation_forest.png"),
             "distillation": os.path.join(out, "distillation.csv")}
    atomic_write_text(files["table"], outcome.table.to_csv(index=False))
    atomic_write_text(files["distillation"], outcome.distillation.to_csv(index=False))
    atomic_write_text(files["summary"], outcome.summary.to_csv(index=False))
    atomic_write_json(files["json"], {
        "arms": outcome.arms, "seeds": outcome.seeds, "reference": REFERENCE_ARM, "parallel": outcome.parallel,
        "wall_s": outcome.wall_s, "failed": outcome.failed, "notes": outcome.notes, "settings": to_dict(settings),
        "method": PooledEstimate.method + f", {settings.n_boot} replicates; see diffkd/evaluate/pooled.py",
        "summary": outcome.summary.to_dict(orient="records"), "trials": outcome.table.to_dict(orient="records"),
        "distillation": outcome.distillation.to_dict(orient="records")})
    plot_forest(outcome.table, outcome.summary, files["plot"])
    return files


def plot_forest(table: "pd.DataFrame", summary: "pd.DataFrame", path: str) -> str:
    """Left: each arm's external AUC per seed (dots) and its mean over seeds (95% CI); right: the
    paired difference from `full` (95% CI) with the minimum detectable difference shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffkd.files import save_figure

    if summary.empty:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished trial yet: rerun the command to train them", ha="center", va="center")
        return save_figure(fig, path)
    shown = summary.iloc[::-1].reset_index(drop=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.5 * max(len(shown), 1) + 1.6), sharey=True)
    for y, row in shown.iterrows():
        seeds = table[(table["arm"] == row["arm"]) & (table["center"] == row["center"])]
        left.plot(seeds["auc"], [y] * len(seeds), "o", color="tab:blue", alpha=0.35, markersize=4)
        left.errorbar(row["mean_auc"], y, xerr=[[row["mean_auc"] - row["auc_ci_low"]],
                                                [row["auc_ci_high"] - row["mean_auc"]]],
                      fmt="D", color="black", capsize=3)
        diff = row.get("diff_vs_full", math.nan)
        if isinstance(diff, float) and not math.isnan(diff):
            right.fill_betweenx([y - 0.3, y + 0.3], -row["mdd_80"], row["mdd_80"], color="0.9")
            right.errorbar(diff, y, xerr=[[diff - row["diff_ci_low"]], [row["diff_ci_high"] - diff]], fmt="o",
                           color="tab:red", capsize=3)
    left.axvline(0.5, color="grey", linestyle=":", linewidth=1)
    right.axvline(0.0, color="grey", linestyle=":", linewidth=1)
    left.set_yticks(range(len(shown)), [f"{a} ({c}, {s} seeds)" for a, c, s in
                                        zip(shown["arm"], shown["center"], shown["seeds"])])
    left.set_xlabel("external AUC: seeds (dots), mean with 95% CI")
    right.set_xlabel("AUC minus full, paired (95% CI); grey: MDD at 80% power")
    fig.suptitle("Ablation on the external cases (95% CIs over patients and seeds: diffkd.evaluate.pooled)")
    fig.tight_layout()
    return save_figure(fig, path)
