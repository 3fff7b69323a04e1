"""The Ray Data pipeline: Parquet rows of the dataset -> model-ready batches streamed to Ray Train workers.

    read_parquet(files of the chosen centers, per-epoch file order)   \
      .filter(case_id in split, modality in cfg.modalities)             > fused, one task per decode slot
      .map_batches(decode_batch)                                        /  (files grouped); the filter is
                                                                           pushed into the Parquet scan
      .mix(the same over synthetic files, a fresh random subset each epoch)   training only, cfg.synthetic_ratio
    -> ray.train.get_dataset_shard("train") -> iter_shard_batches()     local shuffle buffer, torch tensors

A streamed dataset is never materialised (small ones are decoded once and cached, see
`cache_decision`; within a search, an ablation or `diffkd run` the decoded images are shared by all
their runs, see `diffkd.data.source_cache`): every epoch re-runs the plan and streams blocks through the object store under
Ray Data's backpressure, so memory stays flat as the dataset grows (bench/data_feed.py
measures it). Nothing here is fitted to data: normalisation is a fixed rule and the clinical encoding
uses fixed reference scales, so external centers are treated exactly like internal ones.

Resource sizing (why it cannot deadlock next to Train workers on a 2-core machine): reading and
decoding run fused, the files grouped into one task per slot, each asking for `decode_num_cpus` (0.5)
logical CPU, at most `decode_concurrency` (2) in flight per branch. So the data side claims at most
1 CPU (2 with synthetic rows) and makes progress with `required_cpus(cfg)` = 0.5 left over by the
Train workers (tested: one Train worker holding all the other CPUs still gets its epochs). Files are
listed on the driver (see `_read_settings`), so no 1-CPU listing task has to fit either. Ray
Train V2 excludes its workers' resources from Ray Data's budget by itself; `check_can_feed` fails
early, with the numbers, where a sizing would hang instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import sys
import threading
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from diffkd.data.augment import AugmentConfig, AugmentParams, apply_intensity, draw_params, place
from diffkd.data.dataset import PARTITION_KEY, DatasetError, ImageDataset
from diffkd.data.schema import CLINICAL_COLUMNS, MODALITIES, ClinicalEncoding
from diffkd.data.source_cache import file_keys, record_decodes, shared_cache_open, shared_sources
from diffkd.runtime.raycompat import refresh_data_limits_until_known

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

log = logging.getLogger(__name__)

# A process that executes these datasets imports this module before it schedules them (the plan refers
# to its functions), Ray Train's split coordinator included; Ray Data is loaded there already.
if "ray.data" in sys.modules:
    refresh_data_limits_until_known()

# What decode needs from a row; identifiers, hashes and provenance stay on disk.
READ_COLUMNS = ("case_id", "center", "modality", "label", "synthetic", "source", "image", "mask", *CLINICAL_COLUMNS)
STRING_KEYS = ("case_id",)  # batch keys that stay Python strings through collation
CACHE_MODES = ("auto", "always", "never")


@dataclass
class PipelineConfig:
    image_size: int = 224  # square model input side, pixels
    in_chans: int = 1  # 1 = gray; 3 repeats the gray channel (for backbones that insist on RGB)
    keep_aspect: bool = True  # letterbox (black bars, image centred) instead of stretching
    augment: bool = True  # training augmentation on the train split (never on val/test)
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic_ratio: float = 0.0  # synthetic rows per real row in each training epoch (0 = real only)
    # generator runs (the `source` of synthetic rows) that may be mixed in; empty = every run in the dataset
    synthetic_sources: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()  # keep only these modalities; empty = all
    centers: tuple[str, ...] = ()  # center vocabulary for center_idx; empty = the dataset's real centers
    batch_size: int = 32  # the training batch; Ray blocks hold one batch of decoded rows (see block_bytes)
    seed: int = 0
    shuffle_buffer: int = 256  # rows in the local shuffle buffer when iterating the train split
    norm_mean: float = 0.449  # fixed normalisation of [0, 1] intensities: the ImageNet gray mean/std
    norm_std: float = 0.226
    decode_num_cpus: float = 0.5  # logical CPUs per read+decode task (one fused task per file)
    decode_concurrency: int = 2  # such tasks in flight per branch (real, synthetic); also bounds Ray's worker processes
    # Small sets are decoded once and kept in Ray's object store (augmentation still runs every epoch);
    # bigger ones stream. auto: cache when the decoded rows fit the budget | always | never
    cache: str = "auto"
    cache_budget_mb: float = 0.0  # decoded bytes a cached set may hold; 0 = cache_fraction of the object store
    cache_fraction: float = 0.25

    def __post_init__(self) -> None:
        self.modalities = tuple(self.modalities)
        self.synthetic_sources = tuple(self.synthetic_sources)
        self.centers = tuple(self.centers)
        if isinstance(self.augmentation, dict):
            self.augmentation = AugmentConfig(**self.augmentation)
        if self.image_size < 8:
            raise ValueError(f"pipeline: image_size must be at least 8 pixels, got {self.image_size}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"pipeline: in_chans must be 1 or 3, got {self.in_chans}")
        if self.synthetic_ratio < 0:
            raise ValueError(f"pipeline: synthetic_ratio must be >= 0, got {self.synthetic_ratio}")
        if min(self.batch_size, self.decode_concurrency) < 1 or self.norm_std <= 0 or self.decode_num_cpus < 0:
            raise ValueError("pipeline: batch_size and decode_concurrency must be >= 1, norm_std > 0, decode_num_cpus >= 0")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"pipeline: cache must be one of {', '.join(CACHE_MODES)}, got {self.cache!r}")
        if self.cache_budget_mb < 0 or not 0 <= self.cache_fraction <= 1:
            raise ValueError("pipeline: cache_budget_mb must be >= 0 and cache_fraction within [0, 1]")
        unknown = sorted(set(self.modalities) - set(MODALITIES))
        if unknown:
            raise ValueError(f"pipeline: unknown modalities {unknown}; known: {', '.join(MODALITIES)}")

    @property
    def num_center_slots(self) -> int:
        """Size of a center embedding: one per vocabulary center plus the shared 'unknown center' slot."""
        return len(self.centers) + 1

    @property
    def num_modality_slots(self) -> int:
        return len(MODALITIES) + 1


def with_center_vocabulary(cfg: PipelineConfig, dataset: ImageDataset) -> PipelineConfig:
    """`cfg` with its center vocabulary filled from the dataset's sorted real centers when it is empty."""
    if cfg.centers:
        return cfg
    return dataclasses.replace(cfg, centers=tuple(dataset.centers()))


