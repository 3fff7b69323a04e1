"""Training checkpoints: what one holds, how it is verified, how it is loaded without trusting pickles.

One checkpoint is one directory holding every worker's files. On a local or mounted filesystem the
workers write them in place, each into its own folder under a `.staging-` name, which rank 0 merges
and renames once all are done; to an object store Ray Train uploads each worker's local folder::

    checkpoint_epoch0003_<nonce>/
        loop_state.json                   rank 0: epoch, step, metric history, best so far, world size
        model.safetensors                 rank 0: the full (ZeRO-3: gathered) model weights, for export
        deepspeed/latest                  DeepSpeed's own layout under tag "state"; ZeRO shards carry
        deepspeed/state/*.pt              the rank in their file name, which keeps them apart
        checksums/rank-00000.json         per rank: size and sha256 of every file that rank wrote

Integrity: a checkpoint is usable only when every rank's checksum file is present and every file
it lists has the recorded size and sha256, so a truncated upload, a missing shard or a flipped byte
is detected before any of it is loaded; `find_resumable` takes the newest checkpoint that verifies
and names each newer one it skipped, with the reason.

Safety: weights are read with safetensors, and DeepSpeed's `.pt` files only inside
`weights_only_loads()`, which forces `torch.load(weights_only=True)` for every call, DeepSpeed's
internal ones included; torch then rebuilds only tensors, containers and a short allowlist of
DeepSpeed's plain-data classes, and refuses any other pickled object instead of running it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import posixpath
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow.fs as pafs
import torch

from diffkd.runtime.files import replace_directory

FORMAT_VERSION = 1
LOOP_STATE = "loop_state.json"
MODEL_WEIGHTS = "model.safetensors"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"
CHECKSUM_DIR = "checksums"
STAGING_PREFIX = ".staging-"  # a checkpoint folder being written in place, renamed when every rank is done
_DIR_PATTERN = re.compile(r"^checkpoint_epoch(\d+)_\w+$")
_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint is incomplete, truncated or altered (checksums disagree)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects that weights-only loading refuses."""


@dataclass
class LoopState:
    """Where a run stands; saved with every checkpoint so a resumed run continues it exactly."""

    epoch: int = 0  # last completed epoch (1-based); 0 before the first
    global_step: int = 0  # optimizer steps taken
    samples_seen: int = 0
    history: list[dict] = field(default_factory=list)  # one metrics dict per completed epoch
    best_value: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None  # directory name of the best epoch's checkpoint
    epochs_since_best: int = 0
    stopped_early: bool = False
    restarts: list[dict] = field(default_factory=list)  # each resume: from which checkpoint, what was skipped


def checkpoint_dir_name(epoch: int, nonce: str) -> str:
    """Name for an epoch's checkpoint; the nonce keeps a re-run epoch (after a fallback) apart."""
    return f"checkpoint_epoch{epoch:04d}_{nonce}"


def epoch_of(dir_name: str) -> int | None:
    match = _DIR_PATTERN.match(dir_name)
    return int(match.group(1)) if match else None


# ---- writing ------------------------------------------------------------------------------------

