"""Distributed synthesis into the dataset's synthetic partition tree, and the synthetic-data audit.

`synthesize`: a condition table (center x label cells, conditions drawn from the generator's own
training rows) is sampled by a Ray Data actor pool — each actor loads the diffusers pipeline once —
and the driver writes finished rows in chunks with `ImageDataset.write_synthetic`. A synthesis run
is identified by the model's fingerprint and the table's spec, every row by its index in the table,
so a rerun of the same command writes only the rows that are not in the dataset yet.

`audit` judges what was written: FID/KID in the feature space of an encoder trained here on real
images (no Inception weights exist offline), conditional accuracy, near copies of training images,
train-on-synthetic/test-on-real AUC, and image grids per center x label.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from diffkd.data.dataset import DatasetError, ImageDataset
from diffkd.data.schema import CLINICAL_COLUMNS, NUM_LABELS
from diffkd.files import atomic_write_json, save_figure
from diffkd.train.task import StepOutput, Task

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

MODES = ("balanced", "real")


@dataclass
class SynthConfig:
    """What to generate and how. Counts: `per_cell` rows for every center x label (mode "balanced"),
    or `total` rows split in proportion to the real center x label counts (mode "real"). Either way
    each row's modality and clinical values are those of a real training row of the same cell drawn
    with replacement, so the clinical joint distribution of the cell is kept."""

    mode: str = "balanced"
    per_cell: int = 32
    total: int | None = None  # mode "real" only
    centers: list[str] | None = None  # default: the centers the generator was trained on
    sampler: str | None = None  # "ddim" | "dpm"; None keeps the scheduler saved with the pipeline
    num_inference_steps: int = 25
    guidance_scale: float = 2.0
    batch_size: int = 8  # images per actor call
    num_actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    chunk_rows: int = 64  # rows per written part file: the granularity of resume
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"synth mode {self.mode!r} must be one of {', '.join(MODES)}")
        if self.mode == "real" and not self.total:
            raise ValueError("synth mode 'real' needs total (the number of rows to split across cells)")
        if self.mode == "balanced" and self.per_cell < 1:
            raise ValueError(f"synth per_cell must be at least 1 (got {self.per_cell})")
        for name in ("num_inference_steps", "batch_size", "num_actors", "chunk_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"synth {name} must be at least 1 (got {getattr(self, name)})")

    def table_spec(self) -> dict:
        """The fields that decide which rows exist (and so the run id); sampling knobs are excluded
        except those that change the images."""
        keys = ("mode", "per_cell", "total", "centers", "sampler", "num_inference_steps", "guidance_scale", "seed")
        return {k: getattr(self, k) for k in keys}


@dataclass
class SynthResult:
    run_id: str
    requested: int  # rows in the condition table
    existing: int  # rows of this run already in the dataset before this call
    written: int  # rows this call added
    seconds: float
    per_center: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


# ---- the generator's identity and training rows -----------------------------------------------
def model_fingerprint(model_dir: str) -> str:
    """sha256 over the pipeline's weight and config files: changes whenever the model does."""
    digest = hashlib.sha256()
    for sub in ("unet", "condition_encoder", "scheduler"):
        folder = os.path.join(model_dir, sub)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{model_dir} has no {sub}/ folder; is it a diffkd diffusion pipeline?")
        for name in sorted(os.listdir(folder)):
            digest.update(f"{sub}/{name}".encode())
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def run_id_for(model_dir: str, cfg: SynthConfig) -> str:
    spec = json.dumps(cfg.table_spec(), sort_keys=True)
    return "syn-" + hashlib.sha256(f"{model_fingerprint(model_dir)}|{spec}".encode()).hexdigest()[:12]


def training_info(model_dir: str) -> dict:
    from diffkd.train.diffusion_task import TRAINING_INFO

    path = os.path.join(model_dir, TRAINING_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the pipeline folder was not written by diffkd's diffusion "
                                "stage, so which rows trained it is unknown")
    with open(path) as f:
        return json.load(f)


