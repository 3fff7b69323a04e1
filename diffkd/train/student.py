"""Stage 3: distil the teacher into a small, fast timm student, through the shared loop.

    train_student(dataset, splits, StudentConfig(arch=..., teacher_dir=..., pipeline=..., loop=...), out_dir)

Two modes (`StudentConfig.mode`):

- ``paired``: teacher and student see the same images (the student modality, B-mode).
- ``pairing_free`` (PaGKD, Hu et al. 2026): the teacher sees the rich modality (e.g. ``us_doppler``) of
  *other patients*, the student sees B-mode. Both views travel in the one training stream and every
  batch is split by modality; the group losses compare the student's class-c images with the
  teacher's class-c images. Instance losses (logit, feature KD) need pairs: here they use random
  same-class pairs, the baseline group KD is meant to beat.

`distill_step` is the plain (model, teacher, batch) -> StepOutput function the task wraps; tests call
it without Ray. With no teacher (`teacher_dir=""`) the stage trains a plain student on cross-entropy:
that is `student_plain`, the no-KD control (`plain_variant`).

The config nests its `pipeline` and `loop` sections like the teacher's, so a search space addresses
everything a run needs by dotted path (`distill.terms.logit.temperature`, `loop.lr`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn

from diffkd.config import from_dict
from diffkd.data.dataset import ImageDataset
from diffkd.data.pipeline import PipelineConfig, check_can_feed, make_dataset, with_center_vocabulary
from diffkd.data.schema import MODALITIES, ClinicalEncoding
from diffkd.data.splits import check_synthetic_split
from diffkd.distill.agreement import agreement
from diffkd.distill.objective import DistillationModel, DistillConfig, combine
from diffkd.evaluate.health import assess
from diffkd.evaluate.metrics import CIOptions
from diffkd.evaluate.summary import paired_comparison
from diffkd.models import unwrap
from diffkd.models.classifiers import (create_classifier, data_config, features, initialised_from, load_classifier,
                                       run_classifier)
from diffkd.models.export import export_classifier
from diffkd.models.footprint import count_parameters, latency_ms
from diffkd.runtime.raycompat import init as ray_init
from diffkd.train.loop import FitResult, fit
from diffkd.train.loop_config import LoopConfig
from diffkd.train.stage_io import (PREDICTIONS, auc_phrases, predict_splits, prediction_summary,
                                   write_stage_outputs)
from diffkd.train.task import StepOutput, Task
from diffkd.train.teacher import balanced_class_weights, expected_train_rows, validation_metrics

log = logging.getLogger(__name__)

MODES = ("paired", "pairing_free")
CLASS_WEIGHTINGS = ("balanced", "none")


@dataclass
class StudentConfig:
    arch: str = "mobilenetv3_small_100"  # any timm classifier; mobilenetv3 / efficientnet_lite / resnet18 class
    pretrained: str = ""  # "" = random weights; a local weights file or timm folder, or hf-hub:<org>/<name>
    teacher_dir: str = ""  # the teacher's saved folder; "" = plain student (cross-entropy only)
    # a teacher to measure agreement with, not to learn from (the plain control's, so that its agreement
    # can be set beside the distilled student's); "" = teacher_dir
    agreement_teacher_dir: str = ""
    mode: str = "paired"  # paired | pairing_free
    student_modality: str = "us"
    teacher_modality: str = "us_doppler"  # what the teacher sees in pairing_free mode
    clinical: bool = False  # fuse the clinical attributes (as the teacher's `clinical`)
    drop_rate: float = 0.0
    class_weighting: str = "balanced"  # cross-entropy weights, as the teacher's (teacher.py)
    distill: DistillConfig = field(default_factory=DistillConfig)
    predict_batch_size: int = 64
    predict_actors: int = 1  # Ray Data actors computing the per-case probabilities; 0: in the driver (small cohorts: no actor to start)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=30, patience=8, lr=1e-3))

    def __post_init__(self) -> None:
        for name, cls in (("distill", DistillConfig), ("pipeline", PipelineConfig), ("loop", LoopConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, from_dict(cls, getattr(self, name), f"student.{name}"))
        if self.mode not in MODES:
            raise ValueError(f"student.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.class_weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"student.class_weighting must be one of {', '.join(CLASS_WEIGHTINGS)}")
        for name in ("student_modality", "teacher_modality"):
            if getattr(self, name) not in MODALITIES:
                raise ValueError(f"student.{name} {getattr(self, name)!r} is not one of {', '.join(MODALITIES)}")
        if self.mode == "pairing_free":
            if not self.teacher_dir:
                raise ValueError("student.mode pairing_free distils from a teacher: set student.teacher_dir")
            if self.student_modality == self.teacher_modality:
                raise ValueError("pairing_free needs different student and teacher modalities "
                                 f"(both are {self.student_modality!r})")

    @property
    def distills(self) -> bool:
        return bool(self.teacher_dir)

    @property
    def compared_teacher_dir(self) -> str:
        """The teacher agreement is measured against: only where both models read the same images (paired)."""
        return "" if self.mode == "pairing_free" else (self.agreement_teacher_dir or self.teacher_dir)



def split_views(batch: dict[str, Any], cfg: StudentConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(student view, teacher view) of one batch: the same rows when paired, rows by modality otherwise."""
    if cfg.mode == "paired" or not cfg.distills:
        return batch, (batch if cfg.distills else None)
    modality = batch["modality_idx"]
    student_rows = modality == MODALITIES.index(cfg.student_modality)
    teacher_rows = modality == MODALITIES.index(cfg.teacher_modality)
    return take_rows(batch, student_rows), take_rows(batch, teacher_rows)