def required_cpus(cfg: PipelineConfig) -> float:
    """Logical CPUs Ray Data needs free beside the Train workers: one read+decode task."""
    return cfg.decode_num_cpus


def check_can_feed(cfg: PipelineConfig, train_cpus: float) -> None:
    """Fail with the numbers when Train workers taking `train_cpus` would starve the pipeline (a silent hang)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    if total - train_cpus < required_cpus(cfg) - 1e-9:
        raise RuntimeError(
            f"the Ray cluster has {total:g} CPUs; Train workers take {train_cpus:g}, leaving "
            f"{total - train_cpus:g}, but the data pipeline needs {required_cpus(cfg):g} (decode_num_cpus) "
            "or it would hang. "
            "Give the workers fewer CPUs (resources_per_worker), or start Ray with more logical CPUs.")


# ---- decoding -------------------------------------------------------------------------------------

def _open_gray(data: bytes, what: str) -> tuple[Image.Image, float]:
    """PNG bytes -> (gray image Pillow can resample, its full-scale value)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as err:  # Pillow raises several types for corrupt or truncated data
        raise ValueError(f"{what} is not a readable image ({err}); re-ingest that center") from None
    if image.mode == "L":
        return image, 255.0
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit PNG (older Pillow opens it as "I"). Pillow cannot warp it: resample in float, in [0, 1].
        return Image.fromarray(np.asarray(image, dtype=np.float32) / np.float32(65535.0), "F"), 1.0
    if image.mode in ("RGB", "RGBA", "LA", "P", "1"):  # ingest stores gray; tolerate other producers
        return image.convert("L"), 255.0
    raise ValueError(f"{what} has image mode {image.mode!r}; diffkd reads 8- or 16-bit gray PNGs")


def _open_mask(data: bytes, what: str) -> Image.Image:
    """Mask PNG (any mode) -> binary 'L' image, 255 inside the lesion."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            inside = np.asarray(image)
    except Exception as err:
        raise ValueError(f"{what} is not a readable image ({err}); re-ingest that center") from None
    if inside.ndim == 3:
        inside = inside.max(axis=2)
    return Image.fromarray(np.where(inside > 0, 255, 0).astype(np.uint8), "L")


# A cached row holds its decoded source pixels instead of PNG bytes (see `decode_sources`): gray
# values as uint16 with a flag for 16-bit sources, the mask as uint8 0/255 (0x0 when there is none).
PIXELS, SIXTEEN_BIT, MASK_PIXELS = "pixels", "sixteen_bit", "mask_pixels"


def _row_image(batch: dict[str, np.ndarray], i: int, what: str) -> tuple[Image.Image, float]:
    if PIXELS not in batch:
        return _open_gray(batch["image"][i], what)
    pixels = np.asarray(batch[PIXELS][i])
    if batch[SIXTEEN_BIT][i]:  # as _open_gray leaves a 16-bit PNG: float in [0, 1]
        return Image.fromarray(pixels.astype(np.float32) / np.float32(65535.0), "F"), 1.0
    return Image.fromarray(pixels.astype(np.uint8), "L"), 255.0


def _row_mask(batch: dict[str, np.ndarray], i: int, what: str) -> Image.Image | None:
    if MASK_PIXELS in batch:
        pixels = np.asarray(batch[MASK_PIXELS][i])
        return Image.fromarray(pixels.astype(np.uint8), "L") if pixels.size else None
    raw = batch.get("mask")
    return None if raw is None or raw[i] is None else _open_mask(raw[i], what)


def decode_sources(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PNG bytes -> source pixels at their own resolution: the decoded-once form a cached set keeps.

    `decode_batch` turns these rows into exactly what it makes from the PNG bytes (resizing and
    augmentation run on the same Pillow images), so cached and streamed epochs are identical.
    """
    out = {k: v for k, v in batch.items() if k not in ("image", "mask")}
    pixels, sixteen, masks = [], [], []
    for i, cid in enumerate(batch["case_id"]):
        image, full_scale = _open_gray(batch["image"][i], f"image of row case_id={cid}")
        sixteen.append(full_scale == 1.0)
        values = np.asarray(image)
        pixels.append(np.rint(values * 65535.0).astype(np.uint16) if full_scale == 1.0 else values.astype(np.uint16))
        mask = _row_mask(batch, i, f"mask of row case_id={cid}")
        masks.append(np.zeros((0, 0), np.uint8) if mask is None else np.asarray(mask, dtype=np.uint8))
    _record_png_decodes(batch)
    out[PIXELS] = _ragged(pixels)
    out[SIXTEEN_BIT] = np.array(sixteen, dtype=bool)
    out[MASK_PIXELS] = _ragged(masks)
    return out