def generator_splits(dataset: ImageDataset, model_dir: str) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """(real metadata, split case ids) exactly as the generator's training saw them.

    Splits are recomputed from the spec saved with the model (they are never stored); if the
    dataset changed since (a center added or re-ingested), the training rows' digest no longer
    matches and we say so, because "rows the generator never saw" may then be wrong.
    """
    from diffkd.train.diffusion_task import SplitSpec, ids_digest, split_case_ids

    info = training_info(model_dir)
    meta = dataset.metadata().to_pandas()
    ids = split_case_ids(meta, SplitSpec(**info["split"]))
    if ids_digest(ids["train"]) != info["train_case_ids_sha256"]:
        log.warning("the dataset's training split no longer matches the one that trained %s (%d rows then, %d now); "
                    "conditions and the audit use today's split", model_dir, info["train_rows"], len(ids["train"]))
    return meta, ids


def generator_training_rows(dataset: ImageDataset, model_dir: str) -> pd.DataFrame:
    """Metadata of the real rows that trained the generator."""
    meta, ids = generator_splits(dataset, model_dir)
    return meta[meta["case_id"].isin(ids["train"])].reset_index(drop=True)


# ---- condition tables ------------------------------------------------------------------------
def cell_counts(train_rows: pd.DataFrame, cfg: SynthConfig, centers: list[str]) -> dict[tuple[str, int], int]:
    """Rows to generate per (center, label) cell that has real training rows to draw conditions from."""
    real = train_rows[train_rows["center"].isin(centers)].groupby(["center", "label"]).size()
    cells = {(c, int(lbl)): int(n) for (c, lbl), n in real.items()}
    empty = [(c, lbl) for c in centers for lbl in range(NUM_LABELS) if (c, lbl) not in cells]
    if empty:
        log.warning("no training rows for %s: those cells get no synthetic rows",
                    ", ".join(f"{c}/label {lbl}" for c, lbl in empty))
    if cfg.mode == "balanced":
        return {cell: cfg.per_cell for cell in sorted(cells)}
    total_real = sum(cells.values())
    # Largest-remainder apportionment: counts sum exactly to `total` and follow the real proportions.
    exact = {cell: cfg.total * n / total_real for cell, n in cells.items()}
    counts = {cell: int(np.floor(v)) for cell, v in exact.items()}
    for cell in sorted(exact, key=lambda c: exact[c] - counts[c], reverse=True)[: cfg.total - sum(counts.values())]:
        counts[cell] += 1
    return {cell: counts[cell] for cell in sorted(counts) if counts[cell] > 0}


def condition_table(train_rows: pd.DataFrame, cfg: SynthConfig, run_id: str,
                    centers: list[str] | None = None) -> pd.DataFrame:
    """One row per image to generate: conditions, the row's case_id and its own noise seed.

    Deterministic in (train_rows, cfg, run_id): a rerun rebuilds the same table, which is what
    lets it skip rows already written.
    """
    centers = centers or cfg.centers or sorted(train_rows["center"].unique())
    unknown = sorted(set(centers) - set(train_rows["center"]))
    if unknown:
        raise ValueError(f"center(s) {', '.join(unknown)} have no rows the generator was trained on; "
                         f"choose from {', '.join(sorted(train_rows['center'].unique()))}")
    parts = []
    for (center, label), count in cell_counts(train_rows, cfg, centers).items():
        cell = train_rows[(train_rows["center"] == center) & (train_rows["label"] == label)]
        cell = cell.sort_values("case_id")  # independent of the order rows were read in
        rng = np.random.default_rng(_stable_seed(cfg.seed, center, label))
        drawn = cell.iloc[rng.integers(0, len(cell), size=count)]
        parts.append(drawn[["center", "label", "modality", *CLINICAL_COLUMNS, "case_id"]]
                     .rename(columns={"case_id": "condition_case_id"}))
    if not parts:
        raise ValueError("the condition table is empty: no center x label cell has training rows")
    table = pd.concat(parts, ignore_index=True)
    table["row"] = np.arange(len(table))
    table["case_id"] = [f"synthetic-{run_id}-{n:06d}" for n in table["row"]]
    table["patient_id"] = [_synthetic_patient_id(run_id, n) for n in table["row"]]
    table["row_seed"] = [_stable_seed(cfg.seed, run_id, n) for n in table["row"]]
    return table


