"""`diffkd run`: the whole DiffKD-DCIS pipeline on any ingested dataset.

    splits -> diffusion -> synthesis -> synthetic audit -> teachers (real-only, real+synthetic)
    -> KD search (Ray Tune, internal validation only) -> students (KD, KD from the real-only
    teacher, plain, pairing-free group KD) -> seed-001 baselines -> report

Each stage records its outputs in `OUT/run_state.json` (`diffkd.runstate`): rerunning the same
command resumes after the last finished stage. Stages that need what a dataset lacks (a second
modality, reader reads) are skipped with the reason written into the report.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pandas as pd

from diffkd.config import ConfigError, from_dict, to_dict
from diffkd.config.experiment import BaselineStage, ExperimentConfig, PairingFreeStage, TuneStage
from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import CLINICAL_COLUMNS
from diffkd.runstate import RunState
from diffkd.train.loop_config import LoopConfig
from diffkd.train.student import StudentConfig

log = logging.getLogger("diffkd.run")

PREDICTION_COLUMNS = ["case_id", "patient_id", "center", "split", "label", "model", "prob"]


def run_pipeline(dataset: str, external: list[str], cfg: ExperimentConfig, out: str | os.PathLike,
                 readers_csv: str | None = None, truth: str | None = None) -> dict:
    """Run every stage; return metrics.json as a dict. `out` receives models/, tune/, audit/, report/.

    truth: a synthetic cohort's truth.csv, handed to the report stage only (per-center ceilings).
    """
    from diffkd import raycompat
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
    raycompat.init(cfg.ray.address or None, **({"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}))
    state = RunState.load(out)
    say = _say

    real = ds.metadata().to_pandas()
    external = list(external) or list(cfg.splits.external)  # --external wins over the config's
    split = dataclasses.replace(cfg.splits, external=external)
    assignments = make_splits(real, split.external, split.val_fraction, split.seed)
    check_no_leakage(assignments)
    say(f"dataset {dataset}: {len(real)} images, {real['case_id'].nunique()} cases, centers "
        f"{', '.join(sorted(real['center'].unique()))}; external: {', '.join(external) or 'none'}")
    # What every stage's result depends on; written as before SplitConfig held `external`, so that runs
    # started by earlier releases still resume.
    common = {"dataset": str(dataset), "external": external,
              "splits": {"val_fraction": split.val_fraction, "seed": split.seed}}
    skipped: dict[str, str] = {}  # report section -> why it has no content
    notes: list[str] = []  # stages left out, for the report's limitations
    model_dirs: dict[str, str] = {}
    models = out / "models"

    # ---- 1. diffusion, synthesis, audit ---------------------------------------------------------------
    synthetic_block, grids = None, []
    ratio, sources = cfg.synthetic_ratio, ()
    if cfg.diffusion.enabled:
        from diffkd.synth import audit, synthesize, with_synthesis_sampling
        from diffkd.train.diffusion_task import train_diffusion

        diffusion_dir = str(models / "diffusion")
        state.run("diffusion", {**common, "cfg": to_dict(cfg.diffusion)},
                  lambda: _dir_result(train_diffusion(ds, diffusion_dir, cfg.diffusion.model,
                                                      _loop(cfg.diffusion.loop, out, "diffusion"), split)))
        synthesized = state.run("synth", {**common, "cfg": to_dict(cfg.synth)},
                                lambda: dataclasses.asdict(synthesize(ds, diffusion_dir, cfg.synth)))
        sources = (synthesized["run_id"],)  # this run's images only, whatever else the dataset holds
        audited = state.run("audit", {**common, "cfg": to_dict(cfg.audit)},
                            lambda: {"summary": audit(ds, str(out / "audit"), diffusion_dir, run_ids=list(sources),
                                                      cfg=with_synthesis_sampling(cfg.audit, cfg.synth))})
        synthetic_block = audited["summary"]
        grids = [str(out / "audit" / name)
                 for name in ("synthetic_grid.png", "synthetic_label_pairs.png", "synthetic_near_copies.png")]
    else:
        ratio = 0.0
        skipped["synthetic"] = "the diffusion stage is disabled in the config (diffusion.enabled: false)"

    # ---- 2. teachers ------------------------------------------------------------------------------------
    from diffkd.train.teacher import train_teacher

    student_modality = cfg.student.student_modality
    teacher_cfg = _pipeline(cfg.teacher, modalities=(student_modality,), synthetic_sources=sources)
    teacher_variants = {"teacher": ratio}
    if ratio > 0:
        teacher_variants["teacher_real_only"] = 0.0
    for name, mix in teacher_variants.items():
        model_dirs[name] = str(models / name)
        state.run(name, {**common, "cfg": to_dict(teacher_cfg), "ratio": mix},
                  lambda name=name, mix=mix: _predictions_result(train_teacher(
                      ds, assignments, _with_loop(teacher_cfg, out, name), model_dirs[name], synthetic_ratio=mix,
                      model_name=name)))

    # ---- 3. the students, each searched with the same budget (or none is) on internal validation -------
    student_cfg = dataclasses.replace(_pipeline(cfg.student, synthetic_ratio=ratio, synthetic_sources=sources),
                                      teacher_dir=model_dirs["teacher"], mode="paired")

    from diffkd.train.student import plain_variant, train_student

    students = {
        "student_kd": student_cfg,
        "student_plain": plain_variant(student_cfg),
    }
    if ratio > 0:
        students["student_kd_real_only"] = dataclasses.replace(
            _pipeline(student_cfg, synthetic_ratio=0.0), teacher_dir=model_dirs["teacher_real_only"])
    modalities = set(real["modality"])
    pf = cfg.pairing_free
    if pf.enabled and {pf.teacher_modality, pf.student_modality} <= modalities:
        model_dirs["teacher_" + pf.teacher_modality] = str(models / f"teacher_{pf.teacher_modality}")
        name = "teacher_" + pf.teacher_modality
        state.run(name, {**common, "cfg": to_dict(teacher_cfg), "modality": pf.teacher_modality},
                  lambda: _predictions_result(train_teacher(
                      ds, assignments, _with_loop(_pipeline(teacher_cfg, modalities=(pf.teacher_modality,)), out, name),
                      model_dirs[name], synthetic_ratio=0.0, model_name=name)))
        students["student_pairing_free"] = pairing_free_student(student_cfg, pf, model_dirs[name])
    elif pf.enabled:
        notes.append(f"the dataset has no {pf.teacher_modality!r} images beside {pf.student_modality!r} "
                                   f"(modalities: {', '.join(sorted(modalities))}): the pairing-free group KD "
                                   "student was not trained")
    searches: dict[str, dict] = {}
    if cfg.tune.enabled:
        for name in list(students):
            searched = state.run(f"tune_{name}", {**common, "cfg": to_dict(cfg.tune), "student": to_dict(students[name])},
                                 lambda name=name: _tune(ds, assignments, students[name], cfg.tune, out / "tune" / name))
            students[name] = from_dict(StudentConfig, searched["config"], f"searched {name}")
            searches[name] = searched
        notes.append(_search_note(searches))
    else:
        notes.append("no hyperparameter search (tune.enabled: false): every student arm trained with the config's "
                     "settings, the same (zero) search budget for each")
    notes.append(_validation_note(assignments, student_modality, searched=bool(searches)))
    for name, scfg in students.items():
        model_dirs[name] = str(models / ("student" if name == "student_kd" else name))
        state.run(name, {**common, "cfg": to_dict(scfg)},
                  lambda name=name, scfg=scfg: _predictions_result(train_student(
                      ds, assignments, _with_loop(scfg, out, name), model_dirs[name], model_name=name)))

    # ---- 4. seed-001 baselines ------------------------------------------------------------------------
    baseline_summary = None
    if cfg.baselines.enabled:
        result = state.run("baselines", {**common, "cfg": to_dict(cfg.baselines)},
                           lambda: _baselines(ds, assignments, cfg.baselines, out, student_modality))
        baseline_summary = result["summary"]
    else:
        skipped["baselines"] = "baselines.enabled is false in the config"

    # ---- 5. evaluation and report ---------------------------------------------------------------------
    return state.run("report", {**common, "models": sorted(model_dirs), "readers": readers_csv,
                                "evaluate": to_dict(cfg.evaluate), "truth": truth},
                     lambda: _report(ds, out, model_dirs, cfg, synthetic_block, grids, baseline_summary,
                                     readers_csv, skipped, notes, external, truth))


# ---- stage helpers ---------------------------------------------------------------------------------------
def pairing_free_student(student_cfg: StudentConfig, pf: PairingFreeStage, teacher_dir: str) -> StudentConfig:
    """The `student_pairing_free` arm: the student section's architecture, data and loop (real images only),
    the pairing-free section's modalities and distillation terms."""
    return dataclasses.replace(_pipeline(student_cfg, synthetic_ratio=0.0), teacher_dir=teacher_dir,
                               mode="pairing_free", student_modality=pf.student_modality,
                               teacher_modality=pf.teacher_modality, distill=pf.distill)


