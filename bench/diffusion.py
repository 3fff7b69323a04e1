"""Stage 1 throughput, measured side by side in one run; prints one JSON line and writes
bench/results/diffusion.json.

1. sampling: images/s of the synthesis actor pool (`diffkd.synth.sampling.sample_stream`: Ray Data
   `map_batches` over an ActorPoolStrategy, the pipeline loaded once per actor) with 2 actors vs 1,
   and the same `ImageSampler` in a plain in-process loop. Each batch's arrival is timed: until every
   actor has delivered its first batch is start-up (actor start, model load: reported apart);
   the rest is the steady state, whose 2-vs-1 ratio is the target (>= 1.8). End-to-end rates are
   reported too.
2. training: denoiser samples/s of `DiffusionTask` through the shared Ray Train + DeepSpeed loop
   (1 worker) vs the same step in a plain torch loop (AdamW, clipping, warm-up + cosine LR, EMA
   update), with the attribution rows of bench/train_overhead.py (DeepSpeed without Ray, Ray Train
   with plain DDP). Headline: whole epochs (checkpoint, `ray.train.report` and barrier included),
   target >= 0.90; the step loop alone is the diagnostic. Each run's first epoch is warm-up.

Every process uses one intra-op thread. On a shared 2-core machine the numbers move with the load
of other processes (`load_avg_1m` is recorded); absolute speeds mean something only on dedicated
hardware. The models are randomly initialised: throughput does not depend on what they learnt.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import emit, mean, reference_loop, start_ray, through_loop  # noqa: E402


def condition_table(n: int, centers: list[str], seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"center": rng.choice(centers, n), "label": rng.integers(0, 2, n), "modality": "us",
                         "age": rng.uniform(35, 80, n), "condition_case_id": [f"c{i}" for i in range(n)],
                         "row_seed": np.arange(n), "row": np.arange(n)})


def sampling_with_actors(table, model_dir: str, cfg) -> dict:
    """End-to-end images/s, and the steady state after every actor's first batch (start-up apart)."""
    from diffkd.synth.sampling import sample_stream

    start = time.perf_counter()
    arrivals = []  # (seconds since start, rows) per batch, in arrival order
    for batch in sample_stream(table, model_dir, cfg).iter_batches(batch_size=None):
        arrivals.append((time.perf_counter() - start, len(batch["row"])))
    total = sum(n for _, n in arrivals)
    return {"end_to_end": total / arrivals[-1][0], **steady_state(arrivals, cfg.num_actors)}


def steady_state(arrivals: list[tuple[float, int]], actors: int) -> dict:
    """Start-up (until every actor's first batch: actor start and model load) and the rate after it.

    The rate needs at least two batches per actor after start-up; with fewer, the last batches of
    all actors landing together would make it look arbitrarily fast, so it is None.
    """
    warm = min(actors, len(arrivals) - 1)  # batches that carried an actor's start-up
    startup_s = arrivals[warm - 1][0] if warm else 0.0
    after = arrivals[warm:]
    if len(after) < 2 * actors:
        return {"startup_s": startup_s, "steady": None}
    return {"startup_s": startup_s, "steady": sum(n for _, n in after) / (arrivals[-1][0] - startup_s)}


def sampling_plain(table, model_dir: str, cfg) -> float:
    from diffkd.synth.sampling import ImageSampler

    start = time.perf_counter()
    sampler = ImageSampler(model_dir, cfg.sampler, cfg.num_inference_steps, cfg.guidance_scale, threads=1)
    rows = sum(len(sampler(table.iloc[i:i + cfg.batch_size])) for i in range(0, len(table), cfg.batch_size))
    return rows / (time.perf_counter() - start)