def _stable_seed(*parts) -> int:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _synthetic_patient_id(run_id: str, n: int) -> str:
    # Each synthetic image is its own "patient"; hashed like real ids so no code path can tell them
    # apart by format, prefixed so a person can.
    return "synthetic-" + hashlib.sha256(f"{run_id}:{n}".encode()).hexdigest()[:16]


# ---- sampling --------------------------------------------------------------------------------
def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class ImageSampler:
    """Ray Data actor: loads the pipeline once, then turns condition batches into finished rows."""

    def __init__(self, model_dir: str, sampler: str | None, num_inference_steps: int, guidance_scale: float,
                 masks: dict[str, np.ndarray] | None = None, threads: int = 1):
        from diffusers.utils import logging as diffusers_logging

        from diffkd.models.diffusion import load_pipeline

        torch.set_num_threads(max(1, threads))
        diffusers_logging.disable_progress_bar()  # one bar per actor per load is noise in the job log
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(model_dir, sampler=sampler, device=self.device)
        self.steps = num_inference_steps
        self.guidance = guidance_scale
        self.masks = masks or {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from diffkd.models.diffusion import to_uint8

        rows = batch.to_dict("records")
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in batch["row_seed"]]
        masks = None
        if self.pipe.mask_channel:
            size = self.pipe.unet.config.sample_size
            arrays = [self.masks.get(cid, np.zeros((size, size), np.uint8)) for cid in batch["condition_case_id"]]
            masks = torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32))
        images = to_uint8(self.pipe(rows, masks=masks, num_inference_steps=self.steps,
                                    guidance_scale=self.guidance, generator=generators).images)
        out = batch.copy()
        out["image"] = [encode_png(im) for im in images]
        out["sha256"] = [hashlib.sha256(b).hexdigest() for b in out["image"]]
        out["height"] = images.shape[1]
        out["width"] = images.shape[2]
        # The mask the image was generated from is its lesion mask (mask-conditioned models only).
        out["mask"] = [encode_png(self.masks[cid] * 255) if cid in self.masks else None
                       for cid in batch["condition_case_id"]]
        return out


def existing_case_ids(dataset: ImageDataset, run_id: str) -> set[str]:
    if not dataset.centers(synthetic=True):
        return set()
    meta = dataset.metadata(synthetic=True).select(["case_id", "source"]).to_pandas()
    return set(meta.loc[meta["source"] == run_id, "case_id"])


def _other_runs(dataset: ImageDataset, run_id: str) -> dict[str, int]:
    if not dataset.centers(synthetic=True):
        return {}
    sources = dataset.metadata(synthetic=True).column("source").to_pandas()
    return {str(k): int(v) for k, v in sources[sources != run_id].value_counts().sort_index().items()}


def to_rows(batch: pd.DataFrame, run_id: str) -> pa.Table:
    """Finished sampler output -> rows in the dataset schema."""
    from diffkd.data.dataset import conform

    out = batch.drop(columns=["row", "row_seed", "condition_case_id"])
    out["spacing_mm"] = None  # generated at the model's size: no physical pixel spacing
    out["synthetic"] = True
    out["source"] = run_id
    table = pa.Table.from_pandas(out, preserve_index=False)
    return conform(table)


