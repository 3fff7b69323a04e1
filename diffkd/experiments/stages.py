"""The stages of `diffkd run`, each declared once: its name, the stages whose outputs it reads, what its
key holds (its config section), the function that runs it and what it writes.

A `Pipeline` executes declarations through the run state (`diffkd.experiments.runstate`): a stage whose
key is unchanged is skipped, one whose key changed runs again and so do the stages that read it, and
one whose inputs did not finish is not run. Declarations come from generators (`pipeline_stages`,
`generator_stages`) that the pipeline consumes one stage at a time, so a stage can be shaped by what
the stages before it produced: the teachers mix synthetic rows only when synthesis finished, each
student trains with what its search found. `diffkd run` executes `pipeline_stages`; `diffkd ablate`
executes `generator_stages` for the generator its trials share.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from diffkd.config import from_dict, to_dict
from diffkd.data.dataset import SYNTHETIC_DIR, ImageDataset
from diffkd.data.pipeline import load_arrays
from diffkd.data.schema import CLINICAL_COLUMNS
from diffkd.data.splits import SplitConfig
from diffkd.evaluate.baselines import ClinicalEncoder, DeepFeatures, cross_fitted_features, fit_baselines
from diffkd.evaluate.report import DEEP_FEATURE_EXTRACTOR
from diffkd.experiments.experiment import BaselineStage, DiffusionStage, ExperimentConfig, PairingFreeStage, TuneStage
from diffkd.experiments.run_report import dataset_reads, pseudonymised_reads, write_run_report
from diffkd.experiments.runstate import RunState
from diffkd.experiments.tune import EXPERIMENT, arm_space, tune_student
from diffkd.experiments.tune_space import load_space
from diffkd.models.classifiers import create_classifier, features, initialised_from, load_classifier
from diffkd.synth import SynthConfig, audit, synthesize, with_synthesis_sampling
from diffkd.train.diffusion_task import train_diffusion
from diffkd.train.student import StudentConfig, plain_variant, train_student
from diffkd.train.teacher import TeacherConfig, train_teacher

SEARCH_PREFIX = "tune_"  # a student arm's search stage is this prefix + the arm's name
AUDIT_GRIDS = ("synthetic_grid.png", "synthetic_label_pairs.png", "synthetic_near_copies.png")


@dataclass(frozen=True)
class Stage:
    """One stage, as run_state.json knows it."""

    name: str
    reads: tuple[str, ...]  # the stages whose outputs it reads: they must have finished, and re-running one re-runs it
    config: dict[str, Any]  # what its key holds beside the dataset and split: its config section, as a dict
    run: Callable[[], dict]  # does the work; returns the small result run_state.json records
    writes: str  # where its outputs go, relative to OUT (the dataset's own folder for synthesis)
    classifier: bool = False  # its folder holds a classifier whose predictions the report scores
    exclusive: bool = False  # runs with no other stage beside it (Pipeline.parallel)


@dataclass
class StagePlan:
    """What the dataset and the config allow, decided before anything trains."""

    diffusion: bool = True
    mask_conditioning: bool = True  # diffusion.model.model.mask_channel, unless no training image has a mask
    pairing_free: bool = True
    clinical_baselines: bool = True  # the clinical and combined models (the deep-feature model needs no clinical data)
    skipped: dict[str, str] = field(default_factory=dict)  # stage or model -> why it will not run
    changes: list[str] = field(default_factory=list)  # what runs differently from the config, and why


@dataclass
class Pipeline:
    """One run's inputs, its run state, and the results of the stages executed so far.

    `parallel` > 1 runs up to that many stages at once: a declared stage starts, in declaration order,
    once the stages it reads have finished and a slot is free, and the generator declaring them waits
    only where it reads a result (`result`). A stage marked `exclusive` (a search, which plans its
    own concurrency over the whole cluster) runs alone, in the declaring thread.
    """

    ds: ImageDataset
    external: list[str]
    assignments: pd.DataFrame  # every row's split
    cfg: ExperimentConfig
    out: Path
    state: RunState
    common: dict  # `stage_inputs`: what every stage's key starts from
    plan: StagePlan = field(default_factory=StagePlan)
    results: dict[str, dict | None] = field(default_factory=dict)  # stage -> its result; None: failed or not run
    executed: list[Stage] = field(default_factory=list)
    parallel: int = 1
    _scheduler: "_Scheduler | None" = field(default=None, init=False, repr=False, compare=False)

    def execute(self, stages: Iterable[Stage]) -> None:
        """Run each stage as it is declared (skipped when current); a failure is recorded in the run state
        and the stages that do not read it still run. Returns when every declared stage has ended."""
        if self.parallel <= 1:
            for stage in stages:
                self.executed.append(stage)
                self._run(stage)
            return
        self._scheduler = _Scheduler(self._run, self.parallel)
        try:
            for stage in stages:
                self.executed.append(stage)
                self._scheduler.submit(stage)
            self._scheduler.join()
        finally:
            self._scheduler = None

    def result(self, name: str) -> dict | None:
        """A declared stage's result, once it has ended (None: failed, not run or not declared)."""
        if self._scheduler is not None:
            self._scheduler.wait(name)
        return self.results.get(name)

    def finish(self, stage: Stage) -> dict:
        """Run the last stage, whose failure ends the run."""
        self.executed.append(stage)
        self.results[stage.name] = self.state.run(stage.name, {**self.common, **stage.config}, stage.run,
                                                  after=stage.reads)
        return self.results[stage.name]

    def model_dirs(self) -> dict[str, str]:
        """Each finished classifier's folder: teachers, then students, each led by the one that sees synthetic
        images (`teacher`, `student_kd`), the rest in the order they were declared."""
        finished = [s for s in self.executed if s.classifier and self.results[s.name] is not None]
        finished.sort(key=lambda s: (not s.name.startswith("teacher"), s.name not in ("teacher", "student_kd")))
        return {s.name: str(self.out / s.writes) for s in finished}

    def _run(self, stage: Stage) -> None:
        self.results[stage.name] = self.state.try_run(stage.name, {**self.common, **stage.config}, stage.run,
                                                      after=stage.reads)


