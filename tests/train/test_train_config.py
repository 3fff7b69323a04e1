"""The generated DeepSpeed config, the optimizer groups, and the progress lines (no Ray, no DeepSpeed engine)."""
from __future__ import annotations

import io

import json

import pytest
import torch
from torch import nn

from diffkd.config import ConfigError, from_dict
from diffkd.runtime.console import WORKER_STATUS_TAG, worker_line
from diffkd.train.deepspeed_config import build_optimizer, deepspeed_config, optimizer_steps, resolve_precision
from diffkd.train.loop import epoch_seed
from diffkd.train.loop_config import LoopConfig
from diffkd.train.progress import Progress, format_duration


def test_batch_arithmetic_zero_stage_and_schedule():
    cfg = LoopConfig(batch_size=16, grad_accum_steps=4, zero_stage=3, grad_clip=0.5, warmup_fraction=0.1,
                     min_lr_ratio=0.02)
    ds = deepspeed_config(cfg, world_size=2, use_gpu=False, total_steps=200)
    assert ds["train_batch_size"] == 16 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["zero_optimization"] == {"stage": 3}
    assert ds["gradient_clipping"] == 0.5 and ds["zero_force_ds_cpu_optimizer"] is False
    params = ds["scheduler"]["params"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert params["total_num_steps"] == 200 and params["warmup_num_steps"] == 20 and params["cos_min_ratio"] == 0.02
    assert "torch_autocast" not in ds and "bf16" not in ds  # fp32 on CPU
    assert optimizer_steps(epochs=3, batches_per_epoch=10, grad_accum_steps=4) == 9
    short = deepspeed_config(LoopConfig(warmup_fraction=0.05), world_size=1, use_gpu=False, total_steps=6)
    assert short["scheduler"]["params"]["warmup_num_steps"] == 1  # 5% of 6 steps rounds to 0, which DeepSpeed refuses


def test_bf16_on_gpu_means_autocast_and_bad_values_are_refused():
    gpu = deepspeed_config(LoopConfig(), world_size=1, use_gpu=True, total_steps=10)
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert resolve_precision("auto", use_gpu=False) == "fp32" and resolve_precision("bf16", use_gpu=False) == "bf16"
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16", use_gpu=True)
    with pytest.raises(ValueError, match="zero_stage must be"):
        deepspeed_config(LoopConfig(zero_stage=4), world_size=1, use_gpu=False, total_steps=10)


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    optimizer = build_optimizer(model, LoopConfig(weight_decay=0.1, lr=3e-4))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_placement_strategy_is_one_of_rays():
    assert LoopConfig(placement_strategy="SPREAD").placement_strategy == "SPREAD"
    with pytest.raises(ValueError, match="placement_strategy 'spread' must be one of PACK, SPREAD"):
        LoopConfig(placement_strategy="spread")


def test_loop_config_from_yaml_rejects_typos():
    cfg = from_dict(LoopConfig, {"num_workers": 2, "zero_stage": 2, "cpus_per_worker": 0.5})
    assert cfg.num_workers == 2 and cfg.cpus_per_worker == 0.5
    with pytest.raises(ConfigError, match="zero_stag"):
        from_dict(LoopConfig, {"zero_stag": 2})


def test_epoch_seeds_differ_by_epoch_and_rank_and_repeat_exactly():
    seeds = {epoch_seed(0, e, r) for e in range(1, 50) for r in range(4)}
    assert len(seeds) == 49 * 4
    assert epoch_seed(3, 7, 1) == epoch_seed(3, 7, 1)


def test_progress_prints_each_epoch_with_samples_per_second_and_time_left():
    out = io.StringIO()
    progress = Progress("teacher", total_epochs=10, batches_per_epoch=100, interval_s=1e9, out=out)
    progress.start_epoch(3)
    line = progress.end_epoch({"loss": 0.51234, "val_auc": 0.7312, "val_loss": 0.6, "samples_per_s": 412.3,
                               "epoch": 3, "lr": 1e-3}, improved=True, objective="val_auc")
    assert out.getvalue() == worker_line(line) + "\n"  # tagged for the driver's console
    assert line.startswith("[teacher] epoch 3/10  loss 0.5123  val_auc 0.7312*  val_loss 0.6000")
    assert "412.3 samples/s" in line and "ETA" in line and "lr" not in line.split("samples/s")[0]


def test_progress_beats_inside_long_epochs():
    out = io.StringIO()
    progress = Progress("diffusion", total_epochs=2, batches_per_epoch=50, interval_s=0.0, out=out)
    progress.start_epoch(1)
    progress.step(32, 0.9)
    progress.step(32, 0.7)
    beats = [beat.removeprefix(WORKER_STATUS_TAG) for beat in out.getvalue().splitlines()]
    assert len(beats) == 2 and beats[-1].startswith("[diffusion] epoch 1/2  [#")
    assert "step 2/50  loss 0.8000" in beats[-1]
    assert "epoch ends in" in beats[-1]


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (65, "1m05s"), (3725, "1h02m"), (-1, "0s")])
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