def synthesize(dataset: ImageDataset | str, model_dir: str, cfg: SynthConfig | None = None,
               progress: Callable[[int, int], None] | None = None, replace: bool = False) -> SynthResult:
    """Generate the rows of `cfg`'s condition table that the dataset lacks, and write them.

    Uses the Ray instance this process is connected to (callers start or join one). `progress`
    is called as (rows written so far in this run, rows requested) after every written chunk.
    Training mixes every synthetic row of the dataset, so rows of other runs (an older model,
    other settings) are reported; `replace=True` deletes them first.
    """
    cfg = cfg or SynthConfig()
    dataset = dataset if isinstance(dataset, ImageDataset) else ImageDataset(dataset)
    if not dataset.exists():
        raise DatasetError(f"dataset {dataset.uri} does not exist (no _manifest.json); run `diffkd ingest` first")
    model_dir = os.fspath(model_dir)
    train_rows = generator_training_rows(dataset, model_dir)
    run_id = run_id_for(model_dir, cfg)
    provenance = generator_provenance(model_dir, run_id)
    table = condition_table(train_rows, cfg, run_id)
    others = _other_runs(dataset, run_id)
    if others and replace:
        log.info("synth: deleting %d synthetic rows of other runs (%s)", sum(others.values()), ", ".join(others))
        dataset.delete_synthetic()
    elif others:
        log.warning("the dataset also holds %d synthetic rows of other runs (%s); training mixes all of them "
                    "(rerun with --replace to keep only this run's rows)", sum(others.values()), ", ".join(others))
    done = existing_case_ids(dataset, run_id)
    todo = table[~table["case_id"].isin(done)]
    log.info("synth %s: %d rows requested, %d already written, %d to generate with %d actor(s)",
             run_id, len(table), len(done & set(table["case_id"])), len(todo), cfg.num_actors)
    start = time.perf_counter()
    written: dict[str, int] = {}
    if len(todo):
        masks = _condition_masks(dataset, todo, model_dir) if _has_mask_channel(model_dir) else None
        pending: dict[str, list[pd.DataFrame]] = {}
        for batch in sample_stream(todo, model_dir, cfg, masks).iter_batches(batch_size=None, batch_format="pandas"):
            for center, rows in batch.groupby("center"):
                pending.setdefault(center, []).append(rows)
                if sum(map(len, pending[center])) >= cfg.chunk_rows:
                    chunk = pending.pop(center)
                    written[center] = written.get(center, 0) + _flush(dataset, center, chunk, run_id, provenance)
                    _report(progress, len(done) + sum(written.values()), len(table), start, run_id)
        for center in sorted(pending):
            written[center] = written.get(center, 0) + _flush(dataset, center, pending[center], run_id, provenance)
            _report(progress, len(done) + sum(written.values()), len(table), start, run_id)
    return SynthResult(run_id=run_id, requested=len(table), existing=len(table) - len(todo),
                       written=sum(written.values()), seconds=time.perf_counter() - start, per_center=written)


def sample_stream(table: pd.DataFrame, model_dir: str, cfg: SynthConfig,
                  masks: dict[str, np.ndarray] | None = None) -> "ray.data.Dataset":
    """The condition table as a Ray dataset of finished rows, sampled by an actor pool of
    `cfg.num_actors` (each loads the pipeline once). One block per batch, so every actor has work, and
    one batch in flight per actor: with Ray's default of two, one actor could hold the last batches
    queued while another sat idle."""
    import ray.data
    from ray.data import ActorPoolStrategy

    blocks = [table.iloc[i:i + cfg.batch_size] for i in range(0, len(table), cfg.batch_size)]
    return ray.data.from_pandas(blocks).map_batches(
        ImageSampler, compute=ActorPoolStrategy(size=cfg.num_actors, max_tasks_in_flight_per_actor=1),
        batch_size=cfg.batch_size,
        batch_format="pandas", num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None,
        fn_constructor_kwargs=dict(model_dir=model_dir, sampler=cfg.sampler,
                                   num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                                   masks=masks, threads=max(1, int(cfg.cpus_per_actor))))


def generator_provenance(model_dir: str, run_id: str) -> dict:
    """What the dataset records with a synthesis run: its source id and the split that trained the generator."""
    from diffkd.data.splits import fingerprint_of_digest

    info = training_info(model_dir)
    return {"source": run_id, "split": info["split"],
            "split_fingerprint": fingerprint_of_digest(info["train_case_ids_sha256"])}


def _flush(dataset: ImageDataset, center: str, parts: list[pd.DataFrame], run_id: str, generator: dict) -> int:
    rows = pd.concat(parts, ignore_index=True).sort_values("row")
    dataset.write_synthetic(center, to_rows(rows, run_id), run_id=f"{run_id}-{uuid.uuid4().hex[:8]}",
                            generator=generator)
    return len(rows)


def _report(progress, done: int, total: int, start: float, run_id: str) -> None:
    log.info("synth %s: %d/%d rows (%.2f s elapsed)", run_id, done, total, time.perf_counter() - start)
    if progress is not None:
        progress(done, total)


def _has_mask_channel(model_dir: str) -> bool:
    with open(os.path.join(model_dir, "unet", "config.json")) as f:
        config = json.load(f)
    return config["in_channels"] > config["out_channels"]