def _record_png_decodes(batch: dict[str, np.ndarray]) -> None:
    """Count the batch's PNG decodes, real and synthetic rows apart (`source_cache.record_decodes`)."""
    synthetic = np.asarray(batch.get("synthetic", np.zeros(len(batch["case_id"]))), dtype=bool)
    record_decodes(int((~synthetic).sum()), synthetic=False)
    record_decodes(int(synthetic.sum()), synthetic=True)


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """A column of 2-d arrays of any shapes (Ray stores it as a variable-shaped tensor)."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def row_generators(case_ids: Sequence[str], seed: int, epoch: int) -> list[np.random.Generator]:
    """One generator per row from (seed, epoch, case id): a row's augmentation ignores its batch-mates and order."""
    return [np.random.default_rng([seed, epoch, zlib.crc32(str(cid).encode())]) for cid in case_ids]


def _index(values: Iterable, vocabulary: Sequence[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(vocabulary)}
    return np.array([lookup.get(str(v), len(vocabulary)) for v in values], dtype=np.int64)


def encode_clinical(batch: dict[str, np.ndarray], n: int) -> np.ndarray:
    encoding = ClinicalEncoding()
    columns = {name: batch[name] if name in batch else [None] * n for name in encoding.columns}
    rows = ({name: _scalar(columns[name][i]) for name in encoding.columns} for i in range(n))
    return np.array([encoding.encode_row(row) for row in rows], dtype=np.float32).reshape(n, encoding.width)


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def decode_batch(batch: dict[str, np.ndarray], cfg: PipelineConfig,
                 rng: np.random.Generator | Sequence[np.random.Generator] | None = None,
                 mask_dtype: type = np.float32) -> dict[str, np.ndarray]:
    """Decode one batch of dataset rows into the batch contract of `diffkd/train/task.py`.

    `rng` None: evaluation (no augmentation). A Generator: augment every row from it, in order. A
    sequence of Generators: one per row (what the Ray pipeline passes, see `row_generators`).
    Augmentation also needs `cfg.augment`. The Ray pipeline ships masks as uint8 (0/1: a quarter of
    the bytes, and most rows have none); `collate` makes them float32 again.
    """
    case_ids = [str(c) for c in batch["case_id"]]
    n, size = len(case_ids), cfg.image_size
    augmenting = rng is not None and cfg.augment
    if not augmenting:
        rngs, params = [None] * n, [AugmentParams.identity()] * n
    else:
        rngs = [rng] * n if isinstance(rng, np.random.Generator) else list(rng)
        if len(rngs) != n:
            raise ValueError(f"decode_batch: {len(rngs)} generators for {n} rows")
        params = [draw_params(g, cfg.augmentation) for g in rngs]

    pixels = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, 1, size, size), dtype=mask_dtype)
    for i in range(n):
        image, full_scale = _row_image(batch, i, f"image of row case_id={case_ids[i]}")
        pixels[i] = np.asarray(place(image, size, cfg.keep_aspect, params[i], Image.Resampling.BILINEAR),
                               dtype=np.float32)
        if full_scale != 1.0:
            pixels[i] *= np.float32(1.0 / full_scale)
        mask = _row_mask(batch, i, f"mask of row case_id={case_ids[i]}")
        if mask is not None:
            warped = place(mask, size, cfg.keep_aspect, params[i], Image.Resampling.BILINEAR)
            masks[i, 0] = np.asarray(warped) >= 128  # bilinear + threshold: smoother edges than nearest

    if PIXELS not in batch:  # decoded from PNG here, not from a cached set's source pixels
        _record_png_decodes(batch)
    if augmenting:
        apply_intensity(pixels, params, rngs)
    pixels -= np.float32(cfg.norm_mean)
    pixels *= np.float32(1.0 / cfg.norm_std)
    image_out = pixels[:, None] if cfg.in_chans == 1 else np.repeat(pixels[:, None], cfg.in_chans, axis=1)
    return {
        "image": image_out,
        "mask": masks,
        "label": np.asarray(batch["label"], dtype=np.int64),
        "clinical": encode_clinical(batch, n),
        "center_idx": _index(batch["center"], cfg.centers),
        "modality_idx": _index(batch["modality"], MODALITIES),
        "synthetic": np.asarray(batch["synthetic"], dtype=bool),
        "case_id": np.array(case_ids, dtype=object),
    }


