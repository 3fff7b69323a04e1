"""The synthetic-data audit: judges what synthesis wrote against real images the generator never saw.

FID/KID in the feature space of an encoder trained here on real images (no Inception weights exist
offline), conditional accuracy, near copies of training images, train-on-synthetic/test-on-real AUC,
label pairs, and image grids per center x label. The measures live in `stats`, the figures in `figures`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import uuid
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from diffkd.data.dataset import DatasetError, ImageDataset
from diffkd.data.pipeline import READ_COLUMNS, PipelineConfig, decode_batch, load_arrays
from diffkd.data.schema import NUM_LABELS
from diffkd.data.splits import SplitConfig, split_case_ids
from diffkd.evaluate.metrics import auc_or_nan
from diffkd.models.diffusion import load_pipeline
from diffkd.runtime.files import atomic_write_json
from diffkd.synth.figures import plot_grid, plot_label_pairs, plot_near_copies
from diffkd.synth.sampling import SynthConfig, condition_masks, generator_splits, generator_training_rows, stable_seed
from diffkd.synth.stats import (LabelPairs, frechet_distance, kernel_distance, label_effect, label_recovery,
                                near_copies, to_pipeline_range)
from diffkd.train.loop import fit
from diffkd.train.loop_config import LoopConfig
from diffkd.train.task import StepOutput, Task

log = logging.getLogger(__name__)


@dataclass
class AuditConfig:
    image_size: int | None = None  # default: the synthetic images' own size
    epochs: int = 10  # of the audit classifiers (real-trained encoder, synthetic-trained TSTR model)
    batch_size: int = 32
    lr: float = 2e-3
    near_copy_quantile: float = 0.01  # threshold = this quantile of real-vs-real nearest-neighbour distances
    max_per_set: int = 1000  # cap on images per set (real train, real val, synthetic): keeps the audit quick
    grid_per_cell: int = 6  # real and synthetic images per center x label in the grid
    closest_pairs: int = 8  # synthetic/training pairs shown in the near-copy figure
    kid_subset_size: int = 100
    kid_subsets: int = 50
    # Label pairs: the generator draws each of `label_pairs` conditions twice, as DCIS and as upgrade, with
    # the same noise, mask, center and clinical values; the real-trained classifier scores both. 0 = off.
    label_pairs: int = 32
    pair_steps: int | None = None  # None: as the synthesis run sampled (`with_synthesis_sampling`)
    pair_guidance: float | None = None
    seed: int = 0
    storage_path: str | None = None  # where the audit classifiers' training runs go (None: a temporary folder)

    def __post_init__(self) -> None:
        if not 0.0 <= self.near_copy_quantile < 0.5:
            raise ValueError(f"audit near_copy_quantile {self.near_copy_quantile} must be in [0, 0.5)")
        if self.epochs < 1 or self.batch_size < 1 or self.max_per_set < 2:
            raise ValueError("audit epochs and batch_size must be >= 1 and max_per_set >= 2")
        if self.label_pairs < 0 or (self.pair_steps is not None and self.pair_steps < 1):
            raise ValueError("audit label_pairs must be >= 0 and pair_steps >= 1")


def with_synthesis_sampling(cfg: AuditConfig, synth: SynthConfig) -> AuditConfig:
    """The audit's label pairs sampled as `synth` sampled the synthetic rows, where the audit names no other."""
    return dataclasses.replace(
        cfg, pair_steps=cfg.pair_steps or synth.num_inference_steps,
        pair_guidance=synth.guidance_scale if cfg.pair_guidance is None else cfg.pair_guidance)


class AuditEncoder(nn.Module):
    """A small CNN trained on real images to tell label and center apart: the audit's feature space.

    Trained here because no Inception (or any pretrained) weights exist offline — and an in-domain
    encoder measures what matters for ultrasound better than ImageNet features would.
    """

    def __init__(self, num_centers: int, in_chans: int = 1, width: int = 32, feature_dim: int = 64):
        super().__init__()
        chans = [in_chans, width, 2 * width, 4 * width, feature_dim]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.label_head = nn.Linear(feature_dim, NUM_LABELS)
        self.center_head = nn.Linear(feature_dim, num_centers)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        return self.body(image).mean(dim=(2, 3))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(image)
        return self.label_head(f), self.center_head(f)


def audit_classifier_loss(model: nn.Module, batch: dict) -> StepOutput:
    """Cross-entropy of label plus center: the plain step of `AuditClassifierTask`."""
    label_logits, center_logits = model(batch["image"])
    label_loss = F.cross_entropy(label_logits, batch["label"])
    center_loss = F.cross_entropy(center_logits, batch["center_idx"])
    accuracy = (label_logits.argmax(1) == batch["label"]).float().mean()
    return StepOutput(loss=label_loss + center_loss, num_samples=len(batch["label"]),
                      metrics={"label_loss": float(label_loss.detach()), "center_loss": float(center_loss.detach()),
                               "label_accuracy": float(accuracy)})


