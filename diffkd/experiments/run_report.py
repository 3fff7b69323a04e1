"""What the report stage of `diffkd run` gathers from the stages before it: each classifier's predictions,
footprint, start and training health, each student's teacher, and the readers' reads.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pandas as pd

from diffkd.config import ConfigError, to_dict
from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import pseudonymizer_for
from diffkd.data.schema import ClinicalEncoding
from diffkd.evaluate.readers import dataset_birads_reads
from diffkd.evaluate.report import DEEP_FEATURE_EXTRACTOR, ReportInputs, write_report
from diffkd.experiments.experiment import ExperimentConfig
from diffkd.models.classifiers import load_classifier, uses_clinical
from diffkd.models.diffusion import TRAINING_INFO as GENERATOR_INFO
from diffkd.models.export import ONNX_FILE
from diffkd.models.footprint import count_parameters, latency_table
from diffkd.train.stage_io import TRAINING_INFO

log = logging.getLogger("diffkd.run")

PREDICTION_COLUMNS = ["case_id", "patient_id", "center", "split", "label", "model", "prob"]


def model_info(model_dirs: dict[str, str], cfg: ExperimentConfig) -> dict[str, dict]:
    """Parameters and CPU latency of every trained classifier, measured the same way: torch and ONNX
    Runtime at batch 1 and 32, one thread (a stage's own ONNX export is reused where it wrote one)."""
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


def models_initialised_from(model_dirs: dict[str, str], baseline_summary: dict | None) -> dict[str, str]:
    """Each trained model's start ("scratch" or its weights), as its stage recorded it; the deep-feature
    model's is its extractor's (a frozen pretrained one, or cross-fitted from scratch)."""

    found = {}
    for name, path in model_dirs.items():
        if os.path.exists(os.path.join(path, GENERATOR_INFO)):
            found[name] = json.loads(Path(path, GENERATOR_INFO).read_text()).get("initialised_from")
        elif os.path.exists(os.path.join(path, TRAINING_INFO)):
            found[name] = json.loads(Path(path, TRAINING_INFO).read_text())["metrics"].get("initialised_from")
    found["deep_features"] = ((baseline_summary or {}).get("deep_features") or {}).get("initialised_from")
    return {name: start for name, start in found.items() if start}


def distillation_inputs(model_dirs: dict[str, str]) -> dict[str, dict]:
    """Each student's training history and the model name of the teacher it learned from (or, for the
    plain control, was measured against), from the stage's training.json."""
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


def health_inputs(model_dirs: dict[str, str], models_dir: Path) -> dict[str, dict]:
    """Each trained network's training health, from its stage's training.json: the classifiers of
    `model_dirs` and the deep-feature model's extractors (one folder per cross-fitting fold)."""
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


def write_run_report(ds: ImageDataset, out: Path, model_dirs: dict[str, str], cfg: ExperimentConfig,
                     synthetic: dict | None, grids: list[str], baseline_summary: dict | None, readers_csv: str | None,
                     skipped: dict[str, str], notes: list[str], external: list[str], truth: str | None = None) -> dict:
    """The report stage: report/index.html and metrics.json from every finished stage's outputs."""
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
    inputs = ReportInputs(title=f"diffkd validation report: {cfg.name}",
                          initialised_from=models_initialised_from(model_dirs, baseline_summary),
                          dataset={"name": Path(ds.root).name, "path": str(ds.uri), "external": list(external)},
                          model_info=model_info(model_dirs, cfg), synthetic=synthetic,
                          synthetic_grids=[g for g in grids if os.path.exists(g)],
                          baselines=baseline_summary, skipped=skipped, notes=notes, config=to_dict(cfg),
                          evaluate=to_dict(cfg.evaluate), truth=truth, label_names=list(ds.label_names),
                          distillation=distillation_inputs(model_dirs),
                          health=health_inputs(model_dirs, out / "models"))
    files = write_report(out, predictions, inputs, readers=readers, config=cfg.evaluate)
    return {"report": str(files.index), "metrics": str(files.metrics)}


def report_reads(ds: ImageDataset, readers_csv: str | None, predictions: pd.DataFrame, reference: str,
                 notes: list[str]) -> pd.DataFrame | None:
    """The reads the report compares the models with, on the cases `reference` scored: the readers CSV's
    (pseudonymised), and the radiologists' BI-RADS stored with the images as one more reader; None when
    there are neither. Reads of cases `reference` did not score are left out, with a note."""
    scored = set(predictions.loc[predictions["model"] == reference, "case_id"])
    readers = pseudonymised_reads(ds, readers_csv) if readers_csv else None
    if readers is not None:
        unscored = ~readers["case_id"].isin(scored)
        if unscored.any():
            notes.append(f"{int(unscored.sum())} reader read(s) of {readers.loc[unscored, 'case_id'].nunique()} "
                         f"case(s) that {reference} did not score (imaged only in a modality it does not read) "
                         "are left out of the reader comparison")
            log.info("note: %s", notes[-1])
            readers = readers[~unscored].reset_index(drop=True)
    own = dataset_reads(ds)
    if own is not None and own["case_id"].isin(scored).any():
        own = own[own["case_id"].isin(scored)]
        readers = own if readers is None else pd.concat([readers, own], ignore_index=True)
    return readers


def dataset_reads(ds: ImageDataset) -> pd.DataFrame | None:
    """The radiologists' BI-RADS category the dataset holds (its `birads` column) as one reader's reads."""
    return dataset_birads_reads(ds.metadata().select(["case_id", "birads"]).to_pandas())


def pseudonymised_reads(ds: ImageDataset, readers_csv: str) -> pd.DataFrame:
    """Reads name cases by the ids the hospital gave them; map them to the ids ingest stored.

    Ingest keys a case's pseudonym by center and raw id, so each raw id is tried against every
    center's pseudonym; reads matching no case of the dataset are dropped with a warning.
    """
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