def _decode_in_ray(block: dict[str, np.ndarray], cfg: PipelineConfig, train: bool,
                   selection: RowSelection | None = None) -> dict[str, np.ndarray]:
    """map_batches UDF over a whole read block (about one batch of rows, see `block_bytes`), or over
    several cached blocks, of which it keeps the `selection`.

    The per-row generators are keyed by Ray Data's execution index, which is the epoch.
    """
    if selection is not None:
        block = selection.take(block)
    rngs = None
    if train and cfg.augment:
        from ray.data.context import DataContext

        # Ray Data bumps this counter every time the plan executes (its own random() uses it the same way).
        epoch = getattr(DataContext.get_current(), "_execution_idx", 0)
        rngs = row_generators(block["case_id"], cfg.seed, epoch)
    return decode_batch(block, cfg, rngs, mask_dtype=np.uint8)


def block_bytes(cfg: PipelineConfig) -> int:
    """Ray's target block size: one training batch of decoded rows (float32 image, uint8 mask).

    Small blocks stream: a file's rows reach the trainer a batch at a time instead of all at once,
    and what a task holds in memory stays the same whatever the file or dataset size.
    """
    return max(2**20, resized_bytes(cfg.batch_size, cfg))


def resized_bytes(rows: int, cfg: PipelineConfig) -> int:
    """What `rows` model-ready rows hold (float32 image, uint8 mask)."""
    return rows * cfg.image_size ** 2 * (4 * cfg.in_chans + 1)


def task_memory_bytes(cfg: PipelineConfig) -> int:
    """Scheduling hint for one read+decode task: a worker's baseline, a PNG block, its decoded rows, scratch."""
    return 350 * 2**20 + 4 * block_bytes(cfg)  # Ray measured ~300 MiB per task at 128 px, batch 32