def _condition_masks(dataset: ImageDataset, todo: pd.DataFrame, model_dir: str) -> dict[str, np.ndarray]:
    """Known lesion masks of the real rows whose conditions the table drew, at the model's size and
    placed exactly as the training pipeline placed them (mask-conditioned models only)."""
    from diffkd.data.pipeline import PipelineConfig, load_arrays

    wanted = set(todo["condition_case_id"])
    known = dataset.read_table(columns=["case_id", "mask"]).to_pandas()
    ids = sorted(known.loc[known["case_id"].isin(wanted) & known["mask"].notna(), "case_id"])
    if not ids:
        return {}
    with open(os.path.join(model_dir, "unet", "config.json")) as f:
        size = json.load(f)["sample_size"]
    arrays = load_arrays(dataset, ids, PipelineConfig(image_size=size, augment=False))
    return {cid: arrays["mask"][i, 0].astype(np.uint8) for i, cid in enumerate(ids)}


# ---- the audit -------------------------------------------------------------------------------
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
    import dataclasses

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


# ---- audit data ------------------------------------------------------------------------------
def load_synthetic_arrays(dataset: ImageDataset, cfg, run_ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """Decode synthetic rows (optionally of some runs only) like the pipeline decodes real ones."""
    from diffkd.data.pipeline import READ_COLUMNS, decode_batch

    if not dataset.centers(synthetic=True):
        raise DatasetError(f"dataset {dataset.uri} has no synthetic rows; run `diffkd synth` first")
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
    from diffkd.train.loop import LoopConfig, fit

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


# ---- audit measures --------------------------------------------------------------------------
def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula)."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # A tiny ridge keeps the product's square root defined when a set has fewer images than features.
    ridge = 1e-6 * np.eye(a.shape[1])
    covmean = np.real(linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge)))
    return max(0.0, float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean)))


def kernel_distance(a: np.ndarray, b: np.ndarray, subset_size: int = 100, subsets: int = 50, seed: int = 0) -> float:
    """KID: unbiased MMD² with the cubic polynomial kernel, averaged over random subsets."""
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = ~np.eye(m, dtype=bool)
        values.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return float(np.mean(values))


def nearest(query: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance to, and index of, each query row's nearest reference row."""
    ref = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
    dists, idx = [], []
    for start in range(0, len(query), chunk):
        q = torch.from_numpy(np.ascontiguousarray(query[start:start + chunk], dtype=np.float32))
        d = torch.cdist(q, ref, compute_mode="donot_use_mm_for_euclid_dist")  # exact: a copy must measure 0
        best = d.min(dim=1)
        dists.append(best.values.numpy())
        idx.append(best.indices.numpy())
    return np.concatenate(dists), np.concatenate(idx)


def pixel_vectors(unit_images: np.ndarray, side: int = 32) -> np.ndarray:
    """[N, 1, H, W] in [0, 1] -> per-image standardised pixels at <= `side` px, scaled to RMS units.

    Standardising removes overall gain, so a copy with a different brightness still counts as a copy.
    """
    x = torch.from_numpy(unit_images)
    if x.shape[-1] > side:
        x = F.adaptive_avg_pool2d(x, side)
    x = x.flatten(1)
    x = (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)
    return (x / np.sqrt(x.shape[1])).numpy()


def _unit(normalised: np.ndarray, pipe_cfg) -> np.ndarray:
    return np.clip(normalised * pipe_cfg.norm_std + pipe_cfg.norm_mean, 0.0, 1.0).astype(np.float32)


def _normalised(unit_images: np.ndarray, pipe_cfg) -> np.ndarray:
    """[N, 1, h, w] in [0, 1] -> the audit's size and the pipeline's normalisation (the inverse of `_unit`)."""
    x = torch.from_numpy(np.ascontiguousarray(unit_images, dtype=np.float32))
    if x.shape[-1] != pipe_cfg.image_size:
        x = F.interpolate(x, size=(pipe_cfg.image_size,) * 2, mode="bilinear", align_corners=False)
    return ((x - pipe_cfg.norm_mean) / pipe_cfg.norm_std).numpy()


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, probs)) if len(np.unique(labels)) == 2 else float("nan")


