"""`diffkd run`: the whole DiffKD-DCIS pipeline on any ingested dataset.

    splits -> diffusion -> synthesis -> synthetic audit -> teachers (real-only, real+synthetic)
    -> KD search (Ray Tune, internal validation only) -> students (KD, KD from the real-only
    teacher, plain, pairing-free group KD) -> baselines (An et al. 2025) -> report

Each stage records its outputs in `OUT/run_state.json` (`diffkd.experiments.runstate`): rerunning the same
command resumes after the last finished stage. Stages that need what a dataset lacks (a second
modality, reader reads) are skipped with the reason written into the report.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from diffkd.config import ConfigError, from_dict, to_dict
from diffkd.experiments.experiment import BaselineStage, ExperimentConfig, PairingFreeStage, TuneStage
from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import CLINICAL_COLUMNS
from diffkd.experiments.runstate import RunState
from diffkd.train.loop_config import LoopConfig
from diffkd.train.student import StudentConfig

log = logging.getLogger("diffkd.run")

PREDICTION_COLUMNS = ["case_id", "patient_id", "center", "split", "label", "model", "prob"]


@dataclass
class StagePlan:
    """What the dataset and the config allow, decided before anything trains."""

    diffusion: bool = True
    mask_conditioning: bool = True  # diffusion.model.model.mask_channel, unless no training image has a mask
    pairing_free: bool = True
    clinical_baselines: bool = True  # the clinical and combined models (the deep-feature model needs no clinical data)
    skipped: dict[str, str] = field(default_factory=dict)  # stage or model -> why it will not run
    changes: list[str] = field(default_factory=list)  # what runs differently from the config, and why


def plan_stages(ds: ImageDataset, assignments: pd.DataFrame, cfg: ExperimentConfig,
                readers_csv: str | None) -> StagePlan:
    """Check what each enabled stage needs (masks, a second modality, clinical values, reader reads)."""
    from diffkd.evaluate.baselines import ClinicalEncoder

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
        from diffkd.experiments.tune_space import load_space

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
        _pseudonymised_reads(ds, readers_csv)  # a missing file or unknown case ids fail now, not at the report
    elif _dataset_reads(ds) is None:
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


def run_pipeline(dataset: str, external: list[str], cfg: ExperimentConfig, out: str | os.PathLike,
                 readers_csv: str | None = None, truth: str | None = None) -> dict:
    """Run every stage the dataset supports; return {"report", "metrics", "failed"}.

    `out` receives models/, tune/, audit/, report/. A stage that fails is recorded in "failed" (and
    in the report); the stages that do not read its outputs still run, and rerunning resumes.
    truth: a synthetic cohort's truth.csv, handed to the report stage only (per-center ceilings).
    """
    from diffkd.runtime import raycompat
    from diffkd.data.source_cache import start_shared_source_cache
    from diffkd.data.splits import check_no_leakage, make_splits

    out = Path(out).resolve()  # stages run in Ray workers and Tune trials with other working directories
    if truth is not None:  # checked now, read only by the report: no training stage gets the path
        truth = str(Path(truth).resolve())
        if not os.path.isfile(truth):
            raise ConfigError(f"truth file {truth} does not exist (the phantom writes it as OUT/truth.csv)")
    (out / "models").mkdir(parents=True, exist_ok=True)
    ds = ImageDataset(dataset)
    if not ds.exists():
        raise ConfigError(f"{dataset} is not a diffkd dataset (no _manifest.json): run `diffkd ingest` first")
    real = ds.metadata().to_pandas()
    external = list(external) or list(cfg.splits.external)  # --external wins over the config's
    assignments = make_splits(real, external, cfg.splits.val_fraction, cfg.splits.seed)
    check_no_leakage(assignments)
    log.info("dataset %s: %d images, %d cases, centers %s; external: %s", dataset, len(real),
             real["case_id"].nunique(), ", ".join(sorted(real["center"].unique())), ", ".join(external) or "none")
    plan = plan_stages(ds, assignments, cfg, readers_csv)
    for name, why in plan.skipped.items():
        log.info("skipping %s: %s", name, why)
    for change in plan.changes:
        log.info("note: %s", change)

    raycompat.init(cfg.ray.address or None, **({"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}))
    # every stage and search trial below reads the same rows: decode each center's images once for all
    # of them (held while this function runs)
    shared_cache = start_shared_source_cache()  # noqa: F841
    state = RunState.load(out)
    common = stage_inputs(dataset, external, cfg)
    skipped: dict[str, str] = {}  # report section -> why it has no content
    notes: list[str] = [*plan.changes]  # stages left out, for the report's limitations
    model_dirs: dict[str, str] = {}
    models = out / "models"

    def classifier(name: str, result: dict | None, folder: str | None = None) -> None:
        if result is not None:
            model_dirs[name] = str(models / (folder or name))

    # ---- 1. diffusion, synthesis, audit ---------------------------------------------------------------
    synthetic_block, grids = None, []
    ratio, sources = cfg.synthetic_ratio, ()
    synthesized = None
    if plan.diffusion:
        from diffkd.synth import audit, with_synthesis_sampling

        diffusion_dir, synthesized = generator_stage(ds, external, cfg, out, state, common, plan.mask_conditioning)
    if synthesized is not None:
        sources = (synthesized["run_id"],)  # this run's images only, whatever else the dataset holds
        audited = state.try_run("audit", {**common, "cfg": to_dict(cfg.audit)},
                                lambda: {"summary": audit(ds, str(out / "audit"), diffusion_dir, run_ids=list(sources),
                                                          cfg=with_synthesis_sampling(cfg.audit, cfg.synth))},
                                after=["synth"])
        if audited is not None:
            synthetic_block = audited["summary"]
            grids = [str(out / "audit" / name)
                     for name in ("synthetic_grid.png", "synthetic_label_pairs.png", "synthetic_near_copies.png")]
        else:
            skipped["synthetic"] = f"the synthetic-data audit {state.failed['audit']}"
    else:
        ratio = 0.0
        skipped["synthetic"] = ("the diffusion stage is disabled in the config (diffusion.enabled: false)"
                                if not cfg.diffusion.enabled else
                                f"no synthetic images: {_why_not(state, 'diffusion', 'synth')}")
    synthetic_after = ["synth"] if ratio > 0 else []

    # ---- 2. teachers ------------------------------------------------------------------------------------
    from diffkd.train.teacher import train_teacher

    student_modality = cfg.student.student_modality
    teacher_cfg = _pipeline(cfg.teacher, modalities=(student_modality,), synthetic_sources=sources)
    teacher_variants = {"teacher": ratio}
    if ratio > 0:
        teacher_variants["teacher_real_only"] = 0.0
    for name, mix in teacher_variants.items():
        classifier(name, state.try_run(
            name, {**common, "cfg": to_dict(teacher_cfg), "ratio": mix},
            lambda name=name, mix=mix: _predictions_result(train_teacher(
                ds, assignments, _with_loop(teacher_cfg, out, name), str(models / name), synthetic_ratio=mix,
                model_name=name)),
            after=synthetic_after if mix > 0 else []))

    # ---- 3. the students, each searched with the same budget (or none is) on internal validation -------
    student_cfg = dataclasses.replace(_pipeline(cfg.student, synthetic_ratio=ratio, synthetic_sources=sources),
                                      teacher_dir=str(models / "teacher"), mode="paired")

    from diffkd.train.student import plain_variant, train_student

    students = {  # name -> (config, the stages whose outputs it reads)
        "student_kd": (student_cfg, ["teacher", *synthetic_after]),
    }
    # the plain control measures its agreement with the same teacher, when there is one to compare with
    students["student_plain"] = ((plain_variant(student_cfg), ["teacher"]) if "teacher" not in state.failed else
                                 (dataclasses.replace(plain_variant(student_cfg), agreement_teacher_dir=""), []))
    if ratio > 0:
        students["student_kd_real_only"] = (dataclasses.replace(
            _pipeline(student_cfg, synthetic_ratio=0.0), teacher_dir=str(models / "teacher_real_only")),
            ["teacher_real_only"])
    pf = cfg.pairing_free
    if plan.pairing_free:
        name = "teacher_" + pf.teacher_modality
        classifier(name, state.try_run(
            name, {**common, "cfg": to_dict(teacher_cfg), "modality": pf.teacher_modality},
            lambda: _predictions_result(train_teacher(
                ds, assignments, _with_loop(_pipeline(teacher_cfg, modalities=(pf.teacher_modality,)), out, name),
                str(models / name), synthetic_ratio=0.0, model_name=name))))
        students["student_pairing_free"] = (pairing_free_student(student_cfg, pf, str(models / name)), [name])
    elif pf.enabled:
        notes.append(plan.skipped["student_pairing_free"])
    searches: dict[str, dict] = {}
    if cfg.tune.enabled:
        for name, (scfg, reads) in list(students.items()):
            search = f"tune_{name}"
            searched = state.try_run(
                search, {**common, "cfg": to_dict(cfg.tune), "student": to_dict(scfg)},
                lambda name=name, scfg=scfg: _tune(ds, assignments, scfg, cfg.tune, out / "tune" / name),
                after=reads)
            students[name] = (from_dict(StudentConfig, searched["config"], f"searched {name}") if searched else scfg,
                              [*reads, search])
            if searched is not None:
                searches[name] = searched
        if searches:
            notes.append(_search_note(searches))
    else:
        notes.append("no hyperparameter search (tune.enabled: false): every student arm trained with the config's "
                     "settings, the same (zero) search budget for each")
    notes.append(_validation_note(assignments, student_modality, searched=bool(searches)))
    for name, (scfg, reads) in students.items():
        folder = "student" if name == "student_kd" else name
        classifier(name, state.try_run(
            name, {**common, "cfg": to_dict(scfg)},
            lambda name=name, scfg=scfg, folder=folder: _predictions_result(train_student(
                ds, assignments, _with_loop(scfg, out, name), str(models / folder), model_name=name)),
            after=reads), folder)

    # ---- 4. baselines (An et al. 2025) ------------------------------------------------------------------
    baseline_summary = None
    if cfg.baselines.enabled:
        result = state.try_run("baselines", {**common, "cfg": to_dict(cfg.baselines)},
                               lambda: _baselines(ds, assignments, cfg.baselines, out, student_modality,
                                                  plan.clinical_baselines))
        if result is not None:
            baseline_summary = result["summary"]
        else:
            skipped["baselines"] = f"the baselines stage {state.failed['baselines']}"
    else:
        skipped["baselines"] = "baselines.enabled is false in the config"

    # ---- 5. evaluation and report ---------------------------------------------------------------------
    notes += [f"stage {name} {why}" for name, why in state.failed.items()]
    if not model_dirs:
        raise RuntimeError("no classifier finished, so there is nothing to report: "
                           + "; ".join(f"{n} {why}" for n, why in state.failed.items()))
    finished = [name for name in (*model_dirs, "audit", "baselines") if name in state.stages
                and name not in state.failed]
    report = state.run("report", {**common, "models": sorted(model_dirs), "readers": readers_csv,
                                  "evaluate": to_dict(cfg.evaluate), "truth": truth},
                       lambda: _report(ds, out, model_dirs, cfg, synthetic_block, grids, baseline_summary,
                                       readers_csv, skipped, notes, external, truth),
                       after=finished)
    return {**report, "failed": dict(state.failed)}


def stage_inputs(dataset: str | os.PathLike, external: list[str], cfg: ExperimentConfig) -> dict:
    """What every stage's key in run_state.json starts from.

    The split is written as before SplitConfig held the external centers (they come first, from the
    command line), so that runs started by earlier releases still resume.
    """
    return {"dataset": str(dataset), "external": list(external),
            "splits": {"val_fraction": cfg.splits.val_fraction, "seed": cfg.splits.seed}}


def generator_stage(ds: ImageDataset, external: list[str], cfg: ExperimentConfig, out: Path, state: RunState,
                    common: dict, mask_conditioning: bool = True, suffix: str = "") -> tuple[str, dict | None]:
    """Stage 1: the diffusion model (trained on the internal train split) and its synthetic rows.

    Returns (the model folder, synthesize()'s result as a dict, with the `run_id` that names the rows;
    None when either step failed, recorded in `state.failed`). `common` is `stage_inputs`;
    `mask_conditioning` False trains without the mask channel (no training image has a mask);
    `suffix` keeps several generators of one output folder apart (diffkd ablate --per-seed-generators).
    """
    from diffkd.synth import synthesize
    from diffkd.train.diffusion_task import train_diffusion

    name = "diffusion" + suffix
    diffusion_dir = str(out / "models" / name)
    split = dataclasses.replace(cfg.splits, external=list(external))
    diffusion_cfg = cfg.diffusion if mask_conditioning else dataclasses.replace(
        cfg.diffusion, model=dataclasses.replace(
            cfg.diffusion.model, model=dataclasses.replace(cfg.diffusion.model.model, mask_channel=False)))
    state.try_run(name, {**common, "cfg": to_dict(diffusion_cfg)},
                  lambda: _dir_result(train_diffusion(ds, diffusion_dir, diffusion_cfg.model,
                                                      _loop(diffusion_cfg.loop, out, name), split)))
    synthesized = state.try_run("synth" + suffix, {**common, "cfg": to_dict(cfg.synth)},
                                lambda: dataclasses.asdict(synthesize(ds, diffusion_dir, cfg.synth)), after=[name])
    return diffusion_dir, synthesized


def _why_not(state: RunState, *stages: str) -> str:
    return "; ".join(f"{name} {state.failed[name]}" for name in stages if name in state.failed) or "not run"


# ---- stage helpers ---------------------------------------------------------------------------------------
def pairing_free_student(student_cfg: StudentConfig, pf: PairingFreeStage, teacher_dir: str) -> StudentConfig:
    """The `student_pairing_free` arm: the student section's architecture, data and loop (real images only),
    the pairing-free section's modalities and distillation terms."""
    return dataclasses.replace(_pipeline(student_cfg, synthetic_ratio=0.0), teacher_dir=teacher_dir,
                               mode="pairing_free", student_modality=pf.student_modality,
                               teacher_modality=pf.teacher_modality, distill=pf.distill)


