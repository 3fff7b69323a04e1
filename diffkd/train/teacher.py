"""Stage 2: the teacher, a timm classifier (from scratch or `pretrained` weights) on real (+ synthetic) images.

`teacher_loss` is the plain step (model, batch) -> StepOutput that tests call without Ray;
`TeacherTask` adds evaluation (internal-validation AUC, the early-stopping objective) and export;
`train_teacher` is the entry the pipeline calls: dataset + splits -> Ray datasets -> `fit` -> the best
epoch saved as a timm folder -> per-case probabilities for train, internal validation and external.

Class imbalance (upgrades are ~1 in 4): `class_weighting="balanced"` weights the cross-entropy by
inverse class frequency of the real training rows, n / (2 n_c). Weighting keeps every image in every
epoch (balanced sampling would drop or repeat rows); it shifts predicted probabilities upwards for
the minority class, which is why the operating threshold is fixed later on internal data.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from diffkd.data.dataset import ImageDataset
from diffkd.data.pipeline import (PipelineConfig, check_can_feed, count_synthetic_rows, split_datasets,
                                  with_center_vocabulary)
from diffkd.data.schema import DEFAULT_LABEL_NAMES, ClinicalEncoding
from diffkd.data.splits import check_synthetic_split
from diffkd.evaluate.health import assess
from diffkd.evaluate.metrics import auc_delong_ci, auc_or_nan
from diffkd.models.classifiers import classify, create_classifier, data_config, initialised_from, save_classifier
from diffkd.runtime.raycompat import init as ray_init
from diffkd.train.loop import FitResult, fit
from diffkd.train.loop_config import LoopConfig
from diffkd.train.stage_io import auc_phrases, predict_splits, prediction_summary, write_stage_outputs
from diffkd.train.task import StepOutput, Task

log = logging.getLogger(__name__)

CLASS_WEIGHTINGS = ("balanced", "none")


@dataclass
class TeacherConfig:
    arch: str = "resnet50"  # any timm name; the paper uses a large CNN, the demo a small one
    # "" = random weights; a local weights file or timm folder, or hf-hub:<org>/<name> (models/classifiers.py)
    pretrained: str = ""
    clinical: bool = False  # fuse the clinical attributes (fusion head beside the timm model)
    drop_rate: float = 0.2  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth, for architectures that have it
    class_weighting: str = "balanced"  # balanced | none (see module doc)
    label_smoothing: float = 0.0
    image_loss_weight: float = 0.5  # fusion only: weight of the image-only logits' own loss
    fusion_hidden: int = 64
    column_dropout: float = 0.1  # fusion only: chance to hide a clinical column while training
    predict_batch_size: int = 64
    predict_actors: int = 1  # Ray Data actors computing the per-case probabilities; 0: in the driver (small cohorts: no actor to start)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=30, patience=8, lr=1e-3))

    def __post_init__(self) -> None:
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"teacher.class_weighting {self.class_weighting!r} must be one of "
                             f"{', '.join(CLASS_WEIGHTINGS)}")
        if not 0.0 <= self.image_loss_weight:
            raise ValueError("teacher.image_loss_weight must be >= 0")


def build_teacher(cfg: TeacherConfig) -> nn.Module:
    return create_classifier(cfg.arch, in_chans=cfg.pipeline.in_chans, num_classes=2,
                             clinical_dim=ClinicalEncoding().width if cfg.clinical else 0,
                             drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate,
                             fusion_hidden=cfg.fusion_hidden, column_dropout=cfg.column_dropout,
                             pretrained=cfg.pretrained)


def teacher_loss(model: nn.Module, batch: dict[str, Any], cfg: TeacherConfig,
                 class_weights: torch.Tensor | None = None) -> StepOutput:
    """Weighted cross-entropy on one batch; a fusion model also trains its image-only logits."""
    labels = batch["label"]
    if cfg.clinical:
        logits, image_logits = model(batch["image"], batch["clinical"], return_image_logits=True)
    else:
        logits, image_logits = model(batch["image"]), None
    weight = None if class_weights is None else class_weights.to(logits.device, logits.dtype)
    loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=cfg.label_smoothing)
    if image_logits is not None and cfg.image_loss_weight:
        loss = loss + cfg.image_loss_weight * F.cross_entropy(image_logits, labels, weight=weight,
                                                               label_smoothing=cfg.label_smoothing)
    accuracy = (logits.detach().argmax(1) == labels).float().mean()
    # the final logits' own cross-entropy (no smoothing, no image-only term): what training health compares
    # with a constant predictor's
    ce = F.cross_entropy(logits.detach().float(), labels, weight=None if weight is None else weight.float())
    return StepOutput(loss=loss, num_samples=int(labels.shape[0]),
                      metrics={"accuracy": float(accuracy), "ce": float(ce)})


def balanced_class_weights(labels: Iterable[int]) -> tuple[float, float]:
    """n / (2 n_c) per class: each class contributes equally to the loss."""
    labels = [int(x) for x in labels]
    counts = [labels.count(0), labels.count(1)]
    if min(counts) == 0:
        raise ValueError(f"the training split has {counts[0]} rows of label 0 and {counts[1]} of label 1; "
                         "a classifier needs both classes")
    return tuple(len(labels) / (2 * c) for c in counts)


def per_case(case_ids: Iterable[str], labels: Iterable[int], probs: Iterable[float]) -> pd.DataFrame:
    """One row per case (case_id, label, prob): the mean probability of the case's images.

    The one rule that turns image scores into case scores, used by the saved predictions (and so
    the report) and by validation (early stopping, the search): selection and reporting share a unit.
    """
    images = pd.DataFrame({"case_id": [str(c) for c in case_ids], "label": [int(x) for x in labels],
                           "prob": [float(x) for x in probs]})
    return images.groupby("case_id", as_index=False, sort=True).agg(label=("label", "first"), prob=("prob", "mean"))


def validation_metrics(logits: list[torch.Tensor], labels: list[torch.Tensor], case_ids: list[str]) -> dict[str, float]:
    """`val_auc` per case (as the report scores) with its DeLong standard error `val_auc_se` (the noise the
    training-health check compares epoch-to-epoch changes with) and `val_loss` per image."""
    if not logits:
        return {"val_loss": math.nan, "val_auc": math.nan, "val_auc_se": math.nan}
    logits_all, labels_all = torch.cat(logits), torch.cat(labels)
    probs = torch.softmax(logits_all, dim=1)[:, 1]
    cases = per_case(case_ids, labels_all.tolist(), probs.tolist())
    return {"val_loss": float(F.cross_entropy(logits_all, labels_all)),
            "val_auc": auc_or_nan(cases["label"].tolist(), cases["prob"].tolist()),
            "val_auc_se": auc_standard_error(cases["label"].tolist(), cases["prob"].tolist())}


def auc_standard_error(labels, probs) -> float:
    """DeLong standard error of the AUC; NaN unless both classes have at least two cases."""
    labels = [int(x) for x in labels]
    if min(labels.count(0), labels.count(1)) < 2:
        return math.nan
    return float(auc_delong_ci(labels, probs).se)


class TeacherTask(Task):
    name = "teacher"
    objective = "val_auc"
    mode = "max"

    def __init__(self, config: TeacherConfig, class_weights: tuple[float, float] | None = None,
                 label_names: tuple[str, str] = DEFAULT_LABEL_NAMES):
        self.config = config
        self.class_weights = class_weights
        self.label_names = label_names  # the dataset's outcome names, written into the exported config.json

    def build_model(self) -> nn.Module:
        return build_teacher(self.config)

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        weights = None if self.class_weights is None else torch.tensor(self.class_weights)
        return teacher_loss(model, batch, self.config, weights)

    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        logits, labels, case_ids = [], [], []
        for batch in batches:
            logits.append(classify(model, batch).float().cpu())
            labels.append(batch["label"].cpu())
            case_ids.extend(batch["case_id"])
        return validation_metrics(logits, labels, case_ids)

    def export(self, model: nn.Module, out_dir: str) -> None:
        p = self.config.pipeline
        save_classifier(model, out_dir, data_config(p.image_size, p.in_chans, p.norm_mean, p.norm_std),
                        label_names=self.label_names)


@dataclass
class TeacherResult:
    model_dir: str
    fit: FitResult
    predictions: pd.DataFrame  # case_id, patient_id, center, split, label, model, prob
    metrics: dict  # {"internal": {"auc", "n"}, "external": {"auc", "n"}, "best_epoch": int}


def expected_train_rows(dataset: "ImageDataset", train_rows: pd.DataFrame, pipeline: PipelineConfig) -> int:
    """Rows of one training epoch (real + the synthetic share the pipeline mixes in): the LR schedule length."""
    real = int(len(train_rows))
    if pipeline.synthetic_ratio <= 0:
        return real
    available = count_synthetic_rows(dataset, set(train_rows["center"]), pipeline.synthetic_sources,
                                     pipeline.modalities)
    return real + min(available, round(pipeline.synthetic_ratio * real))  # as `make_dataset` mixes them


def rows_read(rows: pd.DataFrame, pipeline: PipelineConfig) -> pd.DataFrame:
    """The rows of `rows` a stage with `pipeline` actually reads: its modalities only (all when none are set)."""
    if pipeline.modalities and "modality" in rows:
        return rows[rows["modality"].isin(pipeline.modalities)]
    return rows


@dataclass
class TrainingPlan:
    """What the teacher's schedule and loss are sized from: the rows it trains on, and nothing else."""

    train_rows: pd.DataFrame  # real training rows of the modalities the teacher reads
    class_weights: tuple[float, float] | None
    train_samples: int  # rows of one epoch (real + synthetic share): the LR schedule's length