class _Scheduler:
    """Runs declared stages in threads, at most `slots` at once, each after the stages it reads; an exclusive
    stage in the declaring thread, once every stage declared before it has ended."""

    def __init__(self, run: Callable[[Stage], None], slots: int):
        self._run, self._slots = run, slots
        self._changed = threading.Condition()
        self._pending: list[Stage] = []  # declared, not started: started in this order when ready
        self._ended: dict[str, threading.Event] = {}
        self._running: set[str] = set()
        self._error: BaseException | None = None

    def submit(self, stage: Stage) -> None:
        with self._changed:
            self._ended[stage.name] = threading.Event()
        if stage.exclusive:  # Tune (a search) runs in the main thread, as it expects, with the cluster to itself
            self.join()
            try:
                self._run(stage)
            finally:
                self._ended[stage.name].set()
            return
        with self._changed:
            self._pending.append(stage)
            self._start_ready()

    def wait(self, name: str) -> None:
        if name in self._ended:
            self._ended[name].wait()

    def join(self) -> None:
        """Wait for every submitted stage to end; re-raise what escaped a stage (try_run records failures,
        so only a fault of the pipeline itself gets here)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending and not self._running)
        if self._error is not None:
            raise self._error

    def _start_ready(self) -> None:  # holding the lock
        for stage in list(self._pending):
            if len(self._running) >= self._slots:
                return
            if any(not self._ended[r].is_set() for r in stage.reads if r in self._ended):
                continue
            self._pending.remove(stage)
            self._running.add(stage.name)
            threading.Thread(target=self._run_one, args=(stage,), name=f"stage-{stage.name}", daemon=True).start()

    def _run_one(self, stage: Stage) -> None:
        try:
            self._run(stage)
        except BaseException as err:  # noqa: BLE001 - handed to the thread that joins
            self._error = self._error or err
        finally:
            with self._changed:
                self._running.discard(stage.name)
                self._ended[stage.name].set()
                self._start_ready()
                self._changed.notify_all()


def stage_inputs(dataset: str | os.PathLike, external: list[str], cfg: ExperimentConfig) -> dict:
    """What every stage's key in run_state.json starts from.

    The split is written as before SplitConfig held the external centers (they come first, from the
    command line), so that runs started by earlier releases still resume.
    """
    return {"dataset": str(dataset), "external": list(external),
            "splits": {"val_fraction": cfg.splits.val_fraction, "seed": cfg.splits.seed}}


# ---- the declarations ------------------------------------------------------------------------------------

def generator_stages(p: Pipeline, suffix: str = "") -> Iterator[Stage]:
    """The diffusion model (trained on the internal train split) and its synthetic rows.

    `p.plan.mask_conditioning` False trains without the mask channel (no training image has a mask);
    `suffix` keeps several generators of one output folder apart (diffkd ablate --per-seed-generators).
    """
    cfg = p.cfg
    name = "diffusion" + suffix
    diffusion_dir = str(p.out / "models" / name)
    diffusion_cfg = cfg.diffusion if p.plan.mask_conditioning else dataclasses.replace(
        cfg.diffusion, model=dataclasses.replace(
            cfg.diffusion.model, model=dataclasses.replace(cfg.diffusion.model.model, mask_channel=False)))
    split = dataclasses.replace(cfg.splits, external=list(p.external))
    yield Stage(name, (), {"cfg": to_dict(diffusion_cfg)},
                functools.partial(_train_generator, p.ds, diffusion_dir, diffusion_cfg, split, p.out, name),
                f"models/{name}")
    yield Stage("synth" + suffix, (name,), {"cfg": to_dict(cfg.synth)},
                functools.partial(_synthesize, p.ds, diffusion_dir, cfg.synth), f"{p.ds.root}/{SYNTHETIC_DIR}")


def pipeline_stages(p: Pipeline) -> Iterator[Stage]:
    """Every stage of `diffkd run` but the report.

    Declared so that stages running at once (`Pipeline.parallel`) keep both slots busy: the generator
    first, then the real-image stages that do not wait for it (baselines, the real-only teacher and the
    pairing-free teacher, their students), then what reads the synthetic images. The real-only arms
    train whenever synthesis is planned; if it then fails, `teacher` is real-only too.
    """
    cfg, models = p.cfg, p.out / "models"
    if p.plan.diffusion:
        yield from generator_stages(p)
    mixing = p.plan.diffusion and cfg.synthetic_ratio > 0
    if cfg.baselines.enabled:
        yield Stage("baselines", (), {"cfg": to_dict(cfg.baselines)},
                    functools.partial(baselines, p.ds, p.assignments, cfg.baselines, p.out,
                                      cfg.student.student_modality, p.plan.clinical_baselines),
                    "models/baselines_predictions.parquet")

    # ---- real images only: the real-only teacher (beside the mixed one) and the pairing-free teacher ----
    teacher_cfg = with_pipeline(cfg.teacher, modalities=(cfg.student.student_modality,))
    student_cfg = dataclasses.replace(cfg.student, teacher_dir=str(models / "teacher"), mode="paired")
    real_arms: dict[str, tuple[StudentConfig, tuple[str, ...]]] = {}
    if mixing:
        yield _teacher_stage(p, "teacher_real_only", teacher_cfg, 0.0, ())
        real_arms["student_kd_real_only"] = (
            dataclasses.replace(student_cfg, teacher_dir=str(models / "teacher_real_only")), ("teacher_real_only",))
    if p.plan.pairing_free:
        pf = cfg.pairing_free
        name = "teacher_" + pf.teacher_modality
        yield Stage(name, (), {"cfg": to_dict(teacher_cfg), "modality": pf.teacher_modality},
                    functools.partial(_train_teacher, p, with_pipeline(teacher_cfg, modalities=(pf.teacher_modality,)),
                                      name, 0.0), f"models/{name}", classifier=True)
        real_arms["student_pairing_free"] = (pairing_free_student(student_cfg, pf, str(models / name)), (name,))
    yield from _student_stages(p, real_arms)

    # ---- what reads the synthetic images: the mixed teacher (first: its student waits for it), the audit ----
    synthesized = p.result("synth")
    # this run's synthetic images only, whatever else the dataset holds
    ratio, sources = (cfg.synthetic_ratio, (synthesized["run_id"],)) if synthesized is not None else (0.0, ())
    synthetic_reads = ("synth",) if ratio > 0 else ()
    yield _teacher_stage(p, "teacher", with_pipeline(teacher_cfg, synthetic_sources=sources), ratio, synthetic_reads)
    if synthesized is not None:
        yield Stage("audit", ("synth",), {"cfg": to_dict(cfg.audit)},
                    functools.partial(_audit, p.ds, str(p.out / "audit"), str(models / "diffusion"),
                                      synthesized["run_id"], cfg), "audit")
    kd_cfg = with_pipeline(student_cfg, synthetic_ratio=ratio, synthetic_sources=sources)
    arms = {"student_kd": (kd_cfg, ("teacher", *synthetic_reads))}
    # the plain control measures its agreement with the same teacher, when there is one to compare with
    arms["student_plain"] = ((plain_variant(kd_cfg), ("teacher",)) if p.result("teacher") is not None else
                             (dataclasses.replace(plain_variant(kd_cfg), agreement_teacher_dir=""), ()))
    yield from _student_stages(p, arms)


def _teacher_stage(p: Pipeline, name: str, teacher_cfg: TeacherConfig, ratio: float, reads: tuple[str, ...]) -> Stage:
    return Stage(name, reads, {"cfg": to_dict(teacher_cfg), "ratio": ratio},
                 functools.partial(_train_teacher, p, teacher_cfg, name, ratio), f"models/{name}", classifier=True)


def _student_stages(p: Pipeline, arms: dict[str, tuple[StudentConfig, tuple[str, ...]]]) -> Iterator[Stage]:
    """Each student arm searched with the same budget (or none is) on internal validation, then trained."""
    if p.cfg.tune.enabled:
        for name, (scfg, reads) in list(arms.items()):
            search = SEARCH_PREFIX + name
            yield Stage(search, reads, {"cfg": to_dict(p.cfg.tune), "student": to_dict(scfg)},
                        functools.partial(_search, p, scfg, p.out / "tune" / name), f"tune/{name}", exclusive=True)
            searched = p.result(search)
            arms[name] = (from_dict(StudentConfig, searched["config"], f"searched {name}") if searched else scfg,
                          (*reads, search))
    for name, (scfg, reads) in arms.items():
        folder = "student" if name == "student_kd" else name
        yield Stage(name, reads, {"cfg": to_dict(scfg)}, functools.partial(_train_student, p, scfg, name, folder),
                    f"models/{folder}", classifier=True)


def report_stage(p: Pipeline, readers_csv: str | None, truth: str | None, synthetic: dict | None, grids: list[str],
                 baseline_summary: dict | None, skipped: dict[str, str], notes: list[str]) -> Stage:
    """The report: it reads every finished classifier, the audit and the baselines."""
    model_dirs = p.model_dirs()
    finished = tuple(name for name in (*model_dirs, "audit", "baselines")
                     if name in p.state.stages and name not in p.state.failed)
    return Stage("report", finished, {"models": sorted(model_dirs), "readers": readers_csv,
                                      "evaluate": to_dict(p.cfg.evaluate), "truth": truth},
                 functools.partial(write_run_report, p.ds, p.out, model_dirs, p.cfg, synthetic, grids,
                                   baseline_summary, readers_csv, skipped, notes, p.external, truth), "report")


# ---- what the dataset allows --------------------------------------------------------------------------

def plan_stages(ds: ImageDataset, assignments: pd.DataFrame, cfg: ExperimentConfig,
                readers_csv: str | None) -> StagePlan:
    """Check what each enabled stage needs (masks, a second modality, clinical values, reader reads)."""
    plan = StagePlan(diffusion=cfg.diffusion.enabled, pairing_free=cfg.pairing_free.enabled,
                     clinical_baselines=cfg.baselines.enabled)
    training = assignments[(assignments["split"] == "train") & ~assignments["synthetic"].astype(bool)]
    if cfg.diffusion.enabled and cfg.diffusion.model.model.mask_channel:
        masks = ds.read_table(sorted(set(training["center"])), columns=["case_id", "mask"]).to_pandas()
        if not masks.loc[masks["case_id"].isin(set(training["case_id"])), "mask"].notna().any():
            plan.mask_conditioning = False
            plan.changes.append("diffusion: trained without mask conditioning (diffusion.model.model.mask_channel), "
                                "because no training image has a lesion mask")
    if cfg.tune.enabled:
        load_space(cfg.tune.space)  # a broken search space fails now, not after the teachers
    pf = cfg.pairing_free
    gaps = missing_training_rows(assignments, (pf.teacher_modality, pf.student_modality)) if pf.enabled else []
    if gaps:
        real = assignments[~assignments["synthetic"].astype(bool)]
        internal = real[real["split"] != "test"]
        plan.pairing_free = False
        plan.skipped["student_pairing_free"] = (
            f"the training centers have no {' and no '.join(gaps)} (their modalities: "
            f"{', '.join(sorted(set(internal['modality']))) or 'none'}; the whole dataset's: "
            f"{', '.join(sorted(set(real['modality'])))}): the pairing-free group KD student and its "
            f"{pf.teacher_modality} teacher, which train and select their epoch on the training centers only, "
            "are not trained")
    if cfg.baselines.enabled:
        cases = ds.metadata().to_pandas().drop_duplicates("case_id").set_index("case_id")
        cases = cases.loc[cases.index.isin(set(training["case_id"]))]
        encoder = ClinicalEncoder().fit(cases, [c for c in CLINICAL_COLUMNS if c in cases.columns])
        if not encoder.variables:
            plan.clinical_baselines = False
            plan.skipped["clinical and combined baselines"] = (
                "no usable clinical variable in the training cases (none has two or more distinct values): "
                "the clinical and combined models are not fitted; the deep-feature model still runs")
    if readers_csv:
        pseudonymised_reads(ds, readers_csv)  # a missing file or unknown case ids fail now, not at the report
    elif dataset_reads(ds) is None:
        plan.skipped["reader comparison"] = ("no reader CSV was given (diffkd run --readers CSV) and no case has "
                                             "a BI-RADS category (the clinical birads column)")
    return plan


def missing_training_rows(assignments: pd.DataFrame, modalities: tuple[str, ...]) -> list[str]:
    """What a stage reading `modalities` lacks in the training centers: each modality needs real rows in the
    train split (to learn from) and in the internal-validation split (to select its epoch on). External
    centers' rows never count: a stage cannot train on them."""
    real = assignments[~assignments["synthetic"].astype(bool)]
    return [f"{modality!r} images in the {name} split" for modality in modalities
            for split, name in (("train", "train"), ("val", "internal-validation"))
            if not ((real["split"] == split) & (real["modality"] == modality)).any()]