def take_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    index = rows.nonzero().flatten()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[index.to(value.device)]
        else:
            out[key] = [value[i] for i in index.tolist()]
    return out


def distill_step(model: nn.Module, teacher: nn.Module | None, batch: dict[str, Any], cfg: StudentConfig,
                 epoch: int = 1) -> StepOutput:
    """Loss of one training batch. `model` is a DistillationModel (or the DeepSpeed engine around one)."""
    student_view, teacher_view = split_views(batch, cfg)
    n = len(student_view["label"])
    if n == 0:  # a pairing-free batch of teacher rows only: nothing to learn, but every rank must step
        return StepOutput(loss=sum(p.sum() for p in model.parameters()) * 0.0, num_samples=0)
    distill = cfg.distill if cfg.distills else None
    if distill is not None and len(teacher_view["label"]) == 0:
        teacher_view = None  # a pairing-free batch without teacher rows: cross-entropy only this step
    active = [] if distill is None else [name for name in distill.active_terms()
                                         if epoch > distill.warmup_epochs(name)]
    terms = model(student_view, teacher_view, teacher if teacher_view is not None and distill else None,
                  paired=cfg.mode == "paired", active=active)
    loss = combine(terms, distill)
    metrics = {name: float(value.detach()) for name, value in terms.items() if not name.startswith("_")}
    return StepOutput(loss=loss, num_samples=n, metrics=metrics)


# ---- the task -------------------------------------------------------------------------------------

