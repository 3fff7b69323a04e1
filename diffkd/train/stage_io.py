"""What a classifier stage (teacher, student) leaves in its folder besides the model, written one way.

``predictions.parquet``: the probability of every real case of every split (`predict_splits`), the
report's input; ``training.json``: the run's history, its best epoch, the AUCs per split
(`prediction_summary`) and the config (`write_stage_outputs`). Both are replaced whole.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Protocol

from diffkd.config import to_dict
from diffkd.data.pipeline import PipelineConfig, make_dataset
from diffkd.evaluate.metrics import auc_or_nan
from diffkd.runtime.files import atomic_write_json, atomic_write_parquet
from diffkd.train.loop import FitResult, predict

if TYPE_CHECKING:
    import pandas as pd

    from diffkd.data.dataset import ImageDataset

PREDICTIONS = "predictions.parquet"
TRAINING_INFO = "training.json"


class PredictionSettings(Protocol):
    """The prediction options a stage's config carries (TeacherConfig, StudentConfig)."""
    predict_batch_size: int
    predict_actors: int


def predict_splits(dataset: "ImageDataset", assignments: "pd.DataFrame", pipeline: PipelineConfig, model_dir: str,
                   cfg: PredictionSettings, model_name: str = "teacher") -> "pd.DataFrame":
    """Probability of every real case in `assignments` (no augmentation), with its split and identifiers.

    One row per case: a case's images (its 1-3 views) are each scored and their probabilities
    averaged. Only the modalities the model reads (`pipeline.modalities`) are predicted.
    """
    if pipeline.modalities and "modality" in assignments:
        assignments = assignments[assignments["modality"].isin(pipeline.modalities)]
    # every split in one pass: each Ray Data execution costs seconds of start-up on a small machine
    ray_ds = make_dataset(dataset, assignments["case_id"], pipeline, train=False,
                          centers=assignments["center"].unique())
    scored = predict(model_dir, ray_ds, batch_size=cfg.predict_batch_size, num_actors=cfg.predict_actors)
    probs = scored.groupby("case_id", as_index=False)["prob"].mean()  # the rule of `teacher.per_case`
    keep = [c for c in ("case_id", "patient_id", "center", "split", "label") if c in assignments]
    cases = assignments[keep].drop_duplicates("case_id")
    out = cases.merge(probs, on="case_id", how="inner", validate="one_to_one")
    if len(out) != len(cases):
        missing = sorted(set(cases["case_id"]) - set(out["case_id"]))[:5]
        raise RuntimeError(f"predictions are missing for {len(cases) - len(out)} case(s), e.g. {missing}")
    out.insert(len(keep), "model", model_name)
    return out.sort_values(["split", "case_id"]).reset_index(drop=True)


def prediction_summary(predictions: "pd.DataFrame", fitted: FitResult) -> dict[str, Any]:
    """The best epoch, epochs run, early stop, and the AUC and case count of each split predicted."""
    metrics: dict[str, Any] = {"best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
                               "stopped_early": fitted.stopped_early}
    for name, split in (("internal", "val"), ("external", "test"), ("train", "train")):
        rows = predictions[predictions["split"] == split]
        if len(rows):
            metrics[name] = {"auc": auc_or_nan(rows["label"].tolist(), rows["prob"].tolist()), "n": int(len(rows))}
    return metrics


def auc_phrases(metrics: dict[str, Any]) -> list[str]:
    """The internal-validation and external AUCs of `prediction_summary`, as the stages log them."""
    return [f"{label} AUC {metrics[name]['auc']:.3f} (n={metrics[name]['n']})"
            for name, label in (("internal", "internal-validation"), ("external", "external")) if name in metrics]


def write_stage_outputs(out_dir: str, predictions: "pd.DataFrame", fitted: FitResult, cfg: Any,
                        **info: Any) -> None:
    """predictions.parquet and training.json (the run's history and location, `cfg`, and `info`), each replaced whole."""
    atomic_write_parquet(os.path.join(out_dir, PREDICTIONS), predictions)
    atomic_write_json(os.path.join(out_dir, TRAINING_INFO), {
        **info, "history": fitted.history, "run_name": fitted.run_name, "run_path": fitted.run_path,
        "config": to_dict(cfg)}, indent=1)
