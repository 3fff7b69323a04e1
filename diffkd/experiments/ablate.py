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
    teacher_student_budget
                  the same teacher trained with the students' budget (their epochs, patience, burn-in
                  and optimizer steps per epoch): a second reference, so that a student is not
                  compared only with a teacher that trained for a third of its steps
    pairing_free  group KD from a teacher of the second modality (where the dataset has two)

Fair schedules: every student arm trains with the same loop (`student.loop`, no search in any arm),
and every student arm takes the same optimizer steps per epoch, one pass over the real training
rows of the student's modality (`loop.train_samples`): the arms with synthetic rows (`full`, `no_kd`)
see them in place of some real rows, not as extra steps. The tables report each trial's optimizer
steps. `test_ablate.py` fails if two student arms' loops differ.

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
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from diffkd.config import ConfigError, from_dict, to_dict
from diffkd.data.dataset import ImageDataset
from diffkd.data.source_cache import shared_source_cache
from diffkd.data.splits import check_no_leakage, make_splits
from diffkd.evaluate.metrics import auc_or_nan, auc_with_ci
from diffkd.evaluate.pooled import LEVEL, PooledEstimate, pooled_auc_difference, seeds_for_half_width
from diffkd.evaluate.reader_arms import reader_predictions, reader_scores, stacked_probabilities
from diffkd.experiments import preregistration
from diffkd.experiments.experiment import AblationConfig, ExperimentConfig
from diffkd.experiments.preregistration import PlanningAssumptions, build_plan, expected_precision, write_plan
from diffkd.experiments.runstate import RunState, outputs_current
from diffkd.experiments.stages import (Pipeline, StagePlan, checkpointed, generator_stages, pairing_free_student,
                                       plan_stages, stage_inputs, with_pipeline)
from diffkd.experiments.tune import DRIVER_CPUS, trials_that_fit
from diffkd.runtime import raycompat
from diffkd.runtime.digest import fingerprint
from diffkd.runtime.files import atomic_write_json, atomic_write_parquet, atomic_write_text, save_figure
from diffkd.runtime.placement import placement_group_sweeper, settle_placement_groups
from diffkd.train.stage_io import TRAINING_INFO
from diffkd.train.student import plain_variant, train_student
from diffkd.train.teacher import train_teacher

log = logging.getLogger(__name__)

REFERENCE_ARM = "full"
SYNTHETIC_ARMS = ("full", "no_kd", "teacher", "teacher_student_budget")  # arms that read the generator's rows
TEACHER_ARMS = ("teacher", "teacher_student_budget")  # arms whose model is a teacher (no student trained)
ARM_TEACHER = {"full": "synthetic", "teacher": "synthetic", "teacher_student_budget": "synthetic_student_budget",
               "no_synthesis": "real", "pairing_free": "second_modality"}
# The plain arms learn from no teacher, but their agreement is measured against the full arm's
# (the same teacher, trained once per seed), so that distillation's share of it shows.
COMPARED_TEACHER = {"no_kd": "synthetic", "neither": "synthetic"}

# Trials of one seed start in this order: the teacher first, beside an arm that needs no teacher, so
# that `full` (which distils from that same teacher) rarely has to wait for it; full and neither (the
# whole method against none of it) early, so that a time budget cuts the other arms first.
TRIAL_ORDER = ("teacher", "neither", "full", "no_kd", "no_synthesis", "teacher_student_budget", "pairing_free")
EXPERIMENT = "experiment"
TRIAL_INFO = "trial.json"
PREDICTIONS = "predictions.parquet"
ALL_EXTERNAL = "all external"


# _difference's keys against the reader, as the summary names them
READER_COLUMNS = {"diff_vs_full": "diff_vs_reader", "diff_ci_low": "reader_diff_ci_low",
                  "diff_ci_high": "reader_diff_ci_high", "p": "p_vs_reader"}


def reader_arm(column: str) -> str:
    """The seed-free arm of a reader column (`reader_birads`)."""
    return f"reader_{column}"


def stacked_arm(column: str) -> str:
    """The `full` student stacked on a reader column (`full+birads`)."""
    return f"{REFERENCE_ARM}+{column}"


def teacher_kind(arm: str) -> str | None:
    """The teacher an arm learns from, or is compared with; None for none."""
    return ARM_TEACHER.get(arm) or COMPARED_TEACHER.get(arm)