def feature_channels(model: nn.Module, in_chans: int) -> int:
    """Width of a classifier's last feature map, from a tiny dry run."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        width = features(model, torch.zeros(1, in_chans, 64, 64), pooled=False).shape[1]
    model.train(was_training)
    return int(width)


def load_teacher(teacher_dir: str) -> nn.Module:
    if not os.path.isdir(teacher_dir):
        raise FileNotFoundError(f"student.teacher_dir {teacher_dir!r} is not a folder; train the teacher first "
                                "(it writes model.safetensors + config.json there)")
    return load_classifier(teacher_dir).eval().requires_grad_(False)


class StudentTask(Task):
    name = "student"
    objective = "val_auc"
    mode = "max"

    def __init__(self, config: StudentConfig, class_weights: tuple[float, float] | None = None):
        self.config = config
        self.class_weights = class_weights
        self.clinical_dim = ClinicalEncoding().width if config.clinical else 0
        self.teacher: nn.Module | None = None
        self.compared_teacher: nn.Module | None = None  # what agreement is measured against
        self.teacher_channels = 0
        self.epoch = 0
        if config.distills:  # on the driver: a wrong folder fails here, not in a worker
            self.teacher_channels = feature_channels(load_teacher(config.teacher_dir), config.pipeline.in_chans)
        elif config.compared_teacher_dir and not os.path.isdir(config.compared_teacher_dir):
            raise FileNotFoundError(f"student.agreement_teacher_dir {config.compared_teacher_dir!r} is not a folder; "
                                    "give a trained teacher's folder or leave it empty")

    def build_student(self) -> nn.Module:
        return create_classifier(self.config.arch, in_chans=self.config.pipeline.in_chans, num_classes=2,
                                 clinical_dim=self.clinical_dim, drop_rate=self.config.drop_rate,
                                 pretrained=self.config.pretrained)

    def build_model(self) -> nn.Module:
        student = self.build_student()
        distill = self.config.distill if self.config.distills else None
        return DistillationModel(student, distill, feature_channels(student, self.config.pipeline.in_chans),
                                 self.teacher_channels, self.class_weights)

    def setup(self, device: torch.device) -> None:
        if self.config.distills:
            self.teacher = load_teacher(self.config.teacher_dir).to(device)
        compared = self.config.compared_teacher_dir
        if compared:
            self.compared_teacher = self.teacher if compared == self.config.teacher_dir \
                else load_teacher(compared).to(device)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    def step(self, model: nn.Module, batch: dict[str, Any]) -> StepOutput:
        distill = self.config.distill
        if self.epoch == 0 and self.config.distills and any(distill.warmup_epochs(name) > 0
                                                            for name in distill.active_terms()):
            raise RuntimeError("StudentTask: the training loop never called on_epoch_start, so the terms' warm-up "
                               "cannot be followed; the loop must call task.on_epoch_start(epoch) every epoch")
        return distill_step(model, self.teacher, batch, self.config, self.epoch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
        """Internal-validation AUC per case and cross-entropy of the student alone (the objective Tune
        optimises), and its agreement with the teacher on the same images (`diffkd.distill.agreement`)."""
        student = unwrap(model).student
        logits, taught, labels, case_ids = [], [], [], []
        for batch in batches:
            logits.append(run_classifier(student, batch).logits.float().cpu())
            if self.compared_teacher is not None:
                taught.append(run_classifier(self.compared_teacher, batch).logits.float().cpu())
            labels.append(batch["label"].cpu())
            case_ids.extend(batch["case_id"])
        metrics = validation_metrics(logits, labels, case_ids)
        if taught:
            metrics.update(agreement(torch.cat(logits), torch.cat(taught)))
        return metrics

    def export(self, model: nn.Module, out_dir: str) -> None:
        export_classifier(unwrap(model).student, out_dir, preprocessing(self.config.pipeline))


def preprocessing(pipeline: PipelineConfig) -> dict:
    """The exported student's preprocessing (timm's data config) from the pipeline it trained with."""
    return data_config(pipeline.image_size, pipeline.in_chans, pipeline.norm_mean, pipeline.norm_std)


# ---- the stage, end to end ------------------------------------------------------------------------

TRAINING_SPLITS = ("train", "val")  # what training reads; the external split is only ever predicted


@dataclass
class StudentResult:
    fit: FitResult
    model_dir: str | None  # the exported student (None when not exported)
    val_auc: float  # internal validation AUC of the best epoch
    params: int
    predictions: "pd.DataFrame | None"  # per case of every split, when exported
    metrics: dict


def plain_variant(cfg: StudentConfig) -> StudentConfig:
    """The `student_plain` control: the same architecture and inputs, no teacher, real images only.

    Its agreement is still measured against the distilled student's teacher, so that the two can be
    compared (how much of the agreement the labels alone give)."""
    return dataclasses.replace(cfg, teacher_dir="", mode="paired",
                               agreement_teacher_dir=cfg.agreement_teacher_dir or cfg.teacher_dir,
                               pipeline=dataclasses.replace(cfg.pipeline, synthetic_ratio=0.0))


def _training_views(assignments: "pd.DataFrame", cfg: StudentConfig) -> dict[str, "pd.DataFrame"]:
    missing = {"case_id", "center", "split", "modality", "label"} - set(assignments.columns)
    if missing:
        raise ValueError(f"student stage: the splits table lacks column(s) {sorted(missing)}")
    rows = assignments[assignments["split"].isin(TRAINING_SPLITS)]
    if "synthetic" in rows.columns:
        rows = rows[~rows["synthetic"].astype(bool)]  # synthetic rows join through pipeline.synthetic_ratio
    train_modalities = (cfg.student_modality, cfg.teacher_modality) if cfg.mode == "pairing_free" \
        else (cfg.student_modality,)
    views = {"train": rows[(rows["split"] == "train") & rows["modality"].isin(train_modalities)],
             "val": rows[(rows["split"] == "val") & (rows["modality"] == cfg.student_modality)]}
    for split, part in views.items():
        if part.empty:
            raise ValueError(f"student stage: no {split} rows of modality {cfg.student_modality!r}; "
                             "check the dataset's modalities and the splits")
    if cfg.mode == "pairing_free" and not (views["train"]["modality"] == cfg.teacher_modality).any():
        raise ValueError(f"pairing_free: the train split has no {cfg.teacher_modality!r} rows for the teacher")
    return views


def student_datasets(dataset: "ImageDataset", assignments: "pd.DataFrame", cfg: StudentConfig) -> dict[str, Any]:
    """Ray datasets "train" and "val" for the stage, from the train/val rows only.

    "train": the student modality's rows, plus the teacher modality's when pairing-free (the step
    splits every batch by modality); synthetic rows join at `pipeline.synthetic_ratio`. "val": the
    student modality only. Test rows are never read.
    """
    pipeline = with_center_vocabulary(cfg.pipeline, dataset)
    out = {}
    for split, part in _training_views(assignments, cfg).items():
        view = dataclasses.replace(pipeline, modalities=tuple(sorted(set(part["modality"]))))
        out[split] = make_dataset(dataset, part["case_id"], view, train=split == "train",
                                  centers=part["center"].unique())
    return out


def train_student(dataset: "ImageDataset | str", assignments: "pd.DataFrame", cfg: StudentConfig,
                  out_dir: str | None = None, callbacks: list | None = None,
                  model_name: str = "student_kd") -> StudentResult:
    """Train the student through the shared loop, selecting its epoch by internal-validation AUC.

    `assignments` is the splits table (`diffkd.data.splits.make_splits`); training reads its train
    and val rows only. With `out_dir` the best epoch is exported there (model.safetensors,
    config.json, model.onnx) with `predictions.parquet` (every real case of every split, labelled
    `model_name`; the external split is predicted here, after training, and nowhere else) and
    `training.json`. `callbacks` go to Ray Train (Tune passes its TuneReportCallback).
    """
    ds = ImageDataset.open(dataset)
    views = _training_views(assignments, cfg)
    if cfg.pipeline.synthetic_ratio > 0:
        check_synthetic_split(ds, assignments, cfg.pipeline.synthetic_sources)
    student_rows = views["train"][views["train"]["modality"] == cfg.student_modality]
    weights = balanced_class_weights(student_rows["label"]) if cfg.class_weighting == "balanced" else None
    ray_init()
    cfg = dataclasses.replace(cfg, pipeline=with_center_vocabulary(cfg.pipeline, ds))
    check_can_feed(cfg.pipeline, cfg.loop.num_workers * cfg.loop.cpus_per_worker)
    read = dataclasses.replace(cfg.pipeline, modalities=tuple(sorted(set(views["train"]["modality"]))))  # as streamed
    loop = dataclasses.replace(cfg.loop, train_samples=cfg.loop.train_samples
                               or expected_train_rows(ds, views["train"], read))
    task = StudentTask(cfg, weights)
    fitted = fit(task, student_datasets(ds, assignments, cfg), loop, callbacks=callbacks)
    health = assess(model_name, fitted.history, student_rows["label"], weights)
    model = fitted.load_model(task)
    val_auc = float(fitted.best_metrics.get("val_auc", math.nan))
    result = StudentResult(fit=fitted, model_dir=out_dir, val_auc=val_auc, params=count_parameters(model.student),
                           predictions=None, metrics={"health": health})
    if out_dir:
        result.predictions, result.metrics = _export_and_predict(model.student, ds, assignments, cfg, fitted,
                                                                  out_dir, model_name, health)
    return result


def _export_and_predict(student: nn.Module, ds: "ImageDataset", assignments: "pd.DataFrame", cfg: StudentConfig,
                        fitted: FitResult, out_dir: str, model_name: str, health: dict):
    onnx_gap = export_classifier(student, out_dir, preprocessing(cfg.pipeline), ds.label_names)
    real = assignments[~assignments["synthetic"].astype(bool)] if "synthetic" in assignments else assignments
    real = real[real["modality"] == cfg.student_modality]  # the student reads its own modality only
    predictions = predict_splits(ds, real, cfg.pipeline, out_dir, cfg, model_name=model_name)
    metrics = prediction_summary(predictions, fitted)
    metrics.update(params=count_parameters(student), onnx_max_abs_diff=onnx_gap,
                   initialised_from=initialised_from(cfg.pretrained), health=health,
                   latency_ms=latency_ms(student, cfg.pipeline.image_size, cfg.pipeline.in_chans,
                                         ClinicalEncoding().width if cfg.clinical else 0))
    gap = teacher_gap(predictions, cfg.compared_teacher_dir, model_name)
    if gap is not None:
        metrics["teacher_gap"] = gap
    write_stage_outputs(out_dir, predictions, fitted, cfg, model=model_name, metrics=metrics)
    parts = [f"[{model_name}] {cfg.arch}, {metrics['params']:,} parameters, best epoch {metrics['best_epoch']}",
             *auc_phrases(metrics)]
    if gap is not None and gap.get("difference") is not None:
        low, high = gap["difference_ci"]
        parts.append(f"external AUC minus its teacher's {gap['difference']:+.3f} ({low:+.3f} to {high:+.3f})")
    log.info("; ".join(parts))
    return predictions, metrics


def teacher_gap(predictions: "pd.DataFrame", teacher_dir: str, model_name: str) -> dict | None:
    """The student's external AUC minus its teacher's on the same cases: a paired test (DeLong, or the
    patient-clustered bootstrap where patients have several cases) with its 95% CI. None without a
    teacher or its predictions; the difference is None when the external cases lack a class."""
    path = os.path.join(teacher_dir, PREDICTIONS) if teacher_dir else ""
    if not path or not os.path.exists(path):
        return None
    teacher = pd.read_parquet(path).assign(model="teacher")
    both = pd.concat([predictions.assign(model=model_name), teacher[predictions.columns.intersection(teacher.columns)]],
                     ignore_index=True)
    entry = paired_comparison(both, model_name, "teacher", "test", CIOptions())
    entry["b"] = os.path.basename(os.path.normpath(teacher_dir))
    return entry