def _loop(loop: LoopConfig, out: Path, name: str) -> LoopConfig:
    """Every stage's checkpoints live under OUT/checkpoints/<stage>; reruns resume them on purpose."""
    run_dir = out / "checkpoints"
    resume = (run_dir / name).exists()
    return dataclasses.replace(loop, storage_path=str(run_dir.resolve()), run_name=name, resume=resume)


def _with_loop(stage_cfg, out: Path, name: str):
    return dataclasses.replace(stage_cfg, loop=_loop(stage_cfg.loop, out, name))


def _pipeline(stage_cfg, **changes):
    """A stage config whose data pipeline differs in `changes` (modalities, synthetic mixing)."""
    return dataclasses.replace(stage_cfg, pipeline=dataclasses.replace(stage_cfg.pipeline, **changes))


def _dir_result(result) -> dict:
    return {"model_dir": result.model_dir}


def _predictions_result(result) -> dict:
    path = os.path.join(result.model_dir, "predictions.parquet")
    return {"model_dir": result.model_dir, "predictions": path, "metrics": result.metrics}


def _tune(ds: ImageDataset, assignments: pd.DataFrame, student_cfg: StudentConfig, tune: TuneStage,
          search_dir: Path) -> dict:
    """One arm's search: the configured space, restricted to the parameters that apply to the arm."""
    from diffkd.experiments.tune import EXPERIMENT, arm_space, tune_student
    from diffkd.experiments.tune_space import load_space

    space = load_space(tune.space)
    if tune.num_samples:
        space = dataclasses.replace(space, num_samples=tune.num_samples)
    space = arm_space(space, student_cfg)
    outcome = tune_student(ds.uri, assignments, student_cfg, space, str(search_dir),
                           resume=(search_dir / EXPERIMENT).exists())
    return {"config": to_dict(outcome.best_config), "best_params": outcome.best_params,
            "best_objective": outcome.best_objective, "trials": outcome.num_trials,
            "trial_epochs": outcome.trial_epochs, "space": space.source, "files": outcome.files}