@dataclass
class AblationOutcome:
    out_dir: str
    table: pd.DataFrame  # ablation.csv
    summary: pd.DataFrame  # ablation_summary.csv
    distillation: pd.DataFrame  # distillation.csv
    arms: list[str]
    seeds: list[int]
    parallel: int
    wall_s: float
    failed: list[str]
    notes: list[str]
    plan: dict = field(default_factory=dict)  # preregistration.plan_record: status, deviations, digest
    files: dict[str, str] = field(default_factory=dict)


# ---- what each trial trains ------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """Everything a trial needs, shipped to it once through the object store."""

    dataset: str
    assignments: pd.DataFrame  # real rows' splits (the same for every trial)
    experiment: dict  # ExperimentConfig as a dict
    sources: dict[int, tuple[str, ...]]  # seed -> the synthesis run(s) its arms may read
    data_key: str  # the dataset's files, for the fingerprints
    out_dir: str
    train_rows: int = 0  # real training rows of the student's modality: every student epoch's length


def seeded(stage_cfg, seed: int):
    """A teacher/student config whose initial weights, augmentation and data order follow `seed`."""
    return dataclasses.replace(stage_cfg, loop=dataclasses.replace(stage_cfg.loop, seed=seed),
                               pipeline=dataclasses.replace(stage_cfg.pipeline, seed=seed))


def teacher_setup(cfg: ExperimentConfig, kind: str, seed: int, sources: tuple[str, ...],
                  train_rows: int = 0) -> tuple[Any, float]:
    """(TeacherConfig, synthetic ratio) of a teacher kind: synthetic, real, second_modality, or
    synthetic_student_budget (the synthetic teacher with the students' budget, `student_budget`)."""
    modality = cfg.pairing_free.teacher_modality if kind == "second_modality" else cfg.student.student_modality
    teacher = with_pipeline(seeded(cfg.teacher, seed), modalities=(modality,), synthetic_sources=sources)
    if kind == "synthetic_student_budget":
        teacher = dataclasses.replace(teacher, loop=student_budget(teacher.loop, cfg.student.loop, train_rows))
    return teacher, (cfg.synthetic_ratio if kind.startswith("synthetic") else 0.0)


def student_budget(loop, student_loop, train_rows: int):
    """`loop` with the students' training budget: their epochs, early stopping, burn-in and epoch length
    (optimizer steps per epoch); learning rate and batch stay the model's own."""
    return dataclasses.replace(loop, epochs=student_loop.epochs, patience=student_loop.patience,
                               min_epochs=student_loop.min_epochs,
                               train_samples=student_loop.train_samples or train_rows)


def student_setup(cfg: ExperimentConfig, arm: str, seed: int, sources: tuple[str, ...], teacher_dir: str,
                  train_rows: int = 0):
    """The StudentConfig of a student arm, as `diffkd run` builds its students, with every arm's epoch
    `train_rows` long (0: as the stream counts it; `loop.train_samples` set in the config wins)."""
    student = seeded(cfg.student, seed)
    student = dataclasses.replace(student, loop=dataclasses.replace(
        student.loop, train_samples=student.loop.train_samples or train_rows))
    kd = dataclasses.replace(
        with_pipeline(student, synthetic_ratio=cfg.synthetic_ratio, synthetic_sources=sources),
        teacher_dir=teacher_dir, mode="paired")
    if arm == "full":
        return kd
    if arm == "no_synthesis":
        return with_pipeline(kd, synthetic_ratio=0.0)
    if arm == "no_kd":  # plain_variant also drops the synthetic rows; this arm keeps them
        return with_pipeline(plain_variant(kd), synthetic_ratio=cfg.synthetic_ratio)
    if arm == "neither":
        return plain_variant(kd)
    if arm == "pairing_free":
        return pairing_free_student(kd, cfg.pairing_free, teacher_dir)
    raise ValueError(f"{arm!r} is not a student arm")


def teacher_dir(out_dir: str, kind: str, seed: int) -> str:
    return os.path.join(out_dir, "teachers", f"{kind}-s{seed}")


def trial_dir(out_dir: str, arm: str, seed: int) -> str:
    return os.path.join(out_dir, "trials", f"{arm}-s{seed}")


def _teacher_key(plan: Plan, cfg: ExperimentConfig, kind: str, seed: int) -> str:
    teacher, ratio = teacher_setup(cfg, kind, seed, plan.sources[seed], plan.train_rows)
    return fingerprint({"data": plan.data_key, "teacher": to_dict(teacher), "ratio": ratio,
                        "splits": to_dict(cfg.splits)})


