"""The loop's two engines follow the same training rules: one process, no Ray.

`engine: ddp` must train exactly like DeepSpeed at ZeRO stage 0 (optimizer, warm-up + cosine
schedule, clipping, gradient accumulation), and DeepSpeed with one worker skips its gradient
all-reduce without changing what it computes.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffkd.train.deepspeed_config import build_engine
from diffkd.train.loop_config import LoopConfig


def trajectory(engine_name: str, steps: int = 12) -> tuple[list[float], list[float], object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = LoopConfig(engine=engine_name, lr=0.05, grad_clip=0.5, grad_accum_steps=2, warmup_fraction=0.3)
    engine = build_engine(model, cfg, world_size=1, total_steps=steps // 2, device=torch.device("cpu"))
    data = torch.Generator().manual_seed(1)
    losses, lrs = [], []
    for _ in range(steps):
        x, y = torch.randn(16, 8, generator=data), torch.randint(0, 2, (16,), generator=data)
        loss = nn.functional.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        lrs.append(engine.get_lr()[0])
    return losses, lrs, engine


def test_ddp_and_deepspeed_engines_train_alike_and_one_deepspeed_worker_skips_the_all_reduce(process_group):
    ddp_losses, ddp_lrs, ddp = trajectory("ddp")
    ds_losses, ds_lrs, ds = trajectory("deepspeed")
    assert ds.enable_backward_allreduce is False
    assert ddp.global_steps == ds.global_steps == 6
    assert ddp_lrs == pytest.approx(ds_lrs, rel=1e-6)
    assert ddp_losses == pytest.approx(ds_losses, rel=1e-5)
    assert ddp_losses[-1] < ddp_losses[0]


def test_ddp_engine_checkpoint_restores_weights_optimizer_and_schedule(process_group, tmp_path):
    _, _, trained = trajectory("ddp", steps=6)
    trained.save_checkpoint(str(tmp_path), tag="state")
    _, _, fresh = trajectory("ddp", steps=2)
    path, _ = fresh.load_checkpoint(str(tmp_path), tag="state")
    assert path is not None and fresh.global_steps == trained.global_steps
    assert fresh.get_lr() == trained.get_lr()
    for a, b in zip(fresh.module.parameters(), trained.module.parameters()):
        assert torch.equal(a, b)
    assert fresh.load_checkpoint(str(tmp_path), tag="elsewhere")[0] is None