def _search_note(searches: dict[str, dict]) -> str:
    """The search budget, arm by arm, for the report."""
    parts = [f"{name}: {s['trials']} trials over {', '.join(s['best_params'])} ({s['trial_epochs']} epochs run)"
             for name, s in searches.items()]
    space = next(iter(searches.values()))["space"] if searches else ""
    return (f"hyperparameter search: every student arm was searched with the same number of trials of {space} "
            f"(internal-validation AUC per case; teachers were not searched): {'; '.join(parts)}")


def _validation_note(assignments: pd.DataFrame, modality: str, searched: bool) -> str:
    """One internal-validation split serves several choices; say which, so internal AUCs are read as optimistic."""
    val = assignments[(assignments["split"] == "val") & (assignments["modality"] == modality)
                      & ~assignments["synthetic"].astype(bool)]
    uses = ["each model's epoch (early stopping)", *(["the search's settings"] if searched else []),
            "each model's operating threshold"]
    return (f"the one internal-validation split ({val['case_id'].nunique()} {modality} cases) chose "
            f"{', '.join(uses[:-1])} and {uses[-1]}: internal-validation figures are optimistic, "
            "the external centers are the unbiased estimate")


def _baselines(ds: ImageDataset, assignments: pd.DataFrame, stage: BaselineStage, out: Path,
               modality: str, clinical: bool = True) -> dict:
    """The baselines of An et al. 2025: clinical LR, CNN features + mRMR + LASSO, and both combined (the feature
    model alone when `clinical` is false: no usable clinical variable).

    The feature extractor is frozen when `feature_model.pretrained` names weights; otherwise it is
    trained from scratch and cross-fitted (diffkd.evaluate.baselines.cross_fitted_features): mRMR and the LASSO
    never select on features of images their extractor was trained on.
    """
    import numpy as np
    import torch

    from diffkd.data.pipeline import load_arrays
    from diffkd.evaluate.baselines import DeepFeatures, cross_fitted_features, fit_baselines
    from diffkd.evaluate.report import DEEP_FEATURE_EXTRACTOR
    from diffkd.models.classifiers import features, initialised_from, load_classifier

    rows = assignments[(assignments["modality"] == modality) & ~assignments["synthetic"].astype(bool)]
    cases = (rows.drop_duplicates("case_id")[["case_id", "patient_id", "center", "split", "label"]]
             .reset_index(drop=True))
    meta = ds.metadata().to_pandas().drop_duplicates("case_id").set_index("case_id")
    for column in CLINICAL_COLUMNS:
        cases[column] = meta.loc[cases["case_id"], column].to_numpy()
    fcfg = _pipeline(stage.feature_model, modalities=(modality,))
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
        from diffkd.models.classifiers import create_classifier

        model = create_classifier(arch, in_chans=fcfg.pipeline.in_chans, pretrained=pretrained)
        deep = DeepFeatures.frozen(case_features(model), f"frozen pretrained {arch} ({pretrained}), not trained "
                                                         "here: features of every case from weights that saw none")
    else:
        from diffkd.train.teacher import train_teacher

        k = stage.config.feature_folds

        def fit_and_extract(fold: int, fitted: np.ndarray) -> np.ndarray:
            name = f"{DEEP_FEATURE_EXTRACTOR}_fold{fold}"
            model_dir = str(out / "models" / name)
            # the extractor trains on `fitted` training cases only; validation rows still stop it early
            keep = set(cases.loc[fitted | (cases["split"] != "train").to_numpy(), "case_id"])
            train_teacher(ds, rows[rows["case_id"].isin(keep)], _with_loop(fcfg, out, name), model_dir,
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


def _model_info(model_dirs: dict[str, str], cfg: ExperimentConfig) -> dict[str, dict]:
    """Parameters and CPU latency of every trained classifier, measured the same way: torch and ONNX
    Runtime at batch 1 and 32, one thread (a stage's own ONNX export is reused where it wrote one)."""
    from diffkd.data.schema import ClinicalEncoding
    from diffkd.models.classifiers import load_classifier, uses_clinical
    from diffkd.models.export import ONNX_FILE
    from diffkd.models.footprint import count_parameters, latency_table

    info = {}
    for name, path in model_dirs.items():
        if name == "diffusion" or not os.path.exists(os.path.join(path, "config.json")):
            continue
        model = load_classifier(path).eval()
        with open(os.path.join(path, "config.json")) as f:
            arch = json.load(f).get("architecture", "")
        size = cfg.student.pipeline.image_size if name.startswith("student") else cfg.teacher.pipeline.image_size
        clinical = ClinicalEncoding().width if uses_clinical(model) else 0
        exported = os.path.join(path, ONNX_FILE)
        latency = latency_table(model, size, 1, clinical, repeats=10,
                                onnx_path=exported if os.path.exists(exported) else None)
        info[name] = {"params": count_parameters(model), "architecture": arch,
                      "latency_ms": latency["torch"]["b1"], "latency": latency}
    return info


def _initialised_from(model_dirs: dict[str, str], baseline_summary: dict | None) -> dict[str, str]:
    """Each trained model's start ("scratch" or its weights), as its stage recorded it; the deep-feature
    model's is its extractor's (a frozen pretrained one, or cross-fitted from scratch)."""
    from diffkd.models.diffusion import TRAINING_INFO as GENERATOR_INFO
    from diffkd.train.stage_io import TRAINING_INFO

    found = {}
    for name, path in model_dirs.items():
        if os.path.exists(os.path.join(path, GENERATOR_INFO)):
            found[name] = json.loads(Path(path, GENERATOR_INFO).read_text()).get("initialised_from")
        elif os.path.exists(os.path.join(path, TRAINING_INFO)):
            found[name] = json.loads(Path(path, TRAINING_INFO).read_text())["metrics"].get("initialised_from")
    found["deep_features"] = ((baseline_summary or {}).get("deep_features") or {}).get("initialised_from")
    return {name: start for name, start in found.items() if start}


def _distillation_inputs(model_dirs: dict[str, str]) -> dict[str, dict]:
    """Each student's training history and the model name of the teacher it learned from (or, for the
    plain control, was measured against), from the stage's training.json."""
    from diffkd.train.stage_io import TRAINING_INFO

    names = {os.path.normpath(path): name for name, path in model_dirs.items()}
    out = {}
    for name, path in model_dirs.items():
        info_path = Path(path, TRAINING_INFO)
        if not name.startswith("student") or not info_path.exists():
            continue
        info = json.loads(info_path.read_text())
        config = info.get("config") or {}
        teacher_path = config.get("teacher_dir") or config.get("agreement_teacher_dir") or ""
        out[name] = {"teacher": names.get(os.path.normpath(teacher_path)) if teacher_path else None,
                     "best_epoch": info["metrics"].get("best_epoch"), "history": info.get("history", [])}
    return out


def _health_inputs(model_dirs: dict[str, str], models_dir: Path) -> dict[str, dict]:
    """Each trained network's training health, from its stage's training.json: the classifiers of
    `model_dirs` and the deep-feature model's extractors (one folder per cross-fitting fold)."""
    from diffkd.evaluate.report import DEEP_FEATURE_EXTRACTOR
    from diffkd.train.stage_io import TRAINING_INFO

    folders = {name: Path(path) for name, path in model_dirs.items()}
    folders.update({p.name: p for p in sorted(models_dir.glob(f"{DEEP_FEATURE_EXTRACTOR}_fold*"))})
    out = {}
    for name, folder in folders.items():
        info_path = folder / TRAINING_INFO
        if info_path.exists():
            health = json.loads(info_path.read_text()).get("metrics", {}).get("health")
            if health:
                out[name] = health
    return out


def _report(ds: ImageDataset, out: Path, model_dirs: dict[str, str], cfg: ExperimentConfig, synthetic: dict | None,
            grids: list[str], baseline_summary: dict | None, readers_csv: str | None, skipped: dict[str, str],
            notes: list[str], external: list[str], truth: str | None = None) -> dict:
    from diffkd.evaluate.report import ReportInputs, write_report

    # each stage's predictions under the stage's name, whatever name the folder's file carries
    frames = [pd.read_parquet(os.path.join(path, "predictions.parquet")).assign(model=name)
              for name, path in model_dirs.items() if name != "diffusion"]
    baseline_path = out / "models" / "baselines_predictions.parquet"
    if baseline_summary is not None and baseline_path.exists():
        frames.append(pd.read_parquet(baseline_path))
    predictions = pd.concat([f[PREDICTION_COLUMNS] for f in frames], ignore_index=True)
    readers = report_reads(ds, readers_csv, predictions, cfg.evaluate.reference, notes)
    if readers is None:
        skipped["readers"] = ("no reader CSV was given (diffkd run --readers CSV) and no case has a BI-RADS category: "
                              "no reader comparison")
    model_info = _model_info(model_dirs, cfg)
    inputs = ReportInputs(title=f"diffkd validation report: {cfg.name}",
                          initialised_from=_initialised_from(model_dirs, baseline_summary),
                          dataset={"name": Path(ds.root).name, "path": str(ds.uri), "external": list(external)},
                          model_info=model_info, synthetic=synthetic,
                          synthetic_grids=[g for g in grids if os.path.exists(g)],
                          baselines=baseline_summary, skipped=skipped, notes=notes, config=to_dict(cfg),
                          evaluate=to_dict(cfg.evaluate), truth=truth, label_names=list(ds.label_names),
                          distillation=_distillation_inputs(model_dirs),
                          health=_health_inputs(model_dirs, out / "models"))
    files = write_report(out, predictions, inputs, readers=readers, config=cfg.evaluate)
    return {"report": str(files.index), "metrics": str(files.metrics)}


def report_reads(ds: ImageDataset, readers_csv: str | None, predictions: pd.DataFrame, reference: str,
                 notes: list[str]) -> pd.DataFrame | None:
    """The reads the report compares the models with, on the cases `reference` scored: the readers CSV's
    (pseudonymised), and the radiologists' BI-RADS stored with the images as one more reader; None when
    there are neither. Reads of cases `reference` did not score are left out, with a note."""
    scored = set(predictions.loc[predictions["model"] == reference, "case_id"])
    readers = _pseudonymised_reads(ds, readers_csv) if readers_csv else None
    if readers is not None:
        unscored = ~readers["case_id"].isin(scored)
        if unscored.any():
            notes.append(f"{int(unscored.sum())} reader read(s) of {readers.loc[unscored, 'case_id'].nunique()} "
                         f"case(s) that {reference} did not score (imaged only in a modality it does not read) "
                         "are left out of the reader comparison")
            log.info("note: %s", notes[-1])
            readers = readers[~unscored].reset_index(drop=True)
    own = _dataset_reads(ds)
    if own is not None and own["case_id"].isin(scored).any():
        own = own[own["case_id"].isin(scored)]
        readers = own if readers is None else pd.concat([readers, own], ignore_index=True)
    return readers


def _dataset_reads(ds: ImageDataset) -> pd.DataFrame | None:
    """The radiologists' BI-RADS category the dataset holds (its `birads` column) as one reader's reads."""
    from diffkd.evaluate.readers import dataset_birads_reads

    return dataset_birads_reads(ds.metadata().select(["case_id", "birads"]).to_pandas())


def _pseudonymised_reads(ds: ImageDataset, readers_csv: str) -> pd.DataFrame:
    """Reads name cases by the ids the hospital gave them; map them to the ids ingest stored.

    Ingest keys a case's pseudonym by center and raw id, so each raw id is tried against every
    center's pseudonym; reads matching no case of the dataset are dropped with a warning.
    """
    from diffkd.data.ingest import pseudonymizer_for

    try:
        reads = pd.read_csv(readers_csv, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ConfigError(f"readers file {readers_csv} does not exist") from None
    if "case_id" not in reads.columns:
        raise ConfigError(f"{readers_csv}: needs a case_id column (the case ids used at ingest)")
    pseudo = pseudonymizer_for(ds)
    known = set(ds.metadata().column("case_id").to_pylist())
    centers = [reads["center"]] if "center" in reads.columns else None
    mapped = []
    for i, raw in enumerate(reads["case_id"]):
        candidates = [centers[0].iloc[i]] if centers else ds.centers()
        hits = [pseudo.case(c, raw) for c in candidates if pseudo.case(c, raw) in known]
        mapped.append(hits[0] if len(hits) == 1 else None)
    reads["case_id"] = mapped
    unmatched = reads["case_id"].isna()
    if unmatched.all():
        raise ConfigError(f"{readers_csv}: none of its case ids match a case of the dataset; give the case ids "
                          "used at ingest (the clinical CSV's case_id column)")
    if unmatched.any():
        log.warning("%s: %d read(s) name no case of the dataset; they are ignored", readers_csv, int(unmatched.sum()))
    return reads[~unmatched].drop(columns=[c for c in ("center",) if c in reads.columns]).reset_index(drop=True)