def gathered_state_dict(module: torch.nn.Module, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """Full fp32 weights on rank 0 (None elsewhere). Under ZeRO-3 every rank must call this: the
    partitioned parameters are gathered collectively."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None, enabled=zero_stage == 3):
        if rank != 0:
            return None
        # clone: safetensors refuses tensors that share storage (tied weights) and gathered ones vanish
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
                for k, v in module.state_dict().items()}


def save_checkpoint(local_dir: str, engine, state: LoopState, *, rank: int, world_size: int,
                    task_name: str, averaged: torch.nn.Module | None = None) -> None:
    """Write this rank's part of a checkpoint into `local_dir` (all ranks call it, in step).

    The model weights file holds `averaged`'s weights when given (the loop's weight average: what was
    validated and what is exported), else the engine's; the DeepSpeed folder always holds the raw
    training state a resumed run continues from."""
    from safetensors.torch import save_file

    zero_stage = engine.zero_optimization_stage()
    engine.save_checkpoint(os.path.join(local_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    weights = gathered_state_dict(averaged if averaged is not None else engine.module, zero_stage, rank)
    if rank == 0:
        save_file(weights, os.path.join(local_dir, MODEL_WEIGHTS))
        meta = {"format_version": FORMAT_VERSION, "task": task_name, "world_size": world_size,
                "zero_stage": zero_stage, "saved_at": time.time(), "state": dataclasses.asdict(state)}
        with open(os.path.join(local_dir, LOOP_STATE), "w") as f:
            json.dump(meta, f, indent=1)
    _write_checksums(local_dir, rank, world_size)


def _write_checksums(local_dir: str, rank: int, world_size: int) -> None:
    files = {}
    for root, dirs, names in os.walk(local_dir):
        if root == local_dir and CHECKSUM_DIR in dirs:
            dirs.remove(CHECKSUM_DIR)  # listings never list themselves
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            with open(full, "rb") as f:
                files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(f)}
    os.makedirs(os.path.join(local_dir, CHECKSUM_DIR), exist_ok=True)
    with open(os.path.join(local_dir, _checksum_name(rank)), "w") as f:
        json.dump({"rank": rank, "world_size": world_size, "files": files}, f, indent=1)


def _checksum_name(rank: int) -> str:
    return f"{CHECKSUM_DIR}/rank-{rank:05d}.json"


def _sha256(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


# ---- verifying ----------------------------------------------------------------------------------

def _read_json(fs: pafs.FileSystem, path: str, what: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{what} {path} is missing (the checkpoint is incomplete)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{what} {path} is not valid JSON ({err}): truncated or altered") from None


def read_meta(fs: pafs.FileSystem, path: str) -> dict:
    """The loop_state.json of a checkpoint (not verified)."""
    meta = _read_json(fs, posixpath.join(path, LOOP_STATE), "loop state")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format_version')!r}; "
                              f"this diffkd reads format {FORMAT_VERSION}")
    return meta


def verify_checkpoint(fs: pafs.FileSystem, path: str) -> dict:
    """Check every rank's files against their checksums; the checkpoint's metadata, or CorruptCheckpointError."""
    meta = read_meta(fs, path)
    for rank in range(int(meta["world_size"])):
        listing = _read_json(fs, posixpath.join(path, _checksum_name(rank)), f"rank {rank} checksum file")
        for rel, expected in listing["files"].items():
            file_path = posixpath.join(path, rel)
            info = fs.get_file_info(file_path)
            if info.type != pafs.FileType.File:
                raise CorruptCheckpointError(f"{file_path} (written by rank {rank}) is missing")
            if info.size != expected["size"]:
                raise CorruptCheckpointError(f"{file_path} is truncated or padded: {info.size} bytes, "
                                             f"{expected['size']} were written")
            with fs.open_input_stream(file_path) as f:
                if _sha256(f) != expected["sha256"]:
                    raise CorruptCheckpointError(f"{file_path} is corrupt: its sha256 differs from the one "
                                                 "recorded when it was written")
    return meta


@dataclass
class ResumePoint:
    path: str | None  # None: no checkpoint verifies (and none was required)
    meta: dict | None
    skipped: list[str]  # one line per newer checkpoint that failed verification, with the reason


def rank_folder(staging: str, rank: int) -> str:
    """Where `rank` writes its part of a checkpoint staged in place: its own folder, so its checksum
    listing covers exactly the files it wrote."""
    return os.path.join(staging, f"rank-{rank:05d}")


def merge_rank_folders(staging: str, world_size: int, final: str) -> None:
    """Move every rank's files from its `rank_folder` into one folder and rename it to `final`.

    Only renames: the folders lie on one filesystem. A file two ranks both wrote (DeepSpeed's `latest`
    tag) has the same content on each, so either copy will do.
    """
    merged = os.path.join(staging, "merged")
    for rank in range(world_size):
        source = rank_folder(staging, rank)
        for root, _, names in os.walk(source):
            target = os.path.join(merged, os.path.relpath(root, source))
            os.makedirs(target, exist_ok=True)
            for name in names:
                os.replace(os.path.join(root, name), os.path.join(target, name))
    replace_directory(merged, final)  # fsynced, then switched in one step
    shutil.rmtree(staging)


def remove_staging(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """Delete checkpoint folders a stopped job left half-written in place; returns their names."""
    removed = []
    for info in fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith(STAGING_PREFIX):
            fs.delete_dir(info.path)
            removed.append(info.base_name)
    return removed


def find_resumable(fs: pafs.FileSystem, run_path: str, required: bool) -> ResumePoint:
    """The newest checkpoint of the run that verifies (newest by epoch, then by time written).

    A directory that verifies is complete, every rank's files included, so it is used even when Ray
    Train had not registered it yet: Ray records a checkpoint some seconds after the workers upload
    it, and a job that dies in between would otherwise redo that epoch, or, with nothing registered
    yet, start over. Unfinished uploads fail verification and are skipped with their reason.
    `required` (Ray handed out a checkpoint) makes "none verifies" an error instead of a fresh start.
    """
    found = []
    for info in fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True)):
        epoch = epoch_of(info.base_name)
        if info.type == pafs.FileType.Directory and epoch is not None:
            found.append((epoch, info.mtime_ns or 0, info.path))
    skipped = []
    for _, _, path in sorted(found, reverse=True):
        try:
            return ResumePoint(path, verify_checkpoint(fs, path), skipped)
        except CorruptCheckpointError as err:
            skipped.append(f"{posixpath.basename(path)}: {err}")
    if required:
        raise CorruptCheckpointError(f"no checkpoint of run {run_path} verifies:\n  " + "\n  ".join(skipped))
    return ResumePoint(None, None, skipped)


# ---- loading ------------------------------------------------------------------------------------

def _deepspeed_safe_globals() -> list:
    """Plain-data classes inside DeepSpeed's ZeRO optimizer state (enum, scaler settings, index records)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every `torch.load` in this process runs with weights_only=True, whatever its caller asked."""
    with _env_lock:  # the variable is the process's: stages loading at once take turns
        previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
        os.environ[_FORCE_WEIGHTS_ONLY] = "1"
        try:
            with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                yield
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                "refused to load a checkpoint file that holds pickled Python objects weights-only loading does "
                f"not allow ({str(err).splitlines()[-1] if str(err) else err!r}). diffkd never writes such "
                "objects: the file was altered or does not come from diffkd. Delete that checkpoint directory "
                "(or the run) rather than loading it.") from None
        finally:
            if previous is None:
                os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
            else:
                os.environ[_FORCE_WEIGHTS_ONLY] = previous