def label_recovery(train_labels: np.ndarray, train_probs: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                   real_labels: np.ndarray, real_probs: np.ndarray) -> dict[str, Any]:
    """How well a real-trained label classifier recovers the conditioned labels, beside real images.

    Balanced accuracy, not plain accuracy: synthetic sets are often label-balanced while the real ones
    are not, and a classifier that calls every case DCIS would otherwise score the real prevalence on
    real images and 0.5 on a balanced synthetic set whatever the images show. The threshold is fixed
    once, by Youden's index on the classifier's real training images, and applied to both sets.
    """
    from diffkd.evaluate.metrics import ThresholdRule, auc_delong_ci

    def balanced_accuracy(y: np.ndarray, p: np.ndarray) -> float:
        called = p >= threshold
        return float(np.mean([(called[y == k] == bool(k)).mean() for k in (0, 1) if (y == k).any()]))

    threshold = (ThresholdRule("youden").fit(train_labels, train_probs) if len(np.unique(train_labels)) == 2
                 else 0.5)
    out: dict[str, Any] = {"conditional_accuracy": balanced_accuracy(labels, probs),
                           "conditional_accuracy_real": balanced_accuracy(real_labels, real_probs),
                           "conditional_auc": float("nan"), "conditional_auc_ci": [float("nan")] * 2,
                           "label_threshold": threshold}
    if len(np.unique(labels)) == 2:
        estimate = auc_delong_ci(labels, probs)
        out["conditional_auc"], out["conditional_auc_ci"] = estimate.auc, list(estimate.ci)
    return out


@dataclass
class LabelPairs:
    """Images generated from the same conditions, mask and noise, once per label."""

    rows: pd.DataFrame  # the real training rows whose conditions were drawn
    dcis: np.ndarray  # [N, 1, H, W] in [0, 1]
    upgrade: np.ndarray
    masks: np.ndarray  # [N, H, W] the lesion mask both images were conditioned on (zeros: none)


def generate_label_pairs(dataset: ImageDataset, model_dir: str, cfg: AuditConfig) -> LabelPairs:
    """Draw `cfg.label_pairs` training rows (spread over centers and labels) and generate each twice."""
    from diffkd.models.diffusion import load_pipeline

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
        known = _condition_masks(dataset, drawn.rename(columns={"case_id": "condition_case_id"}), model_dir)
        for i, cid in enumerate(drawn["case_id"]):
            masks[i] = known.get(cid, masks[i])
    mask_tensor = torch.from_numpy(masks[:, None].astype(np.float32)) if pipe.mask_channel else None
    records = drawn.to_dict("records")
    images = {}
    for label in (0, 1):
        generators = [torch.Generator().manual_seed(_stable_seed(cfg.seed, "pair", i)) for i in range(len(records))]
        out = pipe([{**r, "label": label} for r in records], masks=mask_tensor, num_inference_steps=cfg.pair_steps,
                   guidance_scale=cfg.pair_guidance, generator=generators, output_type="pt")
        images[label] = out.images.float().numpy()
    return LabelPairs(drawn, images[0], images[1], masks)


def label_effect(p_dcis: np.ndarray, p_upgrade: np.ndarray) -> dict[str, Any]:
    """Paired difference of the classifier's upgrade probability (upgrade-conditioned minus DCIS-conditioned
    image of the same pair): mean with a 95% t interval, and the share of pairs where it is positive."""
    from diffkd.evaluate.metrics import mean_t_ci

    diff = np.asarray(p_upgrade, float) - np.asarray(p_dcis, float)
    mean, ci = mean_t_ci(diff)
    return {"label_effect": mean, "label_effect_ci": list(ci),
            "label_effect_positive_share": float((diff > 0).mean()) if len(diff) else float("nan"),
            "label_pairs": len(diff)}