# ---- datasets -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowSelection:
    """The real rows a dataset takes from its centers' files: these cases (None: all) of these modalities
    (empty: all)."""

    case_ids: tuple[str, ...] | None
    modalities: tuple[str, ...] = ()

    def expression(self, modalities_only: bool = False):
        """The selection as a Ray Data expression (None: every row), for a filter pushed into a Parquet scan."""
        from ray.data.expressions import col

        modality = col("modality").is_in(list(self.modalities)) if self.modalities else None
        wanted = None if modalities_only or self.case_ids is None else col("case_id").is_in(list(self.case_ids))
        return wanted if modality is None else (modality if wanted is None else wanted & modality)

    def take(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The selected rows of a numpy block."""
        keep = np.ones(len(block["case_id"]), dtype=bool)
        if self.case_ids is not None:
            keep &= np.isin(block["case_id"].astype(str), self.case_ids)
        if self.modalities:
            keep &= np.isin(block["modality"].astype(str), self.modalities)
        return block if keep.all() else {name: column[keep] for name, column in block.items()}


def make_dataset(dataset: ImageDataset, case_ids: Iterable[str] | None, cfg: PipelineConfig, train: bool,
                 synthetic_ratio: float | None = None, centers: Iterable[str] | None = None,
                 cache: bool | None = None) -> "ray.data.Dataset":
    """A Ray dataset of decoded rows for the real cases `case_ids` (None: every real row of `centers`).

    `centers` limits which partitions are read at all (default: every real center); training adds
    synthetic rows of the same centers at `synthetic_ratio` (default `cfg.synthetic_ratio`) synthetic
    rows per real row in expectation, a fresh random subset each epoch, and shuffles file order per
    epoch. Row shuffling within the stream happens when iterating (`iter_shard_batches`).

    The real rows are decoded once and cached in Ray's object store when `cache` is True, or, when it
    is None, as `cfg.cache` decides (see `cache_decision`); otherwise every epoch streams them from
    Parquet. Synthetic rows always stream (a different subset every epoch).
    """
    from ray.data.expressions import col, random

    cfg = with_center_vocabulary(cfg, dataset)
    centers = None if centers is None else sorted(set(centers))
    ids = None if case_ids is None else sorted(set(map(str, case_ids)))
    files = dataset.files(centers)
    if not files:
        raise DatasetError(f"dataset {dataset.uri} has no real rows for centers {centers or 'any'}")
    selection = RowSelection(None if ids is None else tuple(ids), tuple(cfg.modalities))
    if cache is None:
        cache = cache_decision(dataset, ids, centers, cfg).cached
    shared = _shared_entry(dataset, files, centers, cfg) if cache else None
    if shared is not None:  # picks its rows out of the job's decoded sources: no PNG decoded here
        ds = _resize_cached(shared, cfg, train, count_real_rows(dataset, centers), selection)
    else:
        ds = _read_and_decode(dataset, files, dataset.partition_base(), selection.expression(), cfg, train,
                              cache=cache)
    # rows, not cases (a case has 1-3 views), of the modalities read; counted only where an evaluation set
    # may be kept resized or a training set mixes synthetic rows (a streamed set needs no count)
    if cache and not train and (resized_bytes(count_real_rows(dataset, centers, ids, cfg.modalities), cfg)
                                <= cache_budget_bytes(cfg)):
        # evaluation rows are not augmented: resized once, every later pass reads them as they are
        ds = ds.materialize()

    ratio = cfg.synthetic_ratio if synthetic_ratio is None else synthetic_ratio
    if train and ratio > 0:
        modality = selection.expression(modalities_only=True)
        real_rows = count_real_rows(dataset, centers, ids, cfg.modalities)  # the ratio is per real row streamed
        available = count_synthetic_rows(dataset, centers, cfg.synthetic_sources, cfg.modalities)
        wanted_synthetic = min(available, round(ratio * real_rows))
        if wanted_synthetic == 0:
            log.warning("synthetic_ratio=%s but no synthetic rows exist for centers %s (generator runs: %s); "
                        "training on real rows only", ratio, centers or "all", ", ".join(cfg.synthetic_sources) or "any")
        else:
            keep = random(seed=cfg.seed) < wanted_synthetic / available  # a new subset each epoch
            if cfg.synthetic_sources:
                keep = keep & col("source").is_in(list(cfg.synthetic_sources))
            synthetic = _read_and_decode(dataset, dataset.files(centers, synthetic=True),
                                         dataset.partition_base(synthetic=True),
                                         keep if modality is None else keep & modality, cfg, train)
            ds = ds.mix(synthetic, weights=[real_rows, wanted_synthetic])  # interleaved block by block
    return ds


def _shared_entry(dataset: ImageDataset, files: list[str], centers: list[str] | None,
                  cfg: PipelineConfig) -> "ray.data.Dataset | None":
    """Every real row of these centers' files, decoded once for the whole job, when a shared cache is
    open and they fit its budget (`diffkd.data.source_cache`); None otherwise."""
    import functools

    import pyarrow.compute as pc

    if not shared_cache_open():
        return None
    meta = dataset.metadata(centers)
    pixels = pc.multiply(meta.column("height").cast("int64"), meta.column("width").cast("int64"))
    per_center = {}  # decoded bytes as `cache_decision` estimates them
    for center, count in zip(meta.column("center").to_pylist(), pixels.to_pylist()):
        per_center[center] = per_center.get(center, 0) + 3 * count
    of_file = [path.split(f"/{PARTITION_KEY}=", 1)[1].split("/", 1)[0] for path in files]
    sizes = [per_center.get(center, 0) // of_file.count(center) for center in of_file]
    budget = cache_budget_bytes(cfg)
    build = functools.partial(_decode_file_once, dataset, files, dataset.partition_base(), cfg)
    entries = shared_sources(file_keys(dataset, files), sizes, budget, cfg.decode_concurrency, build)
    if entries is None:
        return None
    return entries[0] if len(entries) == 1 else entries[0].union(*entries[1:])


def _decode_file_once(dataset: ImageDataset, files: list[str], partition_base: str, cfg: PipelineConfig,
                      index: int) -> "ray.data.MaterializedDataset":
    """Every row of files[index] with its PNGs decoded to source pixels, materialised in the object
    store: an entry of the shared cache (built in the cache's actor, which then owns it)."""
    import ray.data

    resources = dict(num_cpus=cfg.decode_num_cpus, memory=task_memory_bytes(cfg))
    return (_read(dataset, [files[index]], partition_base, cfg, train=False)
            .map_batches(decode_sources, batch_size=None, batch_format="numpy",
                         compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency), **resources)
            .materialize())


@dataclass
class CacheDecision:
    cached: bool
    decoded_bytes: int  # estimated size of the decoded rows (source pixels and masks)
    budget_bytes: int


def cache_decision(dataset: ImageDataset, case_ids: Sequence[str] | None, centers: Sequence[str] | None,
                   cfg: PipelineConfig) -> CacheDecision:
    """Whether the real rows of `case_ids` (None: all of `centers`) get cached under `cfg.cache`.

    The decoded size is estimated from the rows' recorded height and width: 2 bytes per pixel, plus
    1 for a mask. The budget is `cfg.cache_budget_mb`, or `cfg.cache_fraction` of the Ray cluster's
    object store.
    """
    import pyarrow.compute as pc

    if cfg.cache == "never":
        return CacheDecision(False, 0, 0)
    meta = dataset.metadata(centers)
    if case_ids is not None:
        meta = meta.filter(pc.field("case_id").isin(list(case_ids)))
    if cfg.modalities:
        meta = meta.filter(pc.field("modality").isin(list(cfg.modalities)))
    pixels = pc.sum(pc.multiply(meta.column("height").cast("int64"), meta.column("width").cast("int64"))).as_py()
    decoded = 3 * int(pixels or 0)
    budget = cache_budget_bytes(cfg)
    cached = cfg.cache == "always" or decoded <= budget
    log.debug("%s %d rows: %.0f MiB decoded, cache budget %.0f MiB", "caching" if cached else "streaming",
              meta.num_rows, decoded / 2**20, budget / 2**20)
    return CacheDecision(cached, decoded, budget)


def cache_budget_bytes(cfg: PipelineConfig) -> int:
    """Decoded bytes a cached set may hold: `cfg.cache_budget_mb`, or `cfg.cache_fraction` of the Ray
    cluster's object store."""
    if cfg.cache_budget_mb:
        return int(cfg.cache_budget_mb * 2**20)
    import ray

    return int(cfg.cache_fraction * ray.cluster_resources().get("object_store_memory", 0))


def _read_and_decode(dataset: ImageDataset, files: list[str], partition_base: str, predicate, cfg: PipelineConfig,
                     train: bool, cache: bool = False) -> "ray.data.Dataset":
    """read_parquet -> filter -> map_batches(decode), which Ray fuses into ONE task per file.

    `center` comes from the files' `center=<C>` directories below `partition_base` (the files do not
    carry it).

    Fusing matters on small machines: the PNG bytes never go through the object store and there is
    one task per file instead of one per block (on the 2-core box: ~2x the images/s of a separate
    read operator). Ray fuses only when both steps ask for the same resources and the decode step
    takes whole blocks (batch_size=None; a batch size makes it bundle rows across reads instead),
    and only when the read is not split further (override_num_blocks at most the number of files).
    Many small files (one per center) are grouped into fewer tasks (`read_tasks`).

    The reader hands out one training batch of rows at a time (`batch_size`). Sized by bytes instead,
    a read block held a little less than a batch of decoded rows, and Ray keeps an output block back
    until it reaches its target size: the first batch of every epoch waited for a second decode.
    """
    import ray.data

    refresh_data_limits_until_known()  # the driver executes too (a cached set's decode pass, evaluation)
    # identical resources and compute on all three steps: what fusion requires
    resources = dict(num_cpus=cfg.decode_num_cpus, memory=task_memory_bytes(cfg))
    compute = ray.data.TaskPoolStrategy(size=cfg.decode_concurrency)
    ds = _read(dataset, files, partition_base, cfg, train)
    if predicate is not None:  # pushed into the Parquet scan where it can be (random() cannot)
        ds = ds.filter(expr=predicate, compute=compute, **resources)
    if not cache:  # whole read blocks, so that the map fuses with the read
        return ds.map_batches(_decode_in_ray, fn_kwargs={"cfg": cfg, "train": train}, batch_size=None,
                              batch_format="numpy", compute=compute, **resources)
    # Decode the PNGs once into the object store; every epoch then resizes and augments from there.
    ds = ds.map_batches(decode_sources, batch_size=None, batch_format="numpy", compute=compute,
                        **resources).materialize()
    return _resize_cached(ds, cfg, train, ds.count())


def _resize_cached(sources: "ray.data.Dataset", cfg: PipelineConfig, train: bool, rows: int,
                   selection: RowSelection | None = None) -> "ray.data.Dataset":
    """Decoded source rows in the object store -> model-ready rows, resized (and augmented) every epoch,
    several stored blocks per task (`cached_task_rows`) over `rows` source rows.

    `selection`: the rows to keep (a shared cache holds every row of its centers). It is applied in the
    same task: a filter step of its own cost one task per cached block, most of an epoch's 1 s start
    on the demo."""
    import ray.data

    ds = sources
    if train:  # a fresh permutation of the cached blocks each epoch, as the streamed files are reshuffled
        ds = ds.randomize_block_order(seed=ray.data.RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))
    out = ds.map_batches(_decode_in_ray, fn_kwargs={"cfg": cfg, "train": train, "selection": selection},
                         batch_size=cached_task_rows(rows, cfg), batch_format="numpy",
                         compute=ray.data.TaskPoolStrategy(size=cfg.decode_concurrency),
                         num_cpus=cfg.decode_num_cpus, memory=task_memory_bytes(cfg))
    out.context._execution_idx = 0  # materialising counted as a run: epochs still number from 0
    return out