def _say(message: str) -> None:
    print(message, flush=True)


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
    from diffkd.tune import EXPERIMENT, arm_space, tune_student
    from diffkd.tune_space import load_space

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
               modality: str) -> dict:
    """Seed 001: clinical LR, CNN features + mRMR + LASSO, and both combined.

    The feature extractor is frozen when `feature_model.pretrained` names weights; otherwise it is
    trained from scratch and cross-fitted (diffkd.evaluate.baselines.cross_fitted_features): mRMR and the LASSO
    never select on features of images their extractor was trained on.
    """
    import numpy as np
    import torch

    from diffkd.data.pipeline import load_arrays
    from diffkd.evaluate.baselines import DeepFeatures, cross_fitted_features, fit_baselines
    from diffkd.models.classifiers import features, initialised_from, load_classifier

    rows = assignments[(assignments["modality"] == modality) & ~assignments["synthetic"].astype(bool)]
    cases = rows.drop_duplicates("case_id")[["case_id", "patient_id", "center", "split", "label"]].reset_index(drop=True)
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
            name = f"deep_feature_model_fold{fold}"
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
    result = fit_baselines(cases, deep, list(CLINICAL_COLUMNS), stage.config)
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
    from diffkd.train.teacher import TRAINING_INFO

    found = {}
    for name, path in model_dirs.items():
        if os.path.exists(os.path.join(path, GENERATOR_INFO)):
            found[name] = json.loads(Path(path, GENERATOR_INFO).read_text()).get("initialised_from")
        elif os.path.exists(os.path.join(path, TRAINING_INFO)):
            found[name] = json.loads(Path(path, TRAINING_INFO).read_text())["metrics"].get("initialised_from")
    found["deep_features"] = ((baseline_summary or {}).get("deep_features") or {}).get("initialised_from")
    return {name: start for name, start in found.items() if start}


