"""GPU throughput of the paper-size models, where Ray may not even be installed; prints one JSON line
and writes bench/results/gpu.json.

1. teacher: resnet50 at 224 px (configs/paper.yaml), bf16 autocast, channels_last, batch 64: training
   images/s in a plain torch loop vs the DeepSpeed engine the framework trains through
   (`diffkd.train.deepspeed_config.build_engine`, one process, ZeRO stage --zero-stage).
2. diffusion training: the paper's denoiser UNet at 256 px (block_out_channels 64..512, two layers
   per block, attention at the lowest resolution, a mask channel, the condition vector added to the
   time embedding; built as `diffkd.models.diffusion.build_denoiser` builds it, minus the condition
   encoder's small MLP, whose output a random vector stands in for), v-prediction, bf16 autocast:
   optimizer steps/s.
3. sampling: 50-step DDIM with classifier-free guidance (two UNet passes per step) on that UNet:
   images/s.

Needs only torch, timm, diffusers and deepspeed (the framework's `diffkd.train.deepspeed_config`,
which imports nothing else); Ray is not used. Models are randomly initialised and inputs synthetic:
nothing is downloaded. Every timed part runs for about --seconds after a short warm-up, so the
whole bench stays within a few minutes on one GPU. `--smoke` shrinks every model and input so the
bench runs on a CPU in seconds (a test exercises it that way); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402


@dataclass
class EngineSettings:
    """The optimisation fields of the framework's LoopConfig that `build_engine` reads (paper values)."""

    engine: str = "deepspeed"
    zero_stage: int = 0
    precision: str = "bf16"
    batch_size: int = 64
    grad_accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0


@dataclass
class Sizes:
    teacher_arch: str = "resnet50"
    teacher_image: int = 224
    teacher_batch: int = 64
    unet_image: int = 256
    unet_channels: tuple[int, ...] = (64, 128, 256, 256, 512)
    unet_layers: int = 2
    unet_attention: bool = True
    condition_dim: int = 256  # the time-embedding width: 4 x the first block's channels
    unet_batch: int = 16
    sampling_batch: int = 32
    sampling_steps: int = 50