def trial_key(plan: Plan, cfg: ExperimentConfig, arm: str, seed: int) -> str:
    """What a trial's result depends on: data, splits, its configs, its teacher's, the generator run."""
    kind = teacher_kind(arm)
    parts: dict[str, Any] = {"data": plan.data_key, "arm": arm, "splits": to_dict(cfg.splits),
                             "teacher": _teacher_key(plan, cfg, kind, seed) if kind else None}
    if arm not in TEACHER_ARMS:
        student = to_dict(student_setup(cfg, arm, seed, plan.sources[seed], "", plan.train_rows))
        if arm not in ARM_TEACHER:  # a plain student has no distillation terms: changing them leaves it current
            student.pop("distill")
        parts["student"] = student
    return fingerprint(parts)


def is_current(folder: str, key: str) -> bool:
    """True when `folder` holds finished predictions trained on exactly what `key` describes."""
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


def ensure_teacher(plan: Plan, cfg: ExperimentConfig, kind: str, seed: int) -> str:
    """The teacher of `kind` for `seed`, trained now unless a current one exists; its folder."""
    target = teacher_dir(plan.out_dir, kind, seed)
    key = _teacher_key(plan, cfg, kind, seed)
    with _exclusive(target + ".lock"):
        if not is_current(target, key):
            teacher, ratio = teacher_setup(cfg, kind, seed, plan.sources[seed], plan.train_rows)
            name = f"teacher_{kind}-s{seed}-{key[:10]}"
            train_teacher(plan.dataset, plan.assignments, checkpointed(teacher, plan.out_dir, name), target,
                          synthetic_ratio=ratio, model_name=f"teacher_{kind}")
            atomic_write_json(os.path.join(target, TRIAL_INFO), {"key": key, "kind": kind, "seed": seed})
    return target


def run_trial(params: dict[str, Any], *, plan: Plan) -> None:
    """Tune's trainable: one arm for one seed, trained unless current; reports its external AUC."""
    import ray.tune  # only a Tune trial reports: reading the tables needs no Ray

    started_at = time.time()
    arm, seed = params["trial"]["arm"], int(params["trial"]["seed"])
    cfg = from_dict(ExperimentConfig, plan.experiment, "experiment")
    target = trial_dir(plan.out_dir, arm, seed)
    key = trial_key(plan, cfg, arm, seed)
    if not is_current(target, key):
        kind = teacher_kind(arm)
        teacher = ensure_teacher(plan, cfg, kind, seed) if kind else ""
        if arm in TEACHER_ARMS:
            os.makedirs(target, exist_ok=True)
            predictions = pd.read_parquet(os.path.join(teacher, PREDICTIONS)).assign(model=arm)
            atomic_write_parquet(os.path.join(target, PREDICTIONS), predictions)
        else:
            student = student_setup(cfg, arm, seed, plan.sources[seed], teacher, plan.train_rows)
            train_student(plan.dataset, plan.assignments,
                          checkpointed(student, plan.out_dir, f"{arm}-s{seed}-{key[:10]}"), target, model_name=arm)
        atomic_write_json(os.path.join(target, TRIAL_INFO), {"key": key, "arm": arm, "seed": seed,
                                                             "teacher": teacher or None})
    external = pd.read_parquet(os.path.join(target, PREDICTIONS))
    external = external[external["split"] == "test"]
    # started_at, finished_at: the trial's wall-clock span (bench/ablate.py splits the job's time with them)
    ray.tune.report({"external_auc": auc_or_nan(external["label"], external["prob"]), "cases": float(len(external)),
                     "started_at": started_at, "finished_at": time.time()})


# ---- the job --------------------------------------------------------------------------------------

def applicable_arms(arms: list[str], modalities: set[str], cfg: ExperimentConfig) -> tuple[list[str], list[str]]:
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


def student_train_rows(assignments: pd.DataFrame, cfg: ExperimentConfig) -> int:
    """Real training rows (images) of the student's modality: the length of every student arm's epoch."""
    rows = assignments[(assignments["split"] == "train") & (assignments["modality"] == cfg.student.student_modality)]
    if "synthetic" in rows:
        rows = rows[~rows["synthetic"].astype(bool)]
    return int(len(rows))


def data_key(ds) -> str:
    return fingerprint({name: entry["files"] for name, entry in ds.manifest["centers"].items()})


@dataclass
class Design:
    """What an ablation will train and how it will be judged, known before any training."""

    dataset: ImageDataset
    assignments: pd.DataFrame
    arms: list[str]
    seeds: list[int]
    notes: list[str]
    plan: dict  # plan.json's content (preregistration.build_plan)
    reader: pd.Series | None = None  # the reader column's score per case_id, where the external cases carry it


