"""What the shared Ray Train + DeepSpeed loop costs, measured side by side in one run; prints one JSON line.

1. overhead: samples/s of the teacher step (same timm model, batch size, data, AdamW, clipping, LR
   schedule) in `diffkd.train.loop.fit` with 1 worker vs a plain single-process torch loop.
   Target: ratio >= 0.95.
2. scaling: the same `fit` with 2 workers vs 1 worker, one torch thread each (global samples/s).
   Target: >= 1.8x.

Steady state only: the first epoch of every run is warm-up and not counted (the JSON lists the rate of
each counted epoch; ratios use their means); the loop's samples/s covers
the training phase of an epoch (the data feed included, validation and checkpointing not). Both sides
use one intra-op thread per process. On a shared machine wall-clock rates move with the load of other
processes (`load_avg_1m` is recorded), so the same rates per CPU second of the training processes are
reported beside them: their ratio is the work Ray Train + DeepSpeed add per sample, and
`cpu_efficiency_2w_vs_1w` near 1 means two workers would scale ~2x given two free cores. (Ray Data's
own tasks and actors are not in the CPU figures.)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def make_rows(n: int, image_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 1, (n, 1, image_size, image_size)).astype(np.float32)
    images[labels == 1, :, image_size // 4: image_size // 2, image_size // 4: image_size // 2] += 1.0
    return [{"image": images[i], "label": np.int64(labels[i]), "case_id": f"b{i}"} for i in range(n)]


def plain_torch(task, rows: list[dict], cfg, epochs: int) -> tuple[list[float], list[float]]:
    """The same step in a plain single-process torch loop (AdamW, clipping, warmup + cosine LR, the task's
    after-step hook): samples per wall-clock second and per CPU second of each epoch after the first."""
    from diffkd.train.deepspeed_config import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    model = task.build_model().train()
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = len(rows) // cfg.batch_size
    total = epochs * steps_per_epoch
    warmup = max(1, int(cfg.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / total)))))
    tensors = {k: torch.from_numpy(np.stack([r[k] for r in rows]))
               for k, v in rows[0].items() if isinstance(v, (np.ndarray, np.generic))}  # ids stay out
    rates, cpu_rates = [], []
    for _ in range(epochs):
        order = torch.randperm(len(rows))
        start, cpu_start = time.perf_counter(), time.process_time()
        samples = 0
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            out = task.step(model, {k: v[idx] for k, v in tensors.items()})
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            schedule.step()
            task.after_optimizer_step(model)
            samples += out.num_samples
        rates.append(samples / (time.perf_counter() - start))
        cpu_rates.append(samples / (time.process_time() - cpu_start))
    return rates[1:], cpu_rates[1:]


def through_loop(task, rows: list[dict], cfg) -> tuple[list[float], list[float]]:
    """`fit` on the same rows: samples per wall-clock second and per worker CPU second, epochs after the first."""
    import ray.data

    from diffkd.train.loop import fit

    result = fit(task, {"train": ray.data.from_items(rows)}, cfg)
    counted = result.history[1:]
    samples = len(rows) // cfg.num_workers // cfg.batch_size * cfg.batch_size * cfg.num_workers
    return [h["samples_per_s"] for h in counted], [samples / h["train_cpu_s"] for h in counted]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per worker and epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is warm-up")
    args = parser.parse_args()

    from diffkd.data.pipeline import PipelineConfig
    from diffkd.raycompat import init_local
    from diffkd.train.loop_config import LoopConfig
    from diffkd.train.teacher import TeacherConfig, TeacherTask

    workdir = tempfile.mkdtemp(prefix="dkb", dir="/tmp")  # short: Ray's socket paths are length-limited
    try:
        init_local(num_cpus=4, temp_dir=os.path.join(workdir, "ray"))
        task = TeacherTask(TeacherConfig(arch=args.arch, drop_rate=0.0, class_weighting="none",
                                         pipeline=PipelineConfig(image_size=args.image_size)))
        per_worker = args.steps * args.batch_size
        base = dict(epochs=args.epochs, batch_size=args.batch_size, cpus_per_worker=1.0, threads_per_worker=1,
                    zero_stage=0, shuffle_buffer=0, storage_path=os.path.join(workdir, "runs"), max_failures=0,
                    progress=False, keep_checkpoints=2)
        one = LoopConfig(num_workers=1, run_name="one", **base)
        two = LoopConfig(num_workers=2, run_name="two", **base)

        plain = plain_torch(task, make_rows(per_worker, args.image_size), one, args.epochs)
        ray_one = through_loop(task, make_rows(per_worker, args.image_size), one)
        ray_two = through_loop(task, make_rows(2 * per_worker, args.image_size), two)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    mean = statistics.mean
    overhead = mean(ray_one[0]) / mean(plain[0])
    scaling = mean(ray_two[0]) / mean(ray_one[0])
    cpu_overhead = mean(ray_one[1]) / mean(plain[1])
    cpu_scaling = mean(ray_two[1]) / mean(ray_one[1])
    rounded = lambda rates: [round(r, 2) for r in rates]  # noqa: E731
    print(json.dumps({
        "bench": "train_overhead", "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
        "steps_per_epoch": args.steps, "epochs_counted": args.epochs - 1, "threads_per_process": 1,
        "plain_torch_samples_per_s": rounded(plain[0]), "ray_deepspeed_1w_samples_per_s": rounded(ray_one[0]),
        "ray_deepspeed_2w_samples_per_s": rounded(ray_two[0]),
        "overhead_ratio": round(overhead, 3), "overhead_target": 0.95, "meets_overhead_target": overhead >= 0.95,
        "scaling_2w_vs_1w": round(scaling, 3), "scaling_target": 1.8, "meets_scaling_target": scaling >= 1.8,
        # per CPU second: the extra work Ray Train + DeepSpeed add, whatever else runs on the machine
        "plain_torch_samples_per_cpu_s": rounded(plain[1]), "ray_deepspeed_1w_samples_per_cpu_s": rounded(ray_one[1]),
        "ray_deepspeed_2w_samples_per_cpu_s": rounded(ray_two[1]),
        "cpu_overhead_ratio": round(cpu_overhead, 3), "meets_overhead_target_per_cpu_s": cpu_overhead >= 0.95,
        "cpu_efficiency_2w_vs_1w": round(cpu_scaling, 3),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "device": "cpu",
    }))


if __name__ == "__main__":
    main()