# ---- stage configs ---------------------------------------------------------------------------------------

def pairing_free_student(student_cfg: StudentConfig, pf: PairingFreeStage, teacher_dir: str) -> StudentConfig:
    """The `student_pairing_free` arm: the student section's architecture, data and loop (real images only),
    the pairing-free section's modalities and distillation terms."""
    return dataclasses.replace(with_pipeline(student_cfg, synthetic_ratio=0.0), teacher_dir=teacher_dir,
                               mode="pairing_free", student_modality=pf.student_modality,
                               teacher_modality=pf.teacher_modality, distill=pf.distill)


def checkpointed(stage_cfg, out: str | os.PathLike, name: str):
    """`stage_cfg` checkpointing under OUT/checkpoints/<name>; a rerun resumes what is there, on purpose."""
    runs = Path(out) / "checkpoints"
    loop = dataclasses.replace(stage_cfg.loop, storage_path=str(runs.resolve()), run_name=name,
                               resume=(runs / name).exists())
    return dataclasses.replace(stage_cfg, loop=loop)


def with_pipeline(stage_cfg, **changes):
    """A stage config whose data pipeline differs in `changes` (modalities, synthetic mixing, seed)."""
    return dataclasses.replace(stage_cfg, pipeline=dataclasses.replace(stage_cfg.pipeline, **changes))


