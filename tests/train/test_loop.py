"""The one training loop through Ray Train + DeepSpeed on CPU: learning, per-rank shards, resume,
corrupt checkpoints, dead workers and a stopped job.

A tiny MLP task on Gaussian data keeps each run to seconds of compute; what is under test is the
loop (workers, ZeRO, checkpoints, restarts), which is the same for every stage.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import ray.cloudpickle
from diffkd.train import checkpoint as ckpt
from diffkd.train.loop import FitResult, RunExistsError, fit
from diffkd.train.loop_config import LoopConfig
from diffkd.train.task import StepOutput, Task

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


@dataclass
class TinyConfig:
    features: int = 8
    hidden: int = 32
    marker_dir: str = ""  # when set: each worker writes its pid and its step count there
    step_sleep_s: float = 0.0  # stretches epochs so a test can act mid-epoch


class TinyTask(Task):
    name = "tiny"
    objective = "val_auc"
    mode = "max"

    def __init__(self, config: TinyConfig = TinyConfig()):
        self.config = config
        self._steps = 0

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.config.features, self.config.hidden), nn.ReLU(),
                             nn.Linear(self.config.hidden, 2))

    def setup(self, device) -> None:
        if self.config.marker_dir:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
            with open(os.path.join(self.config.marker_dir, f"pid-{rank}"), "w") as f:
                f.write(str(os.getpid()))
            self._step_file = os.path.join(self.config.marker_dir, f"steps-{rank}")

    def step(self, model: nn.Module, batch: dict) -> StepOutput:
        logits = model(batch["x"])
        loss = nn.functional.cross_entropy(logits, batch["label"])
        if self.config.marker_dir:
            self._steps += 1
            with open(self._step_file, "w") as f:
                f.write(str(self._steps))
            time.sleep(self.config.step_sleep_s)
        return StepOutput(loss, int(batch["label"].shape[0]))

    def evaluate(self, model: nn.Module, batches) -> dict:
        from sklearn.metrics import roc_auc_score

        probs, labels = [], []
        for batch in batches:
            probs.append(torch.softmax(model(batch["x"]).float(), 1)[:, 1])
            labels.append(batch["label"])
        return {"val_auc": float(roc_auc_score(torch.cat(labels).numpy(), torch.cat(probs).numpy()))}


def rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    return [{"x": x[i], "label": y[i], "case_id": f"c{seed}-{i}"} for i in range(n)]


def datasets(n_train: int = 384, n_val: int = 128) -> dict:
    return {"train": ray.data.from_items(rows(n_train, 0)), "val": ray.data.from_items(rows(n_val, 1))}


def loop_config(tmp_path, name: str, **overrides) -> LoopConfig:
    base = dict(num_workers=2, zero_stage=2, epochs=3, batch_size=16, lr=1e-2, cpus_per_worker=1.0,
                storage_path=str(tmp_path / "runs"), run_name=name, max_failures=0, progress_interval_s=1e9)
    base.update(overrides)
    return LoopConfig(**base)


def checkpoint_files(path: str) -> list[str]:
    return sorted(os.path.relpath(p, path) for p in glob.glob(os.path.join(path, "**"), recursive=True)
                  if os.path.isfile(p))


# ---- (a) two workers learn; per-rank ZeRO shards are kept apart --------------------------------

@pytest.fixture(scope="module")
def zero2_run(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    cfg = loop_config(tmp, "zero2")
    return tmp, cfg, fit(TinyTask(), datasets(), cfg)


def test_two_workers_with_zero2_learn_and_keep_their_shards_apart(zero2_run):
    tmp, cfg, result = zero2_run
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    assert result.history[-1]["val_auc"] > 0.85
    assert result.best_checkpoint and result.best_epoch == max(result.history, key=lambda h: h["val_auc"])["epoch"]

    files = checkpoint_files(result.latest_checkpoint)
    for rank in (0, 1):
        assert f"deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
        assert f"checksums/rank-0000{rank}.json" in files
    assert "model.safetensors" in files and "loop_state.json" in files

    model = result.load_model(TinyTask())  # the gathered weights alone make a working model
    val = rows(128, 1)
    x = torch.tensor(np.stack([r["x"] for r in val]))
    y = np.array([r["label"] for r in val])
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        auc = roc_auc_score(y, torch.softmax(model(x), 1)[:, 1].numpy())
    assert auc == pytest.approx(result.best_metrics["val_auc"], abs=1e-6)


def test_reusing_a_run_name_needs_resume(zero2_run):
    tmp, cfg, _ = zero2_run
    with pytest.raises(RunExistsError, match="already exists.*resume"):
        fit(TinyTask(), datasets(), cfg)
    missing = loop_config(tmp, "never-ran", resume=True)
    with pytest.raises(ValueError, match="cannot resume run 'never-ran'"):
        fit(TinyTask(), datasets(), missing)


# ---- (d) a corrupt latest checkpoint: detected, and the previous good one used ----------------

def test_resume_skips_a_truncated_latest_checkpoint(zero2_run):
    tmp, cfg, first = zero2_run
    shard = os.path.join(first.latest_checkpoint, "deepspeed", "state", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 3)
    run_dir = os.path.dirname(first.latest_checkpoint)
    assert not [n for n in os.listdir(run_dir) if n.startswith(ckpt.STAGING_PREFIX)]  # renamed once complete
    # a checkpoint being written in place when its job died: complete files, but never renamed
    shutil.copytree(first.latest_checkpoint, os.path.join(run_dir, ckpt.STAGING_PREFIX + "checkpoint_epoch0003_ff"))

    resumed = fit(TinyTask(), datasets(), loop_config(tmp, "zero2", epochs=4, resume=True))
    assert not [n for n in os.listdir(run_dir) if n.startswith(ckpt.STAGING_PREFIX)]  # removed, never resumed from
    restart = resumed.restarts[-1]
    assert restart["from"].startswith("checkpoint_epoch0002_") and restart["epoch"] == 2
    assert len(restart["skipped"]) == 1 and os.path.basename(first.latest_checkpoint) in restart["skipped"][0]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated" in restart["skipped"][0]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[:2] == first.history[:2]  # the good epochs are kept as they were
    assert resumed.history[-1]["val_auc"] > 0.85


def test_checkpoints_reach_an_object_store_by_upload_and_resume_from_it(ray_local, tmp_path):
    """Storage that is not the local filesystem gets each checkpoint from a local folder by upload (a
    SubTreeFileSystem stands in for an object store: local bytes, another filesystem type)."""
    import pyarrow.fs as pafs

    bucket = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    settings = dict(num_workers=1, engine="ddp", zero_stage=0, storage_path=(bucket, "runs"))
    fit(TinyTask(), datasets(), loop_config(tmp_path, "uploaded", epochs=1, **settings))
    resumed = fit(TinyTask(), datasets(), loop_config(tmp_path, "uploaded", epochs=2, resume=True, **settings))
    assert [h["epoch"] for h in resumed.history] == [1, 2] and len(resumed.restarts) == 1
    run_dir = tmp_path / "bucket" / "runs" / "uploaded"
    names = sorted(p.name for p in run_dir.iterdir() if p.is_dir())
    assert [n.split("_")[1] for n in names] == ["epoch0001", "epoch0002"]
    for name in names:
        ckpt.verify_checkpoint(bucket, f"runs/uploaded/{name}")


# ---- engine "ddp": plain torch DDP inside Ray Train, and the loop's timing fields ------------------

def test_ddp_engine_learns_checkpoints_resumes_and_records_where_epoch_time_goes(ray_local, tmp_path):
    from diffkd.train.loop import epoch_wall_seconds

    cfg = loop_config(tmp_path, "ddp", engine="ddp", zero_stage=0, epochs=2)
    first = fit(TinyTask(), datasets(), cfg)
    assert "deepspeed/state/ddp_state.pt" in checkpoint_files(first.latest_checkpoint)
    resumed = fit(TinyTask(), datasets(), loop_config(tmp_path, "ddp", engine="ddp", zero_stage=0, epochs=3,
                                                      resume=True))
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["val_auc"] > 0.85
    assert resumed.history[-1]["global_step"] == 3 * (384 // 2 // 16)  # the step count continued

    for h in resumed.history:
        assert 0 < h["first_batch_s"] <= h["data_wait_s"] <= h["train_s"]
        assert h["val_s"] > 0 and h["startup_s"] > 0  # validation; fit to the first epoch of that call
    walls = epoch_wall_seconds(first.history)
    assert len(walls) == 1 and walls[0] > first.history[0]["train_s"]  # validation, checkpoint and report too


def test_a_weight_average_is_validated_saved_and_resumed(ray_local, tmp_path):
    """With `ema_decay` the loop validates the average of the weights, writes it as the checkpoint's model
    weights (what a stage exports) and takes it up again on resume; the raw training state is untouched."""
    from sklearn.metrics import roc_auc_score

    settings = dict(num_workers=1, zero_stage=0, epochs=1)
    plain = fit(TinyTask(), datasets(), loop_config(tmp_path, "plain", **settings))
    averaged = fit(TinyTask(), datasets(), loop_config(tmp_path, "ema", ema_decay=0.9, **settings))
    # the same raw training (same seed, same steps): only what is validated and saved differs
    assert [h["loss"] for h in averaged.history] == pytest.approx([h["loss"] for h in plain.history])
    weights, raw = averaged.state_dict("latest"), plain.state_dict("latest")
    assert not torch.allclose(weights["0.weight"], raw["0.weight"])
    # the AUC validation recorded is the saved average's (a rank statistic: the raw weights may tie with it)
    model = averaged.load_model(TinyTask(), "latest")
    val = rows(128, 1)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor(np.stack([r["x"] for r in val]))), 1)[:, 1]
    assert roc_auc_score([r["label"] for r in val], probs.numpy()) == pytest.approx(averaged.history[-1]["val_auc"])
    resumed = fit(TinyTask(), datasets(), loop_config(tmp_path, "ema", ema_decay=0.9, resume=True,
                                                      **{**settings, "epochs": 2}))
    assert [h["epoch"] for h in resumed.history] == [1, 2] and resumed.history[-1]["val_auc"] > 0.85


def test_ddp_engine_refuses_zero_stages():
    with pytest.raises(ValueError, match="engine 'ddp' cannot shard"):
        LoopConfig(engine="ddp", zero_stage=1)
    with pytest.raises(ValueError, match="loop.engine 'horovod'"):
        LoopConfig(engine="horovod")


# ---- slow: ZeRO-3, a killed worker, a stopped job ------------------------------------------------

@pytest.mark.slow
def test_two_workers_with_zero3_learn_and_export_full_weights(ray_local, tmp_path):
    result = fit(TinyTask(), datasets(), loop_config(tmp_path, "zero3", zero_stage=3))
    assert result.history[-1]["loss"] < 0.8 * result.history[0]["loss"]
    assert result.history[-1]["val_auc"] > 0.85
    files = checkpoint_files(result.latest_checkpoint)
    for rank in (0, 1):  # under ZeRO-3 even the parameters are partitioned per rank
        assert f"deepspeed/state/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" in files
    weights = result.state_dict()
    assert {k: tuple(v.shape) for k, v in weights.items()} == \
        {k: tuple(v.shape) for k, v in TinyTask().build_model().state_dict().items()}


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def _completed_checkpoints(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "checkpoint_epoch*", "checksums", "rank-00000.json")))


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_last_checkpoint(ray_local, tmp_path):
    reference = fit(TinyTask(), datasets(), loop_config(tmp_path, "reference", epochs=4))
    markers = tmp_path / "markers"
    markers.mkdir()
    task = TinyTask(TinyConfig(marker_dir=str(markers), step_sleep_s=0.05))
    cfg = loop_config(tmp_path, "killed", epochs=4, max_failures=1)
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=fit(task, datasets(), cfg)))
    runner.start()
    run_dir = str(tmp_path / "runs" / "killed")
    _wait_for(lambda: len(_completed_checkpoints(run_dir)) >= 1, 300, "the first checkpoint")
    steps_file = markers / "steps-1"
    start = int(steps_file.read_text() or 0)
    _wait_for(lambda: int(steps_file.read_text() or 0) >= start + 3, 120, "rank 1 to be inside epoch 2")
    victim = int((markers / "pid-1").read_text())
    os.kill(victim, signal.SIGKILL)
    runner.join(timeout=600)
    assert not runner.is_alive(), "the run did not finish after the worker was killed"
    result: FitResult = outcome["result"]
    assert len(result.restarts) == 1 and result.restarts[0]["epoch"] >= 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert int((markers / "pid-1").read_text()) != victim  # a new worker process took over
    assert result.history[-1]["val_auc"] == pytest.approx(reference.history[-1]["val_auc"], abs=0.03)
    assert result.history[-1]["loss"] == pytest.approx(reference.history[-1]["loss"], rel=0.15)


def _remove_orphaned_placement_groups(before: set) -> None:
    """A killed driver leaves its Train placement group behind (Ray's cleaner needs the dashboard)."""
    import ray.util
    from ray.util.placement_group import PlacementGroup

    for pg_id, info in ray.util.placement_group_table().items():
        if pg_id not in before and info["state"] != "REMOVED":
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))