def design(dataset: str, external: list[str], cfg: ExperimentConfig, settings: AblationConfig) -> Design:
    """Check the inputs, split the cases and build the plan's content; trains nothing, needs no Ray."""
    ds = ImageDataset(dataset)
    if not ds.exists():
        raise ConfigError(f"{dataset} is not a diffkd dataset (no manifest.json): run `diffkd ingest` first")
    if not external:
        raise ConfigError("an ablation compares arms on external centers: give --external")
    real = ds.metadata().to_pandas()
    assignments = make_splits(real, external, cfg.splits.val_fraction, cfg.splits.seed)
    check_no_leakage(assignments)
    seeds = list(range(settings.seeds))
    arms, notes = applicable_arms(list(settings.arms), set(real["modality"]), cfg)
    if not arms:
        raise ConfigError(f"no arm of {settings.arms} can run on this dataset: {'; '.join(notes)}")
    reader = _reader_scores(real, assignments, settings.reader_column)
    cases = assignments.drop_duplicates("case_id")
    centers = {str(c): {"cases": int(len(g)), "positives": int(g["label"].sum()),
                        "split": "+".join(sorted(set(g["split"])))} for c, g in cases.groupby("center")}
    content = build_plan(
        cohort_fingerprint=data_key(ds), centers=centers, external=list(external), config=to_dict(cfg), arms=arms,
        seeds=seeds, arms_left_out=[n for n in notes if n.startswith("arm ")], analysis=analysis_method(settings),
        expected=_expected_precision(cases[cases["split"] == "test"], len(seeds), settings),
        center=ALL_EXTERNAL if len(external) > 1 else external[0],
        reader=settings.reader_column if reader is not None else None)
    return Design(ds, assignments, arms, seeds, notes, content, reader)


def _reader_scores(real: pd.DataFrame, assignments: pd.DataFrame, column: str) -> pd.Series | None:
    """The reader column's scores per case, or None when no external case carries a value."""
    if not column or column not in real.columns:
        return None
    scores = reader_scores(real, column)
    external = assignments.loc[assignments["split"] == "test", "case_id"].astype(str)
    return scores if scores.reindex(external).notna().any() else None


def analysis_method(settings: AblationConfig) -> dict:
    return {"method": PooledEstimate.method, "n_boot": settings.n_boot, "level": LEVEL}


def _expected_precision(external_cases: pd.DataFrame, seeds: int, settings: AblationConfig) -> dict | None:
    positives = int(external_cases["label"].sum())
    if positives == 0 or positives == len(external_cases):
        return None
    assumptions = PlanningAssumptions(settings.plan_auc, settings.plan_arm_correlation, settings.plan_seed_sd)
    return expected_precision(positives, len(external_cases) - positives, seeds, assumptions)


def finished_trial_names(out_dir: str) -> list[str]:
    """Trial folders that hold a finished trial (its record and predictions), current or not."""
    root = os.path.join(out_dir, "trials")
    if not os.path.isdir(root):
        return []
    return sorted(name for name in os.listdir(root) if os.path.exists(os.path.join(root, name, TRIAL_INFO))
                  and os.path.exists(os.path.join(root, name, PREDICTIONS)))


def plan_ablation(dataset: str, external: list[str], cfg: ExperimentConfig, out_dir: str,
                  settings: AblationConfig | None = None) -> dict:
    """Write OUT/plan.json before any training (`diffkd ablate --plan-only`) and return it; refused
    once a trial under an existing plan has finished (preregistration.write_plan)."""
    planned = design(dataset, external, cfg, settings or cfg.ablation)
    out = str(Path(out_dir).resolve())
    return write_plan(out, planned.plan, finished_trial_names(out))