def _read(dataset: ImageDataset, files: list[str], partition_base: str, cfg: PipelineConfig,
          train: bool) -> "ray.data.Dataset":
    """The Parquet scan of `files` (READ_COLUMNS, one training batch of rows per block)."""
    import ray.data
    from ray.data.datasource import FileShuffleConfig, Partitioning

    resources = dict(num_cpus=cfg.decode_num_cpus, memory=task_memory_bytes(cfg))
    shuffle = FileShuffleConfig(seed=cfg.seed) if train else None  # reseeded every execution: new order per epoch
    with _read_settings(cfg):
        ds = ray.data.read_parquet(files, filesystem=dataset.fs, shuffle=shuffle,
                                   partitioning=Partitioning("hive", base_dir=partition_base, filesystem=dataset.fs),
                                   concurrency=cfg.decode_concurrency, override_num_blocks=read_tasks(len(files), cfg),
                                   batch_readahead=2, batch_size=cfg.batch_size, **resources).select_columns(list(READ_COLUMNS))
    ds.context.target_max_block_size = block_bytes(cfg)  # the dataset keeps its own copy of the context
    # diffkd reports progress itself; Ray Data's bars (logged every few seconds when stdout is not a
    # terminal, e.g. the decode-once pass of a cached set in a Tune trial) would only flood the logs
    ds.context.enable_progress_bars = False
    return ds