def audit(dataset: ImageDataset | str, out_dir: str, model_dir: str | None = None, split=None,
          run_ids: list[str] | None = None, cfg: AuditConfig | None = None) -> dict:
    """Judge the synthetic rows against the real ones; write JSON + PNGs to `out_dir`.

    Real reference sets come from the generator's split (`model_dir`'s saved spec, or `split`):
    "train" = the rows the generator learnt from (where near copies would come from), "val" =
    internal rows it never saw (the real-vs-real reference for every measure, and the TSTR test set).
    Returns the flat dict that goes into metrics.json as `"synthetic"`.
    """
    import tempfile

    from diffkd.data.pipeline import PipelineConfig, load_arrays
    from diffkd.train.diffusion_task import SplitSpec, split_case_ids

    cfg = cfg or AuditConfig()
    dataset = dataset if isinstance(dataset, ImageDataset) else ImageDataset(dataset)
    if model_dir is not None:
        meta, ids = generator_splits(dataset, model_dir)
    else:
        meta = dataset.metadata().to_pandas()
        ids = split_case_ids(meta, split or SplitSpec())
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
        scored = {label: _encode(encoder, _normalised(images, pipe_cfg))[1]
                  for label, images in ((0, pairs.dcis), (1, pairs.upgrade))}

    copies = _near_copies(real_train, real_val, synth, f_train, f_val, f_syn, pipe_cfg, cfg)
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
        "tstr_auc": _auc(real_val["label"], p_tstr),
        "trtr_auc": _auc(real_val["label"], p_val),
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
                           "run `diffkd synth` first")
    return int(max(meta["height"].max(), meta["width"].max()))


def _near_copies(real_train, real_val, synth, f_train, f_val, f_syn, pipe_cfg, cfg: AuditConfig) -> dict:
    """Nearest training image of every synthetic one, in pixel and feature space, against thresholds
    calibrated on how close real validation images come to real training images."""
    pix_train = pixel_vectors(_unit(real_train["image"], pipe_cfg))
    pix_val = pixel_vectors(_unit(real_val["image"], pipe_cfg))
    pix_syn = pixel_vectors(_unit(synth["image"], pipe_cfg))
    unit = lambda f: f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-8)  # noqa: E731 (cosine geometry)
    val_pix, _ = nearest(pix_val, pix_train)
    val_feat, _ = nearest(unit(f_val), unit(f_train))
    syn_pix, syn_pix_idx = nearest(pix_syn, pix_train)
    syn_feat, _ = nearest(unit(f_syn), unit(f_train))
    pix_threshold = float(np.quantile(val_pix, cfg.near_copy_quantile))
    feat_threshold = float(np.quantile(val_feat, cfg.near_copy_quantile))
    flagged = (syn_pix <= pix_threshold) & (syn_feat <= feat_threshold)
    return {
        "count": int(flagged.sum()),
        "count_pixel_only": int((syn_pix <= pix_threshold).sum()),
        "count_feature_only": int((syn_feat <= feat_threshold).sum()),
        "pixel_threshold": pix_threshold, "feature_threshold": feat_threshold,
        "quantile": cfg.near_copy_quantile,
        "flagged_case_ids": [str(c) for c in synth["case_id"][flagged]],
        "synthetic_median_pixel_distance": float(np.median(syn_pix)),
        "real_median_pixel_distance": float(np.median(val_pix)),
        "synthetic_pixel": syn_pix, "synthetic_pixel_index": syn_pix_idx, "real_pixel": val_pix,
        "flagged": flagged,
    }