def ablate(dataset: str, external: list[str], cfg: ExperimentConfig, out_dir: str,
           settings: AblationConfig | None = None, train: bool = True) -> AblationOutcome:
    """Train every arm x seed (one Tune trial each) and write the tables and the forest plot.

    The plan comes first: OUT/plan.json is written before anything trains unless the folder has one
    (which is then kept as written); the tables compare the run with it. `train=False` trains nothing:
    the tables and plot are written from the trials that have finished with the current settings
    (e.g. while a long ablation runs elsewhere, or after a time budget).
    """
    settings = settings or cfg.ablation
    start = time.perf_counter()
    out = Path(out_dir).resolve()
    planned = design(dataset, external, cfg, settings)
    ds, assignments, arms, notes, seeds = (planned.dataset, planned.assignments, planned.arms, planned.notes,
                                           planned.seeds)
    (out / "models").mkdir(parents=True, exist_ok=True)
    if train and preregistration.read_plan(str(out)) is None:
        preregistration.write_plan(str(out), planned.plan, finished_trial_names(str(out)))
    if train:
        raycompat.init(cfg.ray.address or None, **({"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}))

    # ---- the shared stage: diffusion + synthesis, once (or once per seed) ---------------------------
    sources: dict[int, tuple[str, ...]] = {seed: () for seed in seeds}
    if cfg.diffusion.enabled and any(arm in SYNTHETIC_ARMS for arm in arms):
        generators = Pipeline(ds, external, assignments, cfg, out, RunState.load(out), stage_inputs(dataset, external, cfg),
                          plan_stages(ds, assignments, cfg, None) if train else StagePlan())

        def generator(stage_cfg: ExperimentConfig, suffix: str = "") -> tuple[str, ...]:
            name, state = "synth" + suffix, generators.state
            if not train:  # the generator run the trials read, as the shared stage recorded it
                if name not in state.stages:
                    raise ConfigError(f"{out} holds no finished generator stage ({name}): nothing to report")
                return (state.stages[name]["result"]["run_id"],)
            pipeline = dataclasses.replace(generators, cfg=stage_cfg)
            pipeline.execute(generator_stages(pipeline, suffix))
            if pipeline.results[name] is None:
                raise RuntimeError(f"the shared generator stage failed ({'; '.join(state.failed.values())}); "
                                   "rerun the same command to retry it")
            return (pipeline.results[name]["run_id"],)

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
                data_key=data_key(ds), out_dir=str(out), train_rows=student_train_rows(assignments, cfg))
    trials = ordered_trials(arms, seeds)
    concurrent, failed = 0, []
    if train:
        preregistration.record_first_trial_start(str(out))
        concurrent, failed = _run_trials(plan, trials, settings, cfg, str(out))
    finished = [t for t in trials if is_current(trial_dir(str(out), t["arm"], t["seed"]),
                                                trial_key(plan, cfg, t["arm"], t["seed"]))]
    if len(finished) < len(trials):
        notes.append(f"{len(trials) - len(finished)} of {len(trials)} trial(s) did not finish "
                     "(failed, past the time budget or not run); rerun the same command to finish them")
    reader = (settings.reader_column, planned.reader) if planned.reader is not None else None
    table, summary = summarize(str(out), finished, settings.n_boot, settings.target_half_width, reader)
    by_arm = {arm: sorted(t["seed"] for t in finished if t["arm"] == arm) for arm in {t["arm"] for t in finished}}
    written = preregistration.read_plan(str(out))
    found = preregistration.deviations(written, cohort_fingerprint=plan.data_key, external=external,
                                       config=to_dict(cfg), finished=by_arm, analysis=analysis_method(settings))
    outcome = AblationOutcome(out_dir=str(out), table=table, summary=summary,
                              distillation=distillation_table(str(out), finished), arms=arms, seeds=seeds,
                              parallel=concurrent, wall_s=time.perf_counter() - start, failed=failed, notes=notes,
                              plan=preregistration.plan_record(written, found))
    outcome.files = write_outputs(outcome, settings)
    return outcome


def _run_trials(plan: Plan, trials: list[dict[str, Any]], settings: AblationConfig, cfg: ExperimentConfig,
                out: str) -> tuple[int, list[str]]:
    """The Tune job: one trial per arm x seed; returns (trials at once, the failed trials' errors)."""
    import ray  # Ray starts only for training: `--plan-only` and `--report-only` run without it
    from ray import tune

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

def external_predictions(out_dir: str, trials: list[dict[str, Any]]) -> pd.DataFrame:
    """The external cases' probabilities of every finished trial: arm, seed, case_id, patient_id, center, label, prob."""
    frames = []
    for t in trials:
        preds = pd.read_parquet(os.path.join(trial_dir(out_dir, t["arm"], t["seed"]), PREDICTIONS))
        preds = preds[preds["split"] == "test"]
        frames.append(preds[["case_id", "patient_id", "center", "label", "prob"]].assign(arm=t["arm"], seed=t["seed"]))
    columns = ["arm", "seed", "case_id", "patient_id", "center", "label", "prob"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def _groups(predictions: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Each external center, plus all of them together when there are several."""
    centers = sorted(predictions["center"].unique())
    groups = [(c, predictions[predictions["center"] == c]) for c in centers]
    return groups + ([(ALL_EXTERNAL, predictions)] if len(centers) > 1 else [])


def _auc_row(rows: pd.DataFrame) -> dict[str, float]:
    """AUC with a 95% CI: DeLong, or the patient-clustered bootstrap where a patient has several cases."""
    if rows["label"].nunique() < 2:
        return {"auc": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    estimate = auc_with_ci(rows["label"], rows["prob"], groups=rows["patient_id"])
    return {"auc": estimate.auc, "ci_low": estimate.ci[0], "ci_high": estimate.ci[1]}


def score_matrix(rows: pd.DataFrame, arm: str, seeds: list[int], cases: list[str]) -> Any:
    """(len(seeds), len(cases)) probabilities of `arm`, row k from seeds[k], column i case cases[i]."""
    wide = rows[rows["arm"] == arm].pivot(index="seed", columns="case_id", values="prob")
    return wide.loc[seeds, cases].to_numpy()


def summarize(out_dir: str, trials: list[dict[str, Any]], n_boot: int = 2000, target_half_width: float = 0.04,
              reader: tuple[str, pd.Series] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ablation.csv (one row per arm x seed x center) and the pooled summary (one row per arm x center).

    `seeds_for_target`: seeds that would bring the difference's CI to +/- `target_half_width` on the
    same external cases ("more cases": the cases alone are wider; "unknown (one seed)"). `reader`:
    (column, score per case_id) of the radiologists' reading: its seed-free arm and the `full` student
    stacked on it join the tables, and every arm is also compared with the reader."""

    predictions = external_predictions(out_dir, trials)
    if reader is not None:
        predictions = pd.concat([predictions, *reader_arm_predictions(out_dir, trials, predictions, *reader)],
                                ignore_index=True)
    rows = []
    for (arm, seed), preds in predictions.groupby(["arm", "seed"], sort=False):
        steps, flags = optimizer_steps(out_dir, arm, int(seed)), health_flags(out_dir, arm, int(seed))
        for center, group in _groups(preds):
            rows.append({"arm": arm, "seed": int(seed), "center": center, "cases": len(group),
                         "upgrades": int(group["label"].sum()), **_auc_row(group), "optimizer_steps": steps,
                         "health_flags": flags})
    table = pd.DataFrame(rows, columns=["arm", "seed", "center", "cases", "upgrades", "auc", "ci_low", "ci_high",
                                        "optimizer_steps", "health_flags"])

    summary = []
    derived = [stacked_arm(reader[0]), reader_arm(reader[0])] if reader is not None else []
    arms = [a for a in (*TRIAL_ORDER, *derived) if a in set(predictions["arm"])]
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
                   "auc_between_seed_sd": pooled.between_seed_sd,
                   "optimizer_steps": _mean_steps(table, arm, seeds)}
            if arm != REFERENCE_ARM and REFERENCE_ARM in set(group["arm"]):
                paired = set(group.loc[group["arm"] == REFERENCE_ARM, "seed"]) & set(seeds)
                row.update(_difference(group, arm, sorted(paired), n_boot, target_half_width))
            if reader is not None and arm != reader_arm(reader[0]) and reader_arm(reader[0]) in set(group["arm"]):
                versus = _difference(group, arm, seeds, n_boot, target_half_width, reference=reader_arm(reader[0]))
                row.update({name: versus[key] for key, name in READER_COLUMNS.items() if key in versus})
            summary.append(row)
    return table, pd.DataFrame(summary)


def reader_arm_predictions(out_dir: str, trials: list[dict[str, Any]], predictions: pd.DataFrame, column: str,
                           scores: pd.Series) -> list[pd.DataFrame]:
    """The reader's seed-free rows (one copy per seed of the trained arms) and, per finished `full` trial,
    that student stacked on the reader (diffkd.evaluate.reader_arms), as external prediction rows."""

    columns = ["arm", "seed", "case_id", "patient_id", "center", "label", "prob"]
    seeds = sorted(set(predictions["seed"]))
    frames = [reader_predictions(predictions, scores, reader_arm(column), seeds)[columns]]
    for t in trials:
        if t["arm"] != REFERENCE_ARM:
            continue
        trial = pd.read_parquet(os.path.join(trial_dir(out_dir, t["arm"], t["seed"]), PREDICTIONS))
        stacked = stacked_probabilities(trial, scores)
        frames.append(stacked.assign(arm=stacked_arm(column), seed=t["seed"])[columns])
    return frames


def training_info(out_dir: str, arm: str, seed: int) -> dict:
    """The trial's model's training.json (a teacher arm's teacher's); {} when there is none."""

    folder = trial_dir(out_dir, arm, seed)
    if arm in TEACHER_ARMS:
        info_path = os.path.join(folder, TRIAL_INFO)
        folder = (json.loads(Path(info_path).read_text()).get("teacher") or "") if os.path.exists(info_path) else ""
    path = os.path.join(folder, TRAINING_INFO)
    return json.loads(Path(path).read_text()) if folder and os.path.exists(path) else {}


def optimizer_steps(out_dir: str, arm: str, seed: int) -> float:
    """Optimizer steps the trial's model took (its training.json history; a teacher arm's teacher's)."""
    history = training_info(out_dir, arm, seed).get("history") or []
    return float(history[-1].get("global_step", math.nan)) if history else math.nan


def health_flags(out_dir: str, arm: str, seed: int) -> str:
    """The trial's model's training-health flags (diffkd.evaluate.health), ';'-joined; '' when healthy or unknown."""
    health = (training_info(out_dir, arm, seed).get("metrics") or {}).get("health") or {}
    return ";".join(health.get("flags") or [])


def _mean_steps(table: pd.DataFrame, arm: str, seeds: list[int]) -> float:
    steps = table.loc[(table["arm"] == arm) & table["seed"].isin(seeds), ["seed", "optimizer_steps"]]
    values = steps.drop_duplicates("seed")["optimizer_steps"].dropna()
    return float(values.mean()) if len(values) else math.nan


DISTILLATION_COLUMNS = ["arm", "seed", "params", "best_epoch", "epochs_run", "val_auc", "agree_corr", "agree_kl",
                        "agree_top1", "external_auc", "teacher_auc", "gap", "gap_ci_low", "gap_ci_high", "gap_p"]


def distillation_table(out_dir: str, trials: list[dict[str, Any]]) -> pd.DataFrame:
    """distillation.csv: per student trial, the epoch kept, its internal-validation agreement with the
    teacher there (`diffkd.distill.agreement`; the plain arms are measured against the full arm's
    teacher) and its external AUC minus the teacher's on the same cases (paired, 95% CI)."""

    rows = []
    for t in trials:
        path = os.path.join(trial_dir(out_dir, t["arm"], t["seed"]), TRAINING_INFO)
        if t["arm"] in TEACHER_ARMS or not os.path.exists(path):
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


def _shared_cases(group: pd.DataFrame, arms: list[str], seeds: list[int]) -> list[str]:
    """Cases every listed arm scored under every listed seed (the unit of pairing)."""
    cases = None
    for arm in arms:
        for seed in seeds:
            scored = set(group.loc[(group["arm"] == arm) & (group["seed"] == seed), "case_id"])
            cases = scored if cases is None else cases & scored
    return sorted(cases or ())


def _case_columns(group: pd.DataFrame, cases: list[str]) -> tuple[list[int], list[str]]:
    """Labels and patient ids of `cases`. Patients are resampled within label strata only, not within
    centers: fixing each center's share of upgrades would leave out the variation a pooled AUC over
    several centers has from it (about half the SE on the evidence run's two centers)."""
    first = group.drop_duplicates("case_id").set_index("case_id").loc[cases]
    return first["label"].astype(int).tolist(), first["patient_id"].astype(str).tolist()


def _difference(group: pd.DataFrame, arm: str, seeds: list[int], n_boot: int,
                target_half_width: float, reference: str = REFERENCE_ARM) -> dict[str, float]:
    """The arm minus `reference` (`full`), paired by seed and case, pooled over seeds (diffkd.evaluate.pooled)."""
    cases = _shared_cases(group, [arm, reference], seeds)
    if not seeds or not cases:
        return {}
    labels, patients = _case_columns(group, cases)
    if len(set(labels)) < 2:
        return {}
    diff = pooled_auc_difference(labels, score_matrix(group, arm, seeds, cases),
                                 score_matrix(group, reference, seeds, cases), patients=patients,
                                 n_boot=n_boot)
    return {"paired_seeds": diff.seeds, "diff_vs_full": diff.estimate, "diff_ci_low": diff.ci[0],
            "diff_ci_high": diff.ci[1], "diff_se": diff.se, "diff_df": diff.df, "p": diff.p, "mdd_80": diff.mdd,
            "diff_between_seed_sd": diff.between_seed_sd,
            "seeds_for_target": _seeds_needed(diff, target_half_width)}


def _seeds_needed(diff, target_half_width: float) -> str:
    """Seeds that would bring the CI to +/- the target on these cases, as a table cell."""
    if diff.seeds < 2:  # one seed: the seed part of the variance is unknown
        return "unknown (one seed)"
    needed = seeds_for_half_width(diff, target_half_width)
    return "more cases" if needed is None else str(needed)


def format_summary(summary: pd.DataFrame, target_half_width: float = 0.04) -> str:
    target = f"K for +/-{target_half_width:g}"
    has_reader = "diff_vs_reader" in summary.columns
    lines = [f"{'arm':<22} {'center':<13} {'seeds':>5} {'cases':>5} {'steps':>6}  {'mean ext. AUC (95% CI)':<24} "
             f"{'minus full (95% CI)':<26} {'p':>6} {'MDD80':>6}  {target}"
             + (f"  {'minus reader (95% CI), p':<34}" if has_reader else "")]
    for _, r in summary.iterrows():
        auc_text = f"{r['mean_auc']:.3f} ({r['auc_ci_low']:.3f}-{r['auc_ci_high']:.3f})"
        steps = r.get("optimizer_steps", math.nan)
        steps_text = "" if not isinstance(steps, float) or math.isnan(steps) else f"{steps:.0f}"
        diff = r.get("diff_vs_full", math.nan)
        if isinstance(diff, float) and not math.isnan(diff):
            diff_text = f"{diff:+.3f} ({r['diff_ci_low']:+.3f} to {r['diff_ci_high']:+.3f})"
            p_text, mdd_text = f"{r['p']:.3f}", f"{r['mdd_80']:.3f}"
            needed = str(r["seeds_for_target"])
        else:
            diff_text, p_text, mdd_text, needed = "reference" if r["arm"] == REFERENCE_ARM else "", "", "", ""
        versus = r.get("diff_vs_reader", math.nan) if has_reader else math.nan
        reader_text = (f"  {versus:+.3f} ({r['reader_diff_ci_low']:+.3f} to {r['reader_diff_ci_high']:+.3f}), "
                       f"p {r['p_vs_reader']:.3f}" if isinstance(versus, float) and not math.isnan(versus) else "")
        lines.append(f"{r['arm']:<22} {r['center']:<13} {r['seeds']:>5} {r['cases']:>5} {steps_text:>6}  "
                     f"{auc_text:<24} {diff_text:<26} {p_text:>6} {mdd_text:>6}  {needed:<12}{reader_text}")
    return "\n".join(lines)


def write_outputs(outcome: AblationOutcome, settings: AblationConfig) -> dict[str, str]:
    out = outcome.out_dir
    files = {"table": os.path.join(out, "ablation.csv"), "summary": os.path.join(out, "ablation_summary.csv"),
             "json": os.path.join(out, "ablation.json"), "plot": os.path.join(out, "ablation_forest.png"),
             "distillation": os.path.join(out, "distillation.csv")}
    atomic_write_text(files["table"], outcome.table.to_csv(index=False))
    atomic_write_text(files["distillation"], outcome.distillation.to_csv(index=False))
    status = outcome.plan.get("status", "exploratory")
    atomic_write_text(files["summary"], outcome.summary.assign(evidence=status).to_csv(index=False))
    atomic_write_json(files["json"], {
        "arms": outcome.arms, "seeds": outcome.seeds, "reference": REFERENCE_ARM, "parallel": outcome.parallel,
        "wall_s": outcome.wall_s, "failed": outcome.failed, "notes": outcome.notes, "settings": to_dict(settings),
        "evidence": status, "plan": outcome.plan,
        "method": PooledEstimate.method + f", {settings.n_boot} replicates; see diffkd/evaluate/pooled.py",
        "summary": outcome.summary.to_dict(orient="records"), "trials": outcome.table.to_dict(orient="records"),
        "distillation": outcome.distillation.to_dict(orient="records")})
    plot_forest(outcome.table, outcome.summary, files["plot"])
    return files


def plot_forest(table: pd.DataFrame, summary: pd.DataFrame, path: str) -> str:
    """Left: each arm's external AUC per seed (dots) and its mean over seeds (95% CI); right: the
    paired difference from `full` (95% CI) with the minimum detectable difference shaded."""
    import matplotlib  # the plotting backend is chosen here, before pyplot loads, not at import of the module

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    right.set_xlabel("AUC minus full, paired (95% CI)\ngrey: MDD at 80% power")
    fig.suptitle("Ablation on the external cases (95% CIs over patients and seeds: diffkd.evaluate.pooled)")
    fig.tight_layout()
    return save_figure(fig, path)