READ_TASKS_PER_SLOT = 1  # read tasks per epoch for each of `decode_concurrency` slots, at most


def read_tasks(files: int, cfg: PipelineConfig) -> int:
    """Read+decode tasks per epoch: one per file, but no more than one per concurrency slot.

    Each task costs a fixed start (a worker lease, opening files, the first decoded block), and Ray
    Data notices a finished task only on its next scheduling step (up to 0.1 s later), so a slot idles
    between two tasks. With 40 centers of a few images each those starts dominated the epoch (0.56x the
    images/s of 4 centers holding the same images); two tasks per slot instead of one cost the 4-center
    bench about a tenth of its images/s. Grouped, a task streams its files one after another, block
    by block, so memory per task stays that of one block; the file order is still reshuffled every
    epoch. Ray groups files by count, not size: very unequal centers leave one slot finishing alone.
    """
    return max(1, min(files, READ_TASKS_PER_SLOT * cfg.decode_concurrency))


def cached_task_rows(rows: int, cfg: PipelineConfig) -> int:
    """Rows per resize-and-augment task over a cached set: about one task per concurrency slot and
    epoch, between one and eight training batches each.

    The cached blocks are small (a batch of source images or less); one task each cost a task's fixed
    start per ~12 rows and halved the images/s (bench/data_feed.py). Eight batches bound what one
    task holds decoded at a time.
    """
    per_task = math.ceil(rows / (READ_TASKS_PER_SLOT * cfg.decode_concurrency)) if rows else cfg.batch_size
    return int(min(8 * cfg.batch_size, max(cfg.batch_size, per_task)))


@contextlib.contextmanager
def _read_settings(cfg: PipelineConfig):
    """DataContext settings that `read_parquet` reads while it builds the dataset, set for that call only.

    * `use_datasource_v2=False`: Ray's V1 Parquet datasource lists our (already known) files on the
      driver. The V2 one (Ray 2.60's default) adds a ListFiles task per epoch that claims a whole CPU
      and, in a fresh worker, imports fsspec's HTTP stack: 24 s of a 25 s epoch on the loaded 2-core
      box, against 0.4 s for V1 on the same files.
    * `target_max_block_size`: the reader sizes its Parquet batches from it. Left at Ray's 128 MiB,
      a decode task pulled a whole file into memory at once, so its memory grew with the file
      (+140 MiB per task at 10x the data).
    """
    from ray.data import DataContext

    with _read_settings_lock:  # the context is the process's: stages building datasets at once take turns
        context = DataContext.get_current()
        wanted = {"use_datasource_v2": False, "target_max_block_size": block_bytes(cfg)}
        previous = {name: getattr(context, name) for name in wanted if hasattr(context, name)}
        for name in previous:
            setattr(context, name, wanted[name])
        try:
            yield
        finally:
            for name, value in previous.items():
                setattr(context, name, value)


_read_settings_lock = threading.Lock()


def _count_rows(dataset: ImageDataset, centers: list[str] | None, synthetic: bool) -> int:
    section = dataset.manifest["synthetic" if synthetic else "centers"]
    return sum(entry["rows"] for name, entry in section.items() if centers is None or name in centers)


def count_real_rows(dataset: ImageDataset, centers: Iterable[str] | None, case_ids: Iterable[str] | None = None,
                    modalities: tuple[str, ...] = ()) -> int:
    """Real rows of `centers` that belong to `case_ids` (all when None) and `modalities` (all when empty)."""
    if case_ids is None and not modalities:
        return _count_rows(dataset, centers, synthetic=False)
    table = dataset.read_table(centers, columns=["case_id", "modality"])
    keep = _in(table, "modality", modalities)
    if case_ids is not None:
        keep &= _in(table, "case_id", case_ids)
    return int(keep.sum())


def count_synthetic_rows(dataset: ImageDataset, centers: Iterable[str] | None, sources: tuple[str, ...] = (),
                         modalities: tuple[str, ...] = ()) -> int:
    """Synthetic rows of `centers` written by the generator runs `sources` (all runs when empty) in
    `modalities` (all when empty)."""
    if not sources and not modalities:
        return _count_rows(dataset, centers, synthetic=True)
    generated = set(dataset.centers(synthetic=True))
    present = sorted(generated if centers is None else generated & set(centers))
    if not present:
        return 0
    table = dataset.read_table(present, synthetic=True, columns=["source", "modality"])
    return int((_in(table, "source", sources) & _in(table, "modality", modalities)).sum())