@pytest.mark.slow
def test_a_stopped_job_resumes_under_its_name_and_matches_an_uninterrupted_run(ray_local, tmp_path):
    import ray.util

    deterministic = dict(num_workers=1, zero_stage=0, epochs=4, shuffle_buffer=64)
    reference = fit(TinyTask(), datasets(), loop_config(tmp_path, "whole", **deterministic))

    before = set(ray.util.placement_group_table())
    cfg = loop_config(tmp_path, "stopped", **deterministic)
    driver = ray.remote(num_cpus=0)(fit).remote(TinyTask(), datasets(), cfg)
    run_dir = str(tmp_path / "runs" / "stopped")
    _wait_for(lambda: len(_completed_checkpoints(run_dir)) >= 2, 300, "two checkpoints")
    ray.cancel(driver, force=True)  # the job's driver dies; its Train controller and workers go with it
    with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
        ray.get(driver, timeout=120)
    stopped_at = len(_completed_checkpoints(run_dir))
    assert stopped_at < 4, "the job finished before it could be stopped; lengthen it"
    time.sleep(2)
    _remove_orphaned_placement_groups(before)

    resumed = fit(TinyTask(), datasets(), loop_config(tmp_path, "stopped", resume=True, **deterministic))
    # it continued from a checkpoint (the newest one Ray had registered when the driver died)
    assert len(resumed.restarts) == 1 and 1 <= resumed.restarts[0]["epoch"] <= stopped_at
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    final, expected = resumed.state_dict("latest"), reference.state_dict("latest")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert json.dumps([h["loss"] for h in resumed.history]) == json.dumps([h["loss"] for h in reference.history])