SMOKE = Sizes(teacher_arch="resnet18", teacher_image=32, teacher_batch=4, unet_image=32, unet_channels=(32, 64),
              unet_layers=1, unet_attention=True, condition_dim=128, unet_batch=2, sampling_batch=2, sampling_steps=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(step: Callable[[], None], items_per_step: int, device: torch.device, seconds: float,
         warmup: int = 3, min_steps: int = 3) -> dict:
    """Items/s of `step` over about `seconds` after `warmup` untimed calls (the GPU synchronised at both ends)."""
    for _ in range(warmup):
        step()
    sync(device)
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < seconds:
        step()
        steps += 1
        if steps % 5 == 0:
            sync(device)  # queued kernels count against the clock
    sync(device)
    elapsed = time.perf_counter() - start
    return {"per_s": items_per_step * steps / elapsed, "steps": steps, "seconds": round(elapsed, 2)}


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ---- 1. teacher: plain torch vs the DeepSpeed engine ------------------------------------------------

def teacher(sizes: Sizes, device: torch.device, bf16: bool, zero_stage: int, seconds: float) -> dict:
    import timm

    from diffkd.train.deepspeed_config import build_engine, build_optimizer

    settings = EngineSettings(zero_stage=zero_stage, batch_size=sizes.teacher_batch,
                              precision="bf16" if bf16 else "fp32")
    images = torch.randn(sizes.teacher_batch, 1, sizes.teacher_image, sizes.teacher_image, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (sizes.teacher_batch,), device=device)

    def model(memory_format: torch.memory_format = torch.channels_last) -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(sizes.teacher_arch, pretrained=False, in_chans=1, num_classes=2).to(
            device, memory_format=memory_format)

    plain = model()
    optimizer = build_optimizer(plain, settings)

    def plain_step() -> None:
        with autocast(device, bf16):
            loss = nn.functional.cross_entropy(plain(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(plain.parameters(), settings.grad_clip)
        optimizer.step()

    plain_rate = rate(plain_step, sizes.teacher_batch, device, seconds)
    del plain, optimizer
    # DeepSpeed's start-up broadcast views every weight as bytes, which channels_last weights refuse: the
    # engine gets contiguous weights and converts them in place afterwards. At ZeRO >= 1 the weights
    # live in DeepSpeed's flat buffers and must stay as they are.
    engine = build_engine(model(torch.contiguous_format), settings, 1, total_steps=10_000, device=device)
    engine_channels_last = zero_stage == 0
    if engine_channels_last:
        engine.module.to(memory_format=torch.channels_last)

    def engine_step() -> None:
        loss = nn.functional.cross_entropy(engine(images), labels)
        engine.backward(loss)
        engine.step()

    engine_rate = rate(engine_step, sizes.teacher_batch, device, seconds)
    del engine
    return {"arch": sizes.teacher_arch, "image_size": sizes.teacher_image, "batch": sizes.teacher_batch,
            "zero_stage": zero_stage, "deepspeed_channels_last": engine_channels_last,
            "plain_torch_images_per_s": round(plain_rate["per_s"], 1),
            "deepspeed_images_per_s": round(engine_rate["per_s"], 1),
            "deepspeed_vs_plain": round(engine_rate["per_s"] / plain_rate["per_s"], 3)}


# ---- 2./3. the diffusion UNet: training steps and DDIM sampling -------------------------------------

def denoiser(sizes: Sizes, device: torch.device) -> nn.Module:
    from diffusers import UNet2DModel

    n = len(sizes.unet_channels)
    attention = sizes.unet_attention
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sizes.unet_image, in_channels=2, out_channels=1,  # image + lesion-mask channel
        block_out_channels=sizes.unet_channels, layers_per_block=sizes.unet_layers,
        down_block_types=tuple("AttnDownBlock2D" if attention and i == n - 1 else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("AttnUpBlock2D" if attention and i == 0 else "UpBlock2D" for i in range(n)),
        add_attention=attention, class_embed_type="identity", norm_num_groups=min(32, sizes.unet_channels[0]),
    ).to(device)


def schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    config = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return DDPMScheduler(**config), DDIMScheduler(**config)


def diffusion_training(sizes: Sizes, device: torch.device, bf16: bool, seconds: float) -> dict:
    unet = denoiser(sizes, device).train()
    train_scheduler, _ = schedulers()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.0)
    b, size = sizes.unet_batch, sizes.unet_image
    clean = torch.randn(b, 1, size, size, device=device)
    mask = (torch.rand(b, 1, size, size, device=device) > 0.9).float()
    condition = torch.randn(b, sizes.condition_dim, device=device)
    alphas = train_scheduler.alphas_cumprod.to(device)

    def step() -> None:
        noise = torch.randn_like(clean)
        t = torch.randint(0, 1000, (b,), device=device)
        a = alphas[t].sqrt()[:, None, None, None]
        s = (1 - alphas[t]).sqrt()[:, None, None, None]
        noisy, target = a * clean + s * noise, a * noise - s * clean  # v-prediction
        with autocast(device, bf16):
            pred = unet(torch.cat([noisy, mask], dim=1), t, class_labels=condition).sample
        loss = nn.functional.mse_loss(pred.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

    measured = rate(step, 1, device, seconds)
    params = sum(p.numel() for p in unet.parameters())
    return {"image_size": size, "batch": b, "block_out_channels": list(sizes.unet_channels), "params": params,
            "train_steps_per_s": round(measured["per_s"], 3),
            "train_images_per_s": round(measured["per_s"] * b, 1)}


@torch.no_grad()
def ddim_sampling(sizes: Sizes, device: torch.device, bf16: bool, seconds: float, guidance: float = 2.0) -> dict:
    unet = denoiser(sizes, device).eval()
    _, scheduler = schedulers()
    b, size = sizes.sampling_batch, sizes.unet_image
    mask = (torch.rand(b, 1, size, size, device=device) > 0.9).float()
    condition = torch.randn(b, sizes.condition_dim, device=device)
    null = torch.zeros_like(condition)  # classifier-free guidance: the dropped condition

    def sample() -> None:
        scheduler.set_timesteps(sizes.sampling_steps)
        x = torch.randn(b, 1, size, size, device=device)
        for t in scheduler.timesteps:
            both = torch.cat([x, x]), torch.cat([mask, mask])
            with autocast(device, bf16):
                out = unet(torch.cat(both, dim=1), t.to(device), class_labels=torch.cat([condition, null])).sample
            cond, uncond = out.float().chunk(2)
            x = scheduler.step(uncond + guidance * (cond - uncond), t, x).prev_sample

    measured = rate(sample, b, device, seconds, warmup=1, min_steps=1)
    return {"image_size": size, "batch": b, "steps": sizes.sampling_steps, "guidance": "cfg (2 UNet passes)",
            "images_per_s": round(measured["per_s"], 3), "runs": measured["steps"]}


def init_process_group(device: torch.device) -> None:
    """A one-process group for DeepSpeed (nothing to talk to: the port is only bound locally)."""
    import torch.distributed as dist

    from diffkd.train.deepspeed_config import prepare_deepspeed

    prepare_deepspeed(device.type == "cuda")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)  # what a launcher would set; DeepSpeed checks for them
    if not dist.is_initialized():
        with tempfile.NamedTemporaryFile(prefix="diffkd-gpu-bench-", delete=False) as f:
            rendezvous = f"file://{f.name}"
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=rendezvous, rank=0,
                                world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and inputs: a CPU smoke run")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per measurement")
    parser.add_argument("--zero-stage", type=int, default=0, help="DeepSpeed ZeRO stage of the teacher engine")
    parser.add_argument("--only", default="teacher,diffusion_train,sampling", help="comma-separated parts")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        parser.error("no CUDA device: this bench measures a GPU (use --smoke to exercise it on a CPU)")
    sizes = SMOKE if args.smoke else Sizes()
    seconds = min(args.seconds, 1.0) if args.smoke else args.seconds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"  # bf16 on CPU is slow and not what the paper setting measures
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_num_threads(1)
    parts = set(args.only.split(","))
    started = time.perf_counter()
    result: dict = {"bench": "gpu", "smoke": args.smoke, "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda" else "cpu", "precision": "bf16 autocast" if bf16 else "fp32",
                    "torch": torch.__version__, "ray_used": False}
    try:
        import ray  # noqa: F401  recorded only: nothing here needs it
        result["ray_installed"] = True
    except ImportError:
        result["ray_installed"] = False
    if "teacher" in parts:
        init_process_group(device)
        result["teacher"] = teacher(sizes, device, bf16, args.zero_stage, seconds)
    if "diffusion_train" in parts:
        result["diffusion_train"] = diffusion_training(sizes, device, bf16, seconds)
    if "sampling" in parts:
        result["ddim_sampling"] = ddim_sampling(sizes, device, bf16, seconds)
    result["seconds"] = round(time.perf_counter() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