def plan_training(dataset: "ImageDataset", assignments: pd.DataFrame, cfg: TeacherConfig) -> TrainingPlan:
    """Size the LR schedule and class weights from the real train rows of `cfg.pipeline.modalities`.

    The pipeline streams only those modalities; sizing from every modality's rows (a B-mode teacher on a
    B-mode + Doppler dataset) would stretch the cosine schedule past the steps the loop takes.
    """
    real = assignments[~assignments["synthetic"].astype(bool)] if "synthetic" in assignments else assignments
    train_rows = rows_read(real[real["split"] == "train"], cfg.pipeline)
    if not len(rows_read(real[real["split"] == "val"], cfg.pipeline)):
        raise ValueError("the splits table has no internal-validation ('val') rows of the modalities "
                         f"{', '.join(cfg.pipeline.modalities) or 'any'}: the teacher selects its epoch on them; "
                         "use a val_fraction > 0")
    weights = balanced_class_weights(train_rows["label"]) if cfg.class_weighting == "balanced" else None
    samples = cfg.loop.train_samples or expected_train_rows(dataset, train_rows, cfg.pipeline)
    return TrainingPlan(train_rows=train_rows, class_weights=weights, train_samples=samples)


def train_teacher(dataset: "ImageDataset | str", assignments: pd.DataFrame, cfg: TeacherConfig, out_dir: str,
                  synthetic_ratio: float = 0.0, callbacks: list | None = None,
                  model_name: str = "teacher") -> TeacherResult:
    """Train the teacher on the train split (+ synthetic rows at `synthetic_ratio`), select its epoch by
    internal-validation AUC, save it to `out_dir` (timm folder), and predict every case.

    `out_dir` receives model.safetensors + config.json (+ fusion head), predictions.parquet (one row
    per real case of every split) and training.json (history, best epoch, AUCs, the run's location).
    Checkpoints go to `cfg.loop.storage_path` under the run's name.
    """
    ds = ImageDataset.open(dataset)
    real = assignments[~assignments["synthetic"].astype(bool)] if "synthetic" in assignments else assignments
    pipeline = dataclasses.replace(with_center_vocabulary(cfg.pipeline, ds), synthetic_ratio=synthetic_ratio)
    cfg = dataclasses.replace(cfg, pipeline=pipeline)
    plan = plan_training(ds, real, cfg)
    if synthetic_ratio > 0:
        check_synthetic_split(ds, real, pipeline.synthetic_sources)

    ray_init()
    check_can_feed(pipeline, cfg.loop.num_workers * cfg.loop.cpus_per_worker)
    # only the modalities it reads: the pipeline sizes the synthetic share from these cases
    datasets = split_datasets(ds, rows_read(real[real["split"].isin(("train", "val"))], pipeline), pipeline)
    loop = dataclasses.replace(cfg.loop, train_samples=plan.train_samples)
    task = TeacherTask(cfg, plan.class_weights, label_names=ds.label_names)
    fitted = fit(task, datasets, loop, callbacks=callbacks)

    task.export(fitted.load_model(task), out_dir)
    predictions = predict_splits(ds, real, pipeline, out_dir, cfg, model_name=model_name)
    metrics = {**prediction_summary(predictions, fitted), "initialised_from": initialised_from(cfg.pretrained),
               "health": assess(model_name, fitted.history, plan.train_rows["label"], plan.class_weights)}
    write_stage_outputs(out_dir, predictions, fitted, cfg, metrics=metrics,
                        best_checkpoint=fitted.best_checkpoint, synthetic_ratio=synthetic_ratio)
    _log_summary(model_name, metrics)
    return TeacherResult(model_dir=out_dir, fit=fitted, predictions=predictions, metrics=metrics)


def _log_summary(model_name: str, metrics: dict) -> None:
    log.info("; ".join([f"[{model_name}] best epoch {metrics['best_epoch']} of {metrics['epochs_run']}",
                        *auc_phrases(metrics)]))
