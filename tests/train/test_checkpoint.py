"""Checkpoint integrity and safe loading, on a real DeepSpeed engine in this process (no Ray)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from diffkd.train import checkpoint as ckpt

FS = pafs.LocalFileSystem()


def make_engine(zero_stage: int, seed: int = 0):
    import deepspeed

    from diffkd.train.deepspeed_config import build_optimizer, deepspeed_config, prepare_deepspeed
    from diffkd.train.loop_config import LoopConfig

    prepare_deepspeed(use_gpu=False)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 2))
    cfg = LoopConfig(batch_size=8, zero_stage=zero_stage, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), dist_init_required=False,
                                      config=deepspeed_config(cfg, world_size=1, use_gpu=False, total_steps=20))
    return engine


def train_steps(engine, steps: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=generator)
        loss = nn.functional.cross_entropy(engine(x), (x[:, 0] > 0).long())
        engine.backward(loss)
        engine.step()


def save(engine, directory, epoch: int = 1) -> str:
    os.makedirs(directory, exist_ok=True)
    state = ckpt.LoopState(epoch=epoch, global_step=int(engine.global_steps), history=[{"epoch": epoch, "loss": 0.5}])
    ckpt.save_checkpoint(str(directory), engine, state, rank=0, world_size=1, task_name="test")
    return str(directory)


def optimizer_tensors(engine) -> list[torch.Tensor]:
    state = engine.optimizer.state_dict()
    flat = []

    def walk(obj):
        if isinstance(obj, torch.Tensor):
            flat.append(obj.detach().clone())
        elif isinstance(obj, dict):
            for key in sorted(obj, key=str):
                walk(obj[key])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item)

    walk(state)
    return flat


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_a_checkpoint_restores_weights_optimizer_and_schedule(process_group, tmp_path, zero_stage):
    engine = make_engine(zero_stage)
    train_steps(engine, 3)
    path = save(engine, tmp_path / "checkpoint_epoch0001_aa")
    meta = ckpt.verify_checkpoint(FS, path)
    assert meta["world_size"] == 1 and meta["zero_stage"] == zero_stage and meta["state"]["epoch"] == 1
    assert os.path.exists(os.path.join(path, ckpt.MODEL_WEIGHTS))
    assert os.path.exists(os.path.join(path, "checksums", "rank-00000.json"))

    fresh = make_engine(zero_stage, seed=123)
    assert not torch.equal(fresh.module[0].weight, engine.module[0].weight)
    ckpt.load_into_engine(path, fresh)
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(optimizer_tensors(engine), optimizer_tensors(fresh)))
    assert fresh.get_lr() == engine.get_lr() and fresh.global_steps == engine.global_steps
    # the exported weights are the module's
    weights = ckpt.load_weights(FS, path)
    assert torch.equal(weights["0.weight"], engine.module[0].weight.detach())


@pytest.fixture(scope="module")
def saved(process_group, tmp_path_factory):
    engine = make_engine(0)
    train_steps(engine, 2)
    return save(engine, tmp_path_factory.mktemp("saved") / "checkpoint_epoch0001_aa")


def copy_of(saved: str, directory) -> str:
    shutil.copytree(saved, directory)
    return str(directory)


def test_a_truncated_file_is_detected_with_its_name(saved, tmp_path):
    path = copy_of(saved, tmp_path / "checkpoint_epoch0001_aa")
    target = os.path.join(path, "deepspeed", "state", "mp_rank_00_model_states.pt")
    size = os.path.getsize(target)
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"mp_rank_00_model_states\.pt is truncated"):
        ckpt.verify_checkpoint(FS, path)


def test_a_flipped_byte_is_detected(saved, tmp_path):
    path = copy_of(saved, tmp_path / "checkpoint_epoch0001_aa")
    target = os.path.join(path, ckpt.MODEL_WEIGHTS)
    data = bytearray(open(target, "rb").read())
    data[-3] ^= 0xFF
    open(target, "wb").write(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match="sha256 differs"):
        ckpt.verify_checkpoint(FS, path)


def test_a_missing_rank_is_detected(saved, tmp_path):
    path = copy_of(saved, tmp_path / "checkpoint_epoch0001_aa")
    meta_path = os.path.join(path, ckpt.LOOP_STATE)
    meta = json.load(open(meta_path))
    meta["world_size"] = 2  # as if rank 1 never finished its upload
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.verify_checkpoint(FS, path)  # loop_state.json no longer matches rank 0's checksum
    # and with rank 0's listing re-recorded, the absent rank-1 listing is what fails
    ckpt._write_checksums(path, rank=0, world_size=2)
    with pytest.raises(ckpt.CorruptCheckpointError, match="rank 1 checksum file .* is missing"):
        ckpt.verify_checkpoint(FS, path)


def test_resume_takes_the_newest_checkpoint_that_verifies(saved, tmp_path):
    run = tmp_path / "run"
    assert ckpt.find_resumable(FS, str(run), required=False).path is None  # a new run: nothing yet
    copy_of(saved, run / "checkpoint_epoch0001_aa")
    copy_of(saved, run / "checkpoint_epoch0002_bb")
    corrupt = copy_of(saved, run / "checkpoint_epoch0003_cc")
    partial = copy_of(saved, run / "checkpoint_epoch0004_dd")  # an upload its job's death cut short
    os.remove(os.path.join(corrupt, "deepspeed", "latest"))
    shutil.rmtree(os.path.join(partial, "checksums"))
    point = ckpt.find_resumable(FS, str(run), required=True)
    assert os.path.basename(point.path) == "checkpoint_epoch0002_bb" and point.meta["state"]["epoch"] == 1
    assert [line.split(":")[0] for line in point.skipped] == ["checkpoint_epoch0004_dd", "checkpoint_epoch0003_cc"]
    assert "rank 0 checksum file" in point.skipped[0] and "missing" in point.skipped[0]
    assert "deepspeed/latest" in point.skipped[1] and "missing" in point.skipped[1]

    complete = copy_of(saved, run / "checkpoint_epoch0005_ee")  # complete, though Ray never registered it
    assert ckpt.find_resumable(FS, str(run), required=True).path == complete

    for name in ("checkpoint_epoch0001_aa", "checkpoint_epoch0002_bb", "checkpoint_epoch0005_ee"):
        os.remove(os.path.join(run, name, ckpt.MODEL_WEIGHTS))
    nothing = ckpt.find_resumable(FS, str(run), required=False)
    assert nothing.path is None and len(nothing.skipped) == 5
    with pytest.raises(ckpt.CorruptCheckpointError, match="no checkpoint of run .* verifies") as err:
        ckpt.find_resumable(FS, str(run), required=True)
    assert [line.split(":")[0].strip() for line in str(err.value).splitlines()[1:]] == \
        [f"checkpoint_epoch000{i}_{c}" for i, c in ((5, "ee"), (4, "dd"), (3, "cc"), (2, "bb"), (1, "aa"))]


def test_a_checkpoint_left_in_staging_is_never_resumed_from_and_is_removed(saved, tmp_path):
    run = tmp_path / "run"
    copy_of(saved, run / "checkpoint_epoch0001_aa")
    copy_of(saved, run / (ckpt.STAGING_PREFIX + "checkpoint_epoch0002_bb"))  # complete files, never renamed
    assert os.path.basename(ckpt.find_resumable(FS, str(run), required=True).path) == "checkpoint_epoch0001_aa"
    assert ckpt.remove_staging(FS, str(run)) == [ckpt.STAGING_PREFIX + "checkpoint_epoch0002_bb"]
    assert sorted(os.listdir(run)) == ["checkpoint_epoch0001_aa"]
    assert ckpt.remove_staging(FS, str(tmp_path / "no-run-yet")) == []


def checkpoint_paths(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_rank_folders_merge_into_one_checkpoint_folder(tmp_path):
    staging = tmp_path / (ckpt.STAGING_PREFIX + "checkpoint_epoch0001_aa")
    for rank, shard in ((0, "zero_pp_rank_0_optim_states.pt"), (1, "zero_pp_rank_1_optim_states.pt")):
        mine = Path(ckpt.rank_folder(str(staging), rank))
        (mine / "deepspeed" / "state").mkdir(parents=True)
        (mine / "deepspeed" / "state" / shard).write_bytes(bytes([rank]) * 10)
        (mine / "deepspeed" / "latest").write_text("state")  # written by both ranks, the same
        ckpt._write_checksums(str(mine), rank, world_size=2)
    final = tmp_path / "checkpoint_epoch0001_aa"
    ckpt.merge_rank_folders(str(staging), 2, str(final))
    assert not staging.exists()
    assert checkpoint_paths(final) == ["checksums/rank-00000.json", "checksums/rank-00001.json", "deepspeed/latest",
                                       "deepspeed/state/zero_pp_rank_0_optim_states.pt",
                                       "deepspeed/state/zero_pp_rank_1_optim_states.pt"]
    listed = json.loads((final / "checksums" / "rank-00001.json").read_text())["files"]
    assert sorted(listed) == ["deepspeed/latest", "deepspeed/state/zero_pp_rank_1_optim_states.pt"]  # its own only


class _Payload:
    """Unpickling this runs os.mkdir(marker): what an attacker's checkpoint would do with a worse call."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_planted_malicious_pickle_is_refused_and_never_runs(saved, tmp_path, process_group):
    path = copy_of(saved, tmp_path / "checkpoint_epoch0001_aa")
    target = os.path.join(path, "deepspeed", "state", "mp_rank_00_model_states.pt")
    marker = str(tmp_path / "payload-ran")
    torch.save({"module": _Payload(marker)}, target)
    ckpt._write_checksums(path, rank=0, world_size=1)  # the attacker also forges the checksums
    ckpt.verify_checkpoint(FS, path)  # integrity alone cannot catch it

    with pytest.raises(ckpt.UnsafeCheckpointError, match="refused to load"):
        ckpt.load_into_engine(path, make_engine(0))
    with pytest.raises(ckpt.UnsafeCheckpointError):
        ckpt.safe_torch_load(target)
    assert not os.path.exists(marker)
    assert os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD") is None  # the guard is scoped

    torch.load(target, weights_only=False)  # what an unguarded loader does: the payload runs
    assert os.path.isdir(marker)