def _in(table, column: str, values: Iterable[str]) -> np.ndarray:
    """Rows of an Arrow table whose `column` is one of `values`; every row when `values` is empty."""
    values = [str(v) for v in values]
    if not values:
        return np.ones(table.num_rows, dtype=bool)
    return np.isin(np.asarray(table.column(column).to_pylist(), dtype=object), values)


def split_datasets(dataset: ImageDataset, assignments: "pd.DataFrame", cfg: PipelineConfig) -> dict[str, "ray.data.Dataset"]:
    """{"train", "val", "test"} streaming datasets from a splits table (case_id, center, split), empty splits left out.

    Only the train split is augmented, shuffled and mixed with synthetic rows (at `cfg.synthetic_ratio`);
    synthetic rows listed in the table are left to that mixing, not read as real cases.
    """
    missing = {"case_id", "center", "split"} - set(assignments.columns)
    if missing:
        raise ValueError(f"split_datasets: the assignments table lacks column(s) {sorted(missing)}")
    if "synthetic" in assignments.columns:
        assignments = assignments[~assignments["synthetic"].astype(bool)]
    cfg = with_center_vocabulary(cfg, dataset)
    out = {}
    for split in ("train", "val", "test"):
        rows = assignments[assignments["split"] == split]
        if len(rows):
            out[split] = make_dataset(dataset, rows["case_id"], cfg, train=split == "train",
                                      centers=rows["center"].unique(),
                                      cache=False if split == "test" else None)  # test is read once
    return out


# ---- hand-off to training -------------------------------------------------------------------------

def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """numpy batch -> torch tensors; identifier columns stay lists of str (the loop needs case_id for predictions)."""
    import torch

    def tensor(key: str, value: np.ndarray) -> "torch.Tensor":
        if key == "mask" and value.dtype != np.float32:  # shipped as uint8 (see decode_batch)
            return torch.from_numpy(value.astype(np.float32))
        # Arrays viewing Ray's object store are read-only; a model writing into its input must not touch them.
        return torch.from_numpy(value if value.flags.writeable else value.copy())

    return {key: value.tolist() if key in STRING_KEYS or value.dtype == object else tensor(key, value)
            for key, value in batch.items()}


def _torch_collate():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return collate(batch)

    return Collate()


def iter_shard_batches(shard, batch_size: int, *, shuffle_buffer: int = 0, shuffle_seed: int | None = None,
                       drop_last: bool = False, prefetch_batches: int = 1) -> Iterator[dict[str, Any]]:
    """Batches (the task.py contract, tensors on CPU) from a Ray Train shard or any Ray dataset / DataIterator.

    Call it once per epoch (each call re-runs the pipeline); pass `shuffle_buffer=cfg.shuffle_buffer`
    and a per-epoch `shuffle_seed` for training, 0 for evaluation (keeps the stream order).
    """
    yield from shard.iter_torch_batches(
        batch_size=batch_size, collate_fn=_torch_collate(), drop_last=drop_last, prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed if shuffle_buffer else None)


# ---- in memory, without Ray -----------------------------------------------------------------------

def load_arrays(dataset: ImageDataset, case_ids: Iterable[str] | None, cfg: PipelineConfig, *,
                train: bool = False, epoch: int = 0, centers: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Decode rows into memory without Ray (tests, audits, baselines), in the order of `case_ids`.

    `train=True` augments exactly as the Ray pipeline's epoch `epoch` does. Real rows only.
    """
    import pyarrow.compute as pc

    cfg = with_center_vocabulary(cfg, dataset)
    ids = None if case_ids is None else [str(c) for c in case_ids]
    scan = dataset.arrow_dataset(None if centers is None else sorted(set(centers)))
    table = scan.to_table(columns=list(READ_COLUMNS),
                          filter=None if ids is None else pc.field("case_id").isin(ids))
    if cfg.modalities:
        table = table.filter(pc.field("modality").isin(list(cfg.modalities)))
    if ids is not None:
        found = table.column("case_id").to_pylist()
        absent = sorted(set(ids) - set(found))
        if absent:
            raise DatasetError(f"{len(absent)} case id(s) not in dataset {dataset.uri} "
                               f"(or filtered out by modality): {', '.join(absent[:5])}")
        order = {cid: i for i, cid in enumerate(ids)}
        table = table.take(np.argsort([order[c] for c in found], kind="stable"))
    parts = []
    for start in range(0, table.num_rows, cfg.batch_size):
        chunk = table.slice(start, cfg.batch_size)
        rows = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}
        rngs = row_generators(rows["case_id"], cfg.seed, epoch) if train else None
        parts.append(decode_batch(rows, cfg, rngs))
    if not parts:
        return decode_batch({name: np.array([], dtype=object) for name in READ_COLUMNS}, cfg)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