class AuditClassifierTask(Task):
    """The audit's classifiers, trained by the shared loop like every other model in diffkd."""

    name = "audit_classifier"
    objective = "val_loss"
    mode = "min"

    def __init__(self, num_centers: int, seed: int = 0):
        self.config = {"num_centers": num_centers, "seed": seed}

    def build_model(self) -> AuditEncoder:
        torch.manual_seed(self.config["seed"])
        return AuditEncoder(self.config["num_centers"])

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        return audit_classifier_loss(model, batch)


def load_synthetic_arrays(dataset: ImageDataset, cfg, run_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """Decode synthetic rows (optionally of some runs only) like the pipeline decodes real ones."""
    if not dataset.centers(synthetic=True):
        raise DatasetError(f"dataset {dataset.uri} has no synthetic rows; run `diffkd synth run` first")
    table = dataset.read_table(synthetic=True, columns=list(READ_COLUMNS))
    if run_ids:
        import pyarrow.compute as pc

        table = table.filter(pc.is_in(table.column("source"), pa.array(run_ids)))
        if table.num_rows == 0:
            raise DatasetError(f"no synthetic rows of run(s) {', '.join(run_ids)} in {dataset.uri}")
    parts = []
    for start in range(0, table.num_rows, 64):
        chunk = table.slice(start, 64)
        rows = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
        decoded = decode_batch(rows, cfg)
        decoded["source"] = rows["source"].astype(object)
        parts.append(decoded)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _subsample(arrays: dict[str, np.ndarray], limit: int, seed: int) -> dict[str, np.ndarray]:
    n = len(arrays["label"])
    if n <= limit:
        return arrays
    keep = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    return {k: v[keep] for k, v in arrays.items()}


def _array_dataset(arrays: dict[str, np.ndarray], batch_size: int):
    """In-memory rows as a Ray dataset in blocks of one batch (from_items alone would cut a few hundred
    rows into ~200 blocks of 1-2 rows, each a call to the split coordinator)."""
    import ray.data

    n = len(arrays["label"])
    return ray.data.from_items([{"image": arrays["image"][i], "label": int(arrays["label"][i]),
                                 "center_idx": int(arrays["center_idx"][i])} for i in range(n)],
                               override_num_blocks=max(1, n // batch_size))


def train_audit_classifier(train: dict[str, np.ndarray], num_centers: int, cfg: AuditConfig, storage_path: str,
                           what: str) -> AuditEncoder:
    """Fit an AuditEncoder through the shared loop for a fixed number of epochs (no selection on the
    sets it will be scored on), and return the last epoch's weights."""
    n = len(train["label"])
    batch = min(cfg.batch_size, n)
    steps = cfg.epochs * (n // batch)
    # At least one warm-up step: DeepSpeed's WarmupCosineLR refuses zero, which 5% of a tiny run rounds to.
    loop = LoopConfig(epochs=cfg.epochs, batch_size=batch, lr=cfg.lr, weight_decay=1e-4,
                      warmup_fraction=max(0.05, 1.0 / steps),
                      storage_path=storage_path, run_name=f"audit-{what}-{uuid.uuid4().hex[:6]}", max_failures=0,
                      train_samples=n, seed=cfg.seed, progress_interval_s=60.0)
    task = AuditClassifierTask(num_centers, seed=cfg.seed)
    log.info("audit: training the %s classifier on %d images (%d epochs)", what, n, cfg.epochs)
    result = fit(task, {"train": _array_dataset(train, batch)}, loop)
    return result.load_model(task, which="latest")


@torch.no_grad()
def _encode(model: AuditEncoder, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, label probabilities, center predictions) for an image array."""
    feats, probs, centers = [], [], []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch])
        f = model.features(x)
        feats.append(f.numpy())
        probs.append(torch.softmax(model.label_head(f), 1)[:, 1].numpy())
        centers.append(model.center_head(f).argmax(1).numpy())
    return np.concatenate(feats), np.concatenate(probs), np.concatenate(centers)


def generate_label_pairs(dataset: ImageDataset, model_dir: str, cfg: AuditConfig) -> LabelPairs:
    """Draw `cfg.label_pairs` training rows (spread over centers and labels) and generate each twice."""
    rows = generator_training_rows(dataset, model_dir).sort_values("case_id")
    rng = np.random.default_rng(cfg.seed)
    # round-robin over center x label cells so that every cell is represented even in a few pairs
    cells = [cell.iloc[rng.permutation(len(cell))] for _, cell in rows.groupby(["center", "label"])]
    order = [cell.iloc[k] for k in range(max(map(len, cells))) for cell in cells if k < len(cell)]
    drawn = pd.DataFrame(order[: cfg.label_pairs]).reset_index(drop=True)
    cfg = with_synthesis_sampling(cfg, SynthConfig())  # defaults where neither names them
    pipe = load_pipeline(model_dir)
    size = pipe.unet.config.sample_size
    masks = np.zeros((len(drawn), size, size), np.uint8)
    if pipe.mask_channel:
        known = condition_masks(dataset, drawn.rename(columns={"case_id": "condition_case_id"}), model_dir)
        for i, cid in enumerate(drawn["case_id"]):
            masks[i] = known.get(cid, masks[i])
    mask_tensor = torch.from_numpy(masks[:, None].astype(np.float32)) if pipe.mask_channel else None
    records = drawn.to_dict("records")
    images = {}
    for label in (0, 1):
        generators = [torch.Generator().manual_seed(stable_seed(cfg.seed, "pair", i)) for i in range(len(records))]
        out = pipe([{**r, "label": label} for r in records], masks=mask_tensor, num_inference_steps=cfg.pair_steps,
                   guidance_scale=cfg.pair_guidance, generator=generators, output_type="pt")
        images[label] = out.images.float().numpy()
    return LabelPairs(drawn, images[0], images[1], masks)


def audit(dataset: ImageDataset | str, out_dir: str, model_dir: str | None = None, split=None,
          run_ids: list[str] | None = None, cfg: AuditConfig | None = None) -> dict:
    """Judge the synthetic rows against the real ones; write JSON + PNGs to `out_dir`.

    Real reference sets come from the generator's split (`model_dir`'s saved spec, or `split`):
    "train" = the rows the generator learnt from (where near copies would come from), "val" =
    internal rows it never saw (the real-vs-real reference for every measure, and the TSTR test set).
    Returns the flat dict that goes into metrics.json as `"synthetic"`.
    """

    cfg = cfg or AuditConfig()
    dataset = ImageDataset.open(dataset)
    if model_dir is not None:
        meta, ids = generator_splits(dataset, model_dir)
    else:
        meta = dataset.metadata().to_pandas()
        ids = split_case_ids(meta, split or SplitConfig())
    if not ids["val"]:
        raise ValueError("the audit needs internal validation rows (val_fraction > 0) as its real reference")
    centers = sorted(meta.loc[meta["case_id"].isin(ids["train"]), "center"].unique())
    size = cfg.image_size or _synthetic_size(dataset, run_ids)
    pipe_cfg = PipelineConfig(image_size=size, in_chans=1, augment=False, centers=tuple(centers), batch_size=64)
    synth = _subsample(load_synthetic_arrays(dataset, pipe_cfg, run_ids), cfg.max_per_set, cfg.seed)
    real_train = _subsample(load_arrays(dataset, ids["train"], pipe_cfg), cfg.max_per_set, cfg.seed + 1)
    real_val = _subsample(load_arrays(dataset, ids["val"], pipe_cfg), cfg.max_per_set, cfg.seed + 2)
    log.info("audit: %d synthetic, %d real training, %d real validation images at %dpx",
             len(synth["label"]), len(real_train["label"]), len(real_val["label"]), size)

    with tempfile.TemporaryDirectory(prefix="diffkd-audit-") as tmp:
        storage = cfg.storage_path or tmp
        encoder = train_audit_classifier(real_train, len(centers), cfg, storage, "real").eval()
        tstr_model = train_audit_classifier(synth, len(centers), cfg, storage, "synthetic").eval()

    f_train, p_train, _ = _encode(encoder, real_train["image"])
    f_val, p_val, c_val = _encode(encoder, real_val["image"])
    f_syn, p_syn, c_syn = _encode(encoder, synth["image"])
    _, p_tstr, _ = _encode(tstr_model, real_val["image"])

    # FID is biased by sample size: compare equally many synthetic and real-validation images.
    n = min(len(f_syn), len(f_val))
    rng = np.random.default_rng(cfg.seed)
    syn_n, val_n = f_syn[rng.choice(len(f_syn), n, replace=False)], f_val[rng.choice(len(f_val), n, replace=False)]
    kid_kw = dict(subset_size=cfg.kid_subset_size, subsets=cfg.kid_subsets, seed=cfg.seed)

    pairs = None
    if model_dir is not None and cfg.label_pairs:
        log.info("audit: generating %d label pairs", cfg.label_pairs)
        pairs = generate_label_pairs(dataset, model_dir, cfg)
        scored = {label: _encode(encoder, to_pipeline_range(images, pipe_cfg))[1]
                  for label, images in ((0, pairs.dcis), (1, pairs.upgrade))}

    copies = near_copies(real_train, real_val, synth, f_train, f_val, f_syn, pipe_cfg, cfg.near_copy_quantile)
    in_vocab = synth["center_idx"] < len(centers)
    summary = {
        "fid": frechet_distance(syn_n, f_train),
        "fid_real_reference": frechet_distance(val_n, f_train),
        "kid": kernel_distance(syn_n, f_train, **kid_kw),
        "kid_real_reference": kernel_distance(val_n, f_train, **kid_kw),
        **label_recovery(real_train["label"], p_train, synth["label"], p_syn, real_val["label"], p_val),
        "center_accuracy": float((c_syn[in_vocab] == synth["center_idx"][in_vocab]).mean()) if in_vocab.any()
        else float("nan"),
        "center_accuracy_real": float((c_val == real_val["center_idx"]).mean()),
        **(label_effect(scored[0], scored[1]) if pairs is not None else {}),
        "near_copies": copies["count"],
        "tstr_auc": auc_or_nan(real_val["label"], p_tstr),
        "trtr_auc": auc_or_nan(real_val["label"], p_val),
        "n_synthetic": int(len(synth["label"])),
        "n_real_train": int(len(real_train["label"])),
        "n_real_val": int(len(real_val["label"])),
        "image_size": int(size),
    }
    os.makedirs(out_dir, exist_ok=True)
    figures = {"grid": os.path.join(out_dir, "synthetic_grid.png"),
               "near_copies": os.path.join(out_dir, "synthetic_near_copies.png")}
    names = dataset.label_names
    plot_grid(real_train, synth, centers, pipe_cfg, cfg.grid_per_cell, figures["grid"], cfg.seed, names)
    plot_near_copies(copies, real_train, synth, pipe_cfg, cfg.closest_pairs, figures["near_copies"])
    if pairs is not None:
        figures["label_pairs"] = plot_label_pairs(pairs, scored, cfg.grid_per_cell,
                                                  os.path.join(out_dir, "synthetic_label_pairs.png"), names)
    details = {"summary": summary, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "runs": sorted(set(synth["source"])), "centers": centers, "figures": figures,
               "near_copies": {k: v for k, v in copies.items() if not isinstance(v, np.ndarray)},
               "explanation": AUDIT_EXPLANATION}
    atomic_write_json(os.path.join(out_dir, "synthetic_audit.json"), details)
    return summary


AUDIT_EXPLANATION = {
    "fid": "Fréchet distance between synthetic and real training images in the audit encoder's feature space "
           "(an encoder trained here on real images for label and center); fid_real_reference is the same "
           "distance for equally many real validation images: a synthetic set as real as real data scores near it.",
    "kid": "Kernel (MMD², cubic polynomial) distance in the same feature space; unbiased, so small sets compare "
           "fairly.",
    "conditional_accuracy": "balanced accuracy (mean recall of the two labels) with which the real-trained "
                            "classifier recovers the label each synthetic image was conditioned on, at the threshold "
                            "fixed by Youden's index on its real training images (label_threshold); "
                            "conditional_accuracy_real is the same on real validation images.",
    "conditional_auc": "AUC (DeLong 95% CI) of that classifier's score for the conditioned label on synthetic "
                       "images; compare with trtr_auc, the same on real validation images.",
    "label_effect": "the generator draws label_pairs conditions twice, as DCIS and as upgrade, with the same noise, "
                    "lesion mask, center and clinical values; label_effect is the mean rise of the real-trained "
                    "classifier's upgrade probability from the DCIS to the upgrade image (95% t interval), and "
                    "label_effect_positive_share the share of pairs where it rose. It isolates what the label "
                    "condition itself draws from what the mask and clinical values already carry.",
    "center_accuracy": "the same for the conditioned center.",
    "near_copies": "synthetic images whose nearest training image is closer, in pixel space and in feature space, "
                   "than the near_copy_quantile of real validation images' distances to their nearest training image.",
    "tstr_auc": "AUC on real validation images of a classifier trained on synthetic images only; trtr_auc is the "
                "real-trained classifier's AUC on the same images.",
}


def _synthetic_size(dataset: ImageDataset, run_ids: list[str] | None) -> int:
    meta = dataset.metadata(synthetic=True).select(["height", "width", "source"]).to_pandas()
    if run_ids:
        meta = meta[meta["source"].isin(run_ids)]
    if meta.empty:
        raise DatasetError(f"dataset {dataset.uri} has no synthetic rows{' of those runs' if run_ids else ''}; "
                           "run `diffkd synth run` first")
    return int(max(meta["height"].max(), meta["width"].max()))