# ---- what the stages run ---------------------------------------------------------------------------------

def _train_generator(ds: ImageDataset, model_dir: str, stage: DiffusionStage, split: SplitConfig, out: Path,
                     name: str) -> dict:
    result = train_diffusion(ds, split, checkpointed(stage, out, name), model_dir)
    return {"model_dir": result.model_dir}


def _synthesize(ds: ImageDataset, model_dir: str, cfg: SynthConfig) -> dict:
    return dataclasses.asdict(synthesize(ds, model_dir, cfg))


def _audit(ds: ImageDataset, out_dir: str, model_dir: str, run_id: str, cfg: ExperimentConfig) -> dict:
    return {"summary": audit(ds, out_dir, model_dir, run_ids=[run_id],
                             cfg=with_synthesis_sampling(cfg.audit, cfg.synth))}


def _train_teacher(p: Pipeline, teacher_cfg: TeacherConfig, name: str, ratio: float) -> dict:
    return _predictions_result(train_teacher(p.ds, p.assignments, checkpointed(teacher_cfg, p.out, name),
                                             str(p.out / "models" / name), synthetic_ratio=ratio, model_name=name))


def _train_student(p: Pipeline, student_cfg: StudentConfig, name: str, folder: str) -> dict:
    return _predictions_result(train_student(p.ds, p.assignments, checkpointed(student_cfg, p.out, name),
                                             str(p.out / "models" / folder), model_name=name))


