"""Distributed synthesis into the dataset's synthetic partition tree.

A condition table (center x label cells, conditions drawn from the generator's own training rows)
is sampled by a Ray Data actor pool — each actor loads the diffusers pipeline once — and the driver
writes finished rows in chunks with `ImageDataset.write_synthetic`. A synthesis run is identified by
the model's fingerprint and the table's spec, every row by its index in the table, so a rerun of the
same command writes only the rows that are not in the dataset yet.
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
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from diffkd.data.dataset import DatasetError, ImageDataset, conform
from diffkd.data.pipeline import PipelineConfig, load_arrays
from diffkd.data.schema import CLINICAL_COLUMNS, NUM_LABELS
from diffkd.data.splits import SplitConfig, fingerprint_of_digest, ids_digest, split_case_ids
from diffkd.models.diffusion import load_pipeline, model_fingerprint, to_uint8, training_info

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


def run_id_for(model_dir: str, cfg: SynthConfig) -> str:
    spec = json.dumps(cfg.table_spec(), sort_keys=True)
    return "syn-" + hashlib.sha256(f"{model_fingerprint(model_dir)}|{spec}".encode()).hexdigest()[:12]


def generator_splits(dataset: ImageDataset, model_dir: str) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """(real metadata, split case ids) exactly as the generator's training saw them.

    Splits are recomputed from the spec saved with the model (they are never stored); if the
    dataset changed since (a center added or re-ingested), the training rows' digest no longer
    matches and we say so, because "rows the generator never saw" may then be wrong.
    """
    info = training_info(model_dir)
    meta = dataset.metadata().to_pandas()
    ids = split_case_ids(meta, SplitConfig(**info["split"]))
    if ids_digest(ids["train"]) != info["train_case_ids_sha256"]:
        log.warning("the dataset's training split no longer matches the one that trained %s (%d rows then, %d now); "
                    "conditions and the audit use today's split", model_dir, info["train_rows"], len(ids["train"]))
    return meta, ids


def generator_training_rows(dataset: ImageDataset, model_dir: str) -> pd.DataFrame:
    """Metadata of the real rows that trained the generator."""
    meta, ids = generator_splits(dataset, model_dir)
    return meta[meta["case_id"].isin(ids["train"])].reset_index(drop=True)


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
        rng = np.random.default_rng(stable_seed(cfg.seed, center, label))
        drawn = cell.iloc[rng.integers(0, len(cell), size=count)]
        parts.append(drawn[["center", "label", "modality", *CLINICAL_COLUMNS, "case_id"]]
                     .rename(columns={"case_id": "condition_case_id"}))
    if not parts:
        raise ValueError("the condition table is empty: no center x label cell has training rows")
    table = pd.concat(parts, ignore_index=True)
    table["row"] = np.arange(len(table))
    table["case_id"] = [f"synthetic-{run_id}-{n:06d}" for n in table["row"]]
    table["patient_id"] = [_synthetic_patient_id(run_id, n) for n in table["row"]]
    table["row_seed"] = [stable_seed(cfg.seed, run_id, n) for n in table["row"]]
    return table


def stable_seed(*parts) -> int:
    """A 32-bit seed from any parts, the same in every process (unlike hash())."""
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _synthetic_patient_id(run_id: str, n: int) -> str:
    # Each synthetic image is its own "patient"; hashed like real ids so no code path can tell them
    # apart by format, prefixed so a person can.
    return "synthetic-" + hashlib.sha256(f"{run_id}:{n}".encode()).hexdigest()[:16]


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

        torch.set_num_threads(max(1, threads))
        diffusers_logging.disable_progress_bar()  # one bar per actor per load is noise in the job log
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = load_pipeline(model_dir, sampler=sampler, device=self.device)
        self.steps = num_inference_steps
        self.guidance = guidance_scale
        self.masks = masks or {}

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
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
    dataset = ImageDataset.open(dataset)
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
        masks = condition_masks(dataset, todo, model_dir) if _has_mask_channel(model_dir) else None
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


def condition_masks(dataset: ImageDataset, todo: pd.DataFrame, model_dir: str) -> dict[str, np.ndarray]:
    """Known lesion masks of the real rows whose conditions the table drew, at the model's size and
    placed exactly as the training pipeline placed them (mask-conditioned models only)."""
    wanted = set(todo["condition_case_id"])
    known = dataset.read_table(columns=["case_id", "mask"]).to_pandas()
    ids = sorted(known.loc[known["case_id"].isin(wanted) & known["mask"].notna(), "case_id"])
    if not ids:
        return {}
    with open(os.path.join(model_dir, "unet", "config.json")) as f:
        size = json.load(f)["sample_size"]
    arrays = load_arrays(dataset, ids, PipelineConfig(image_size=size, augment=False))
    return {cid: arrays["mask"][i, 0].astype(np.uint8) for i, cid in enumerate(ids)}