_env_lock = threading.RLock()  # reentrant: a load inside a load


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """`torch.load` that never runs pickled code (see `weights_only_loads`)."""
    with weights_only_loads():
        return torch.load(path, map_location=map_location, weights_only=True)


def load_into_engine(local_dir: str, engine) -> None:
    """Restore module, optimizer (this rank's ZeRO shard) and LR schedule from a verified checkpoint."""
    with weights_only_loads():
        loaded, _ = engine.load_checkpoint(os.path.join(local_dir, DEEPSPEED_DIR), tag=DEEPSPEED_TAG,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise CheckpointError(
            f"the {type(engine).__name__} found no state of its own under {local_dir}/{DEEPSPEED_DIR}/"
            f"{DEEPSPEED_TAG}: was the run started with the other loop.engine? (loop.engine auto trains "
            "ZeRO stage 0 with ddp; set loop.engine: deepspeed to resume a stage-0 run DeepSpeed started)")


def load_weights(fs: pafs.FileSystem, checkpoint_path: str) -> dict[str, torch.Tensor]:
    """The model weights a checkpoint holds (safetensors: no code runs)."""
    from safetensors.torch import load

    with fs.open_input_stream(posixpath.join(checkpoint_path, MODEL_WEIGHTS)) as f:
        return load(f.read())