def _report(ds: ImageDataset, out: Path, model_dirs: dict[str, str], cfg: ExperimentConfig, synthetic: dict | None,
            grids: list[str], baseline_summary: dict | None, readers_csv: str | None, skipped: dict[str, str],
            notes: list[str], external: list[str], truth: str | None = None) -> dict:
    from diffkd.evaluate.report import ReportInputs, write_report
    from diffkd.evaluate.summary import headline_table

    # each stage's predictions under the stage's name, whatever name the folder's file carries
    frames = [pd.read_parquet(os.path.join(path, "predictions.parquet")).assign(model=name)
              for name, path in model_dirs.items() if name != "diffusion"]
    baseline_path = out / "models" / "baselines_predictions.parquet"
    if baseline_summary is not None and baseline_path.exists():
        frames.append(pd.read_parquet(baseline_path))
    predictions = pd.concat([f[PREDICTION_COLUMNS] for f in frames], ignore_index=True)
    readers = None
    if readers_csv:
        readers = _pseudonymised_reads(ds, readers_csv)
        reference = cfg.evaluate.reference  # readers are compared with this model, on the cases it scored
        unscored = ~readers["case_id"].isin(set(predictions.loc[predictions["model"] == reference, "case_id"]))
        if unscored.any():
            notes.append(f"{int(unscored.sum())} reader read(s) of {readers.loc[unscored, 'case_id'].nunique()} "
                         f"case(s) that {reference} did not score (imaged only in a modality it does not read) "
                         "are left out of the reader comparison")
            readers = readers[~unscored].reset_index(drop=True)
    else:
        skipped["readers"] = "no reader CSV was given (diffkd run --readers CSV): no reader comparison"
    for note in notes:
        print(f"note: {note}")
    model_info = _model_info(model_dirs, cfg)
    inputs = ReportInputs(title=f"diffkd validation report: {cfg.name}",
                          initialised_from=_initialised_from(model_dirs, baseline_summary),
                          dataset={"name": Path(ds.root).name, "path": str(ds.uri), "external": list(external)},
                          model_info=model_info, synthetic=synthetic,
                          synthetic_grids=[g for g in grids if os.path.exists(g)],
                          baselines=baseline_summary, skipped=skipped, notes=notes, config=to_dict(cfg),
                          evaluate=to_dict(cfg.evaluate), truth=truth, label_names=list(ds.label_names))
    files = write_report(out, predictions, inputs, readers=readers, config=cfg.evaluate)
    metrics = json.loads(Path(files.metrics).read_text())
    print(headline_table(metrics))
    print(f"report: {files.index}")
    return {"report": str(files.index), "metrics": str(files.metrics)}


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