def training_rows(n: int, image_size: int, num_centers: int, seed: int = 0) -> list[dict]:
    """Denoiser batches as the pipeline delivers them (the model has no mask channel, so no mask)."""
    from diffkd.data.schema import ClinicalEncoding

    rng = np.random.default_rng(seed)
    width = ClinicalEncoding().width
    return [{"image": rng.normal(0, 1, (1, image_size, image_size)).astype(np.float32),
             "label": np.int64(rng.integers(0, 2)), "center_idx": np.int64(rng.integers(0, num_centers)),
             "modality_idx": np.int64(0), "clinical": rng.normal(0, 1, width).astype(np.float32)}
            for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", default="32,64", help="UNet block_out_channels (the demo's)")
    parser.add_argument("--images", type=int, default=int(os.environ.get("BENCH_SAMPLING_IMAGES", 64)),
                        help="images sampled per sampling run")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--sampling-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("BENCH_STEPS", 12)),
                        help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs per run; the first is warm-up")
    parser.add_argument("--no-attribution", action="store_true", help="skip DeepSpeed-without-Ray and Ray+DDP rows")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: one warm-up, and whole epochs need a following one")

    from diffkd.models.diffusion import DiffusionModelConfig, build_denoiser, save_pipeline, training_scheduler
    from diffkd.synth import SynthConfig
    from diffkd.train.diffusion_task import DiffusionConfig, DiffusionTask
    from diffkd.train.loop_config import LoopConfig

    centers = ["A", "B", "C"]
    model_cfg = DiffusionModelConfig(image_size=args.image_size,
                                     block_out_channels=tuple(int(c) for c in args.channels.split(",")))
    task = DiffusionTask(DiffusionConfig(model=model_cfg, centers=centers))
    rows = training_rows(args.steps * args.batch_size, args.image_size, len(centers))
    workdir = tempfile.mkdtemp(prefix="dkd", dir="/tmp")  # short: Ray's socket paths are length-limited

    def loop(engine: str = "deepspeed") -> LoopConfig:
        return LoopConfig(num_workers=1, engine=engine, epochs=args.epochs, batch_size=args.batch_size,
                          cpus_per_worker=1.0, threads_per_worker=1, zero_stage=0, shuffle_buffer=0, max_failures=0,
                          progress=False, storage_path=os.path.join(workdir, "runs"), run_name=f"bench-{engine}",
                          keep_checkpoints=2)

    training = {}
    try:
        training["plain_torch"] = reference_loop("torch", task, rows, loop())  # before Ray starts
        if not args.no_attribution:
            training["deepspeed_no_ray"] = reference_loop("deepspeed", task, rows, loop())
        start_ray(os.path.join(workdir, "ray"))
        torch.manual_seed(0)
        model_dir = os.path.join(workdir, "diffusion")
        save_pipeline(build_denoiser(model_cfg, centers), training_scheduler(model_cfg).config, model_dir)
        table = condition_table(args.images, centers)
        synth = dict(num_inference_steps=args.sampling_steps, guidance_scale=2.0, batch_size=args.sampling_batch,
                     cpus_per_actor=1.0)
        plain_sampling = sampling_plain(table, model_dir, SynthConfig(num_actors=1, **synth))
        one_actor = sampling_with_actors(table, model_dir, SynthConfig(num_actors=1, **synth))
        two_actors = sampling_with_actors(table, model_dir, SynthConfig(num_actors=2, **synth))

        training["ray_deepspeed_1w"] = through_loop(task, rows, loop())
        if not args.no_attribution:
            training["ray_ddp_1w"] = through_loop(task, rows, loop("ddp"))
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    steady_ok = one_actor["steady"] is not None and two_actors["steady"] is not None
    scaling = two_actors["steady"] / one_actor["steady"] if steady_ok else None
    whole = {name: mean(r["whole"]) for name, r in training.items()}
    inner = {name: mean(r["inner"]) for name, r in training.items()}
    epoch_overhead = whole["ray_deepspeed_1w"] / whole["plain_torch"]
    loop_row = training["ray_deepspeed_1w"]
    emit({
        "bench": "diffusion", "image_size": args.image_size, "block_out_channels": list(model_cfg.block_out_channels),
        "sampling_images": args.images, "sampling_steps": args.sampling_steps, "sampling_batch": args.sampling_batch,
        "guidance": "cfg (2 UNet passes)",
        "sampling_plain_loop_images_per_s": round(plain_sampling, 3),
        "sampling_steady_images_per_s": {name: r["steady"] and round(r["steady"], 3)
                                         for name, r in (("1_actor", one_actor), ("2_actors", two_actors))},
        "sampling_end_to_end_images_per_s": {"1_actor": round(one_actor["end_to_end"], 3),
                                             "2_actors": round(two_actors["end_to_end"], 3)},
        "sampling_startup_s": {"1_actor": round(one_actor["startup_s"], 2), "2_actors": round(two_actors["startup_s"], 2)},
        # None when too few batches per actor follow start-up to time a steady state (see steady_state)
        "sampling_scaling_2_vs_1": round(scaling, 3) if steady_ok else None, "sampling_scaling_target": 1.8,
        "meets_sampling_target": steady_ok and scaling >= 1.8,
        "sampling_scaling_2_vs_1_end_to_end": round(two_actors["end_to_end"] / one_actor["end_to_end"], 3),
        "sampling_2_actors_vs_plain_loop": round(two_actors["end_to_end"] / plain_sampling, 3),
        "train_batch_size": args.batch_size, "train_steps_per_epoch": args.steps, "train_epochs": args.epochs,
        "train_whole_epoch_samples_per_s": {n: round(v, 2) for n, v in whole.items()},
        "train_inner_loop_samples_per_s": {n: round(v, 2) for n, v in inner.items()},
        "train_epoch_overhead_ratio": round(epoch_overhead, 3), "train_epoch_overhead_target": 0.90,
        "meets_train_epoch_overhead_target": epoch_overhead >= 0.90,
        "train_overhead_ratio": round(inner["ray_deepspeed_1w"] / inner["plain_torch"], 3),
        "train_inner_loop_samples_per_cpu_s": {n: round(mean(r["inner_per_cpu_s"]), 2) for n, r in training.items()},
        "train_attribution_vs_plain_torch": {n: round(v / whole["plain_torch"], 3) for n, v in whole.items()},
        "train_data_wait_s": loop_row["data_wait_s"], "train_first_batch_s": loop_row["first_batch_s"],
        "train_step_loop_s": loop_row["train_s"], "threads_per_process": 1,
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    })


if __name__ == "__main__":
    main()