def test_best_epoch_ties_go_to_the_later_epoch_but_only_gains_reset_patience():
    from diffkd.train.checkpoint import LoopState
    from diffkd.train.loop import _update_best

    state = LoopState()
    marks = [_update_best(state, {"epoch": e, "val_auc": v}, "val_auc", "max", f"ck{e}", patience=2)
             for e, v in [(1, 0.70), (2, 0.80), (3, 0.80), (4, 0.75)]]
    assert marks == [True, True, True, False]
    assert (state.best_epoch, state.best_checkpoint, state.best_value) == (3, "ck3", 0.80)
    assert state.epochs_since_best == 2 and state.stopped_early  # 3 tied, 4 fell: no gain for 2 epochs
    nan_state = LoopState()
    metrics = {"epoch": 1, "val_loss": float("nan")}
    _update_best(nan_state, metrics, "val_loss", "min", "ck1", patience=0)
    assert metrics["val_loss"] == float("inf") and not nan_state.stopped_early  # ranks last, never stops


def test_burn_in_epochs_are_never_kept_and_never_stop_the_run():
    from diffkd.train.checkpoint import LoopState
    from diffkd.train.loop import SELECTION_SCORE, _update_best

    state, scores = LoopState(), []
    for epoch, auc in [(1, 0.9), (2, 0.6), (3, 0.5), (4, 0.7), (5, 0.65), (6, 0.64)]:
        metrics = {"epoch": epoch, "val_auc": auc}
        _update_best(state, metrics, "val_auc", "max", f"ck{epoch}", patience=2, min_epochs=3)
        scores.append(metrics[SELECTION_SCORE])
        if epoch == 2:  # the lucky first epoch is not kept, and no stop during burn-in
            assert state.best_epoch == 2 and not state.stopped_early
    assert (state.best_epoch, state.best_value) == (4, 0.7)  # epoch 3 (0.5) beat the burn-in, then 4
    assert state.stopped_early  # patience counts from the burn-in's end: 5 and 6 did not beat 4
    assert scores[2:] == [0.5, 0.7, 0.65, 0.64]  # what Ray ranks
    # burn-in scores rank below any real one and survive the JSON snapshot Ray resumes from
    assert all(s < -1e300 for s in scores[:2]) and json.loads(json.dumps(scores))[:2] == scores[:2]
    nan_metrics = {"epoch": 4, "val_auc": float("nan")}
    _update_best(LoopState(), nan_metrics, "val_auc", "max", "ck4", patience=0)
    assert json.loads(json.dumps(nan_metrics[SELECTION_SCORE], allow_nan=False)) < -1e300
    last = LoopState()
    for epoch, auc in [(1, 0.9), (2, 0.8), (3, 0.6)]:  # min_epochs = epochs: the last epoch is kept
        _update_best(last, {"epoch": epoch, "val_auc": auc}, "val_auc", "max", f"ck{epoch}", patience=0,
                     min_epochs=3)
    assert last.best_epoch == 3
    with pytest.raises(ValueError, match="min_epochs"):
        LoopConfig(min_epochs=-1)
    LoopConfig(epochs=10, min_epochs=30)  # a search that shortens the schedule keeps its last epoch


def test_engine_auto_trains_zero_stage_0_with_ddp_and_sharding_stages_with_deepspeed():
    assert LoopConfig().engine == "auto" and LoopConfig().resolved_engine == "ddp"
    assert [LoopConfig(zero_stage=stage).resolved_engine for stage in (1, 2, 3)] == ["deepspeed"] * 3
    assert LoopConfig(engine="deepspeed").resolved_engine == "deepspeed"  # still selectable at stage 0
    assert LoopConfig(engine="ddp").resolved_engine == "ddp"