def _predictions_result(result) -> dict:
    path = os.path.join(result.model_dir, "predictions.parquet")
    return {"model_dir": result.model_dir, "predictions": path, "metrics": result.metrics}


def _search(p: Pipeline, student_cfg: StudentConfig, search_dir: Path) -> dict:
    """One arm's search: the configured space, restricted to the parameters that apply to the arm."""
    tune: TuneStage = p.cfg.tune
    space = load_space(tune.space)
    if tune.num_samples:
        space = dataclasses.replace(space, num_samples=tune.num_samples)
    space = arm_space(space, student_cfg)
    outcome = tune_student(p.ds.uri, p.assignments, student_cfg, space, str(search_dir),
                           resume=(search_dir / EXPERIMENT).exists())
    return {"config": to_dict(outcome.best_config), "best_params": outcome.best_params,
            "best_objective": outcome.best_objective, "trials": outcome.num_trials,
            "trial_epochs": outcome.trial_epochs, "space": space.source, "files": outcome.files}


def baselines(ds: ImageDataset, assignments: pd.DataFrame, stage: BaselineStage, out: Path,
              modality: str, clinical: bool = True) -> dict:
    """The baselines of An et al. 2025: clinical LR, CNN features + mRMR + LASSO, and both combined (the feature
    model alone when `clinical` is false: no usable clinical variable).

    The feature extractor is frozen when `feature_model.pretrained` names weights; otherwise it is
    trained from scratch and cross-fitted (diffkd.evaluate.baselines.cross_fitted_features): mRMR and the LASSO
    never select on features of images their extractor was trained on.
    """
    rows = assignments[(assignments["modality"] == modality) & ~assignments["synthetic"].astype(bool)]
    cases = (rows.drop_duplicates("case_id")[["case_id", "patient_id", "center", "split", "label"]]
             .reset_index(drop=True))
    meta = ds.metadata().to_pandas().drop_duplicates("case_id").set_index("case_id")
    for column in CLINICAL_COLUMNS:
        cases[column] = meta.loc[cases["case_id"], column].to_numpy()
    fcfg = with_pipeline(stage.feature_model, modalities=(modality,))
    arrays = load_arrays(ds, cases["case_id"], fcfg.pipeline)  # every case's images, decoded once
    image = torch.from_numpy(arrays["image"])

    def case_features(model) -> np.ndarray:
        """Penultimate features of every case, its views averaged (as its predictions are), in `cases` order."""
        model.eval()
        with torch.no_grad():
            feats = torch.cat([features(model, image[i:i + 64]) for i in range(0, len(image), 64)]).numpy()
        return pd.DataFrame(feats).groupby(arrays["case_id"]).mean().loc[cases["case_id"]].to_numpy()

    arch = stage.feature_model.arch
    pretrained = stage.feature_model.pretrained
    if pretrained:
        model = create_classifier(arch, in_chans=fcfg.pipeline.in_chans, pretrained=pretrained)
        deep = DeepFeatures.frozen(case_features(model), f"frozen pretrained {arch} ({pretrained}), not trained "
                                                         "here: features of every case from weights that saw none")
    else:
        k = stage.config.feature_folds

        def fit_and_extract(fold: int, fitted: np.ndarray) -> np.ndarray:
            name = f"{DEEP_FEATURE_EXTRACTOR}_fold{fold}"
            model_dir = str(out / "models" / name)
            # the extractor trains on `fitted` training cases only; validation rows still stop it early
            keep = set(cases.loc[fitted | (cases["split"] != "train").to_numpy(), "case_id"])
            train_teacher(ds, rows[rows["case_id"].isin(keep)], checkpointed(fcfg, out, name), model_dir,
                          synthetic_ratio=0.0, model_name=name)
            return case_features(load_classifier(model_dir))

        deep = cross_fitted_features(cases, k, stage.config.seed, fit_and_extract, (
            f"{arch} trained from scratch, cross-fitted over {k} folds of training patients (patient-grouped, "
            f"label-stratified): each training case's features come from the extractor that did not train on its "
            f"fold, and mRMR + LASSO are fitted on those; internal-validation and external cases are scored "
            f"through all {k} extractors, probabilities averaged"))
    result = fit_baselines(cases, deep, list(CLINICAL_COLUMNS) if clinical else [], stage.config)
    result.summary["deep_features"]["initialised_from"] = initialised_from(pretrained)
    path = out / "models" / "baselines_predictions.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)  # a frozen extractor trains nothing that would make it
    result.predictions.to_parquet(path, index=False)
    return {"predictions": str(path), "summary": result.summary, "params": result.params}