# ---- audit figures ---------------------------------------------------------------------------
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(real: dict, synth: dict, centers: list[str], pipe_cfg, per_cell: int, path: str, seed: int,
              label_names: tuple[str, str]) -> str:
    """One row per center x label: real training images on the left, synthetic ones on the right (with the
    outline of the lesion mask each was conditioned on, for a mask-conditioned generator)."""
    plt = _figure()
    cells = [(ci, c, lbl) for ci, c in enumerate(centers) for lbl in range(len(label_names))]
    fig, axes = plt.subplots(len(cells), 2 * per_cell, figsize=(2 * per_cell * 0.9, len(cells) * 1.0 + 0.6),
                             squeeze=False)
    rng = np.random.default_rng(seed)
    outlined = bool(synth["mask"].any())  # a mask-conditioned generator
    for row, (ci, center, label) in enumerate(cells):
        for half, arrays in enumerate((real, synth)):
            pick = np.flatnonzero((arrays["center_idx"] == ci) & (arrays["label"] == label))
            pick = rng.choice(pick, min(per_cell, len(pick)), replace=False) if len(pick) else pick
            for k in range(per_cell):
                ax = axes[row, half * per_cell + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(pick):
                    ax.imshow(_unit(arrays["image"][pick[k]], pipe_cfg)[0], cmap="gray", vmin=0, vmax=1)
                    if half and outlined:  # where the generator was told the lesion is
                        ax.contour(arrays["mask"][pick[k], 0], levels=[0.5], colors="tab:red", linewidths=0.5)
                else:
                    ax.axis("off")  # fewer images than columns in this cell
        axes[row, 0].set_ylabel(f"{center}\n{label_names[label]}", rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_title("real (training)", loc="left", fontsize=9)
    axes[0, per_cell].set_title("synthetic (red: the lesion mask it was conditioned on)" if outlined else "synthetic",
                                loc="left", fontsize=9)
    fig.suptitle("Real vs synthetic images per center x label", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_label_pairs(pairs: LabelPairs, scored: dict[int, np.ndarray], per_cell: int, path: str,
                     label_names: tuple[str, str]) -> str:
    """Two rows per center (label 0 above, label 1 below, same noise and mask), the classifier's
    probability of label 1 over each image."""
    plt = _figure()
    centers = sorted(pairs.rows["center"].unique())
    fig, axes = plt.subplots(2 * len(centers), per_cell, figsize=(per_cell * 1.1, 2 * len(centers) * 1.1 + 0.6),
                             squeeze=False)
    for ci, center in enumerate(centers):
        shown = np.flatnonzero(pairs.rows["center"].to_numpy() == center)[:per_cell]
        for k in range(per_cell):
            for label, images in ((0, pairs.dcis), (1, pairs.upgrade)):
                ax = axes[2 * ci + label, k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k >= len(shown):
                    ax.axis("off")
                    continue
                i = shown[k]
                ax.imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
                if pairs.masks[i].any():
                    ax.contour(pairs.masks[i], levels=[0.5], colors="tab:red", linewidths=0.5)
                ax.set_title(f"p={scored[label][i]:.2f}", fontsize=7)
            for label, name in enumerate(label_names):
                axes[2 * ci + label, 0].set_ylabel(f"{center}\n{name}", rotation=0, ha="right", va="center",
                                                   fontsize=8)
    fig.suptitle("The same noise, mask and clinical values, conditioned on each label\n"
                 f"(p: the real-trained classifier's probability of {label_names[1]})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_near_copies(copies: dict, real: dict, synth: dict, pipe_cfg, pairs: int, path: str) -> str:
    """Distance histograms (synthetic->train vs real->train) and the closest synthetic/training pairs."""
    plt = _figure()
    order = np.argsort(copies["synthetic_pixel"])[:pairs]
    fig = plt.figure(figsize=(max(8, 1.3 * len(order)), 5.2))
    grid = fig.add_gridspec(3, max(1, len(order)), height_ratios=[1.6, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    bins = np.linspace(0, max(copies["synthetic_pixel"].max(), copies["real_pixel"].max()) * 1.05, 40)
    ax.hist(copies["real_pixel"], bins=bins, alpha=0.6, density=True, label="real validation -> nearest training")
    ax.hist(copies["synthetic_pixel"], bins=bins, alpha=0.6, density=True, label="synthetic -> nearest training")
    ax.axvline(copies["pixel_threshold"], color="k", ls="--", lw=1,
               label=f"near-copy threshold ({copies['quantile']:.0%} of real)")
    ax.set_xlabel("pixel-space distance to the nearest training image (RMS of standardised pixels)")
    ax.legend(fontsize=7)
    ax.set_title(f"near copies: {copies['count']} of {len(copies['synthetic_pixel'])} synthetic images", fontsize=9)
    for k, i in enumerate(order):
        top, bottom = fig.add_subplot(grid[1, k]), fig.add_subplot(grid[2, k])
        top.imshow(_unit(synth["image"][i], pipe_cfg)[0], cmap="gray", vmin=0, vmax=1)
        bottom.imshow(_unit(real["image"][copies["synthetic_pixel_index"][i]], pipe_cfg)[0], cmap="gray",
                      vmin=0, vmax=1)
        mark = " COPY" if copies["flagged"][i] else ""
        top.set_title(f"d={copies['synthetic_pixel'][i]:.3f}{mark}", fontsize=7, color="red" if mark else "black")
        for a in (top, bottom):
            a.set_xticks([])
            a.set_yticks([])
        if k == 0:
            top.set_ylabel("synthetic", fontsize=8)
            bottom.set_ylabel("nearest\ntraining", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
