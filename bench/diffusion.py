"""Stage 1 throughput, measured side by side in one run; prints one JSON line.

1. sampling: images/s of the synthesis actor pool (`diffkd.synth.sampling.sample_stream`: Ray Data
   `map_batches` over an ActorPoolStrategy, the pipeline loaded once per actor) with 2 actors vs 1
   (target >= 1.8x), and the same `ImageSampler` called in a plain in-process loop. End to end:
   actor start-up and model loading are inside the timed window, as they are for a user.
2. training: denoiser samples/s of `DiffusionTask` through the shared Ray Train + DeepSpeed loop
   (1 worker) vs the same step in a plain torch loop (AdamW, clipping, warm-up + cosine LR, EMA
   update) (target >= 0.95). Steady state: each run's first epoch is warm-up and not counted.

Every process uses one intra-op thread. On a shared 2-core machine the numbers move with the load
of other processes (`load_avg_1m` is recorded); absolute speeds mean something only on dedicated
hardware. The models are randomly initialised: throughput does not depend on what they learnt.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_overhead import plain_torch  # noqa: E402  the same plain loop, side by side with fit()


def condition_table(n: int, centers: list[str], seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame({"center": rng.choice(centers, n), "label": rng.integers(0, 2, n), "modality": "us",
                         "age": rng.uniform(35, 80, n), "condition_case_id": [f"c{i}" for i in range(n)],
                         "row_seed": np.arange(n), "row": np.arange(n)})


def sampling_with_actors(table, model_dir: str, cfg) -> float:
    from diffkd.synth.sampling import sample_stream

    start = time.perf_counter()
    rows = sum(len(b["row"]) for b in sample_stream(table, model_dir, cfg).iter_batches(batch_size=None))
    return rows / (time.perf_counter() - start)


def sampling_plain(table, model_dir: str, cfg) -> float:
    from diffkd.synth.sampling import ImageSampler

    start = time.perf_counter()
    sampler = ImageSampler(model_dir, cfg.sampler, cfg.num_inference_steps, cfg.guidance_scale, threads=1)
    rows = sum(len(sampler(table.iloc[i:i + cfg.batch_size])) for i in range(0, len(table), cfg.batch_size))
    return rows / (time.perf_counter() - start)


def training_rows(n: int, image_size: int, num_centers: int, seed: int = 0) -> list[dict]:
    from diffkd.data.schema import ClinicalEncoding

    rng = np.random.default_rng(seed)
    width = ClinicalEncoding().width
    return [{"image": rng.normal(0, 1, (1, image_size, image_size)).astype(np.float32),
             "label": np.int64(rng.integers(0, 2)), "center_idx": np.int64(rng.integers(0, num_centers)),
             "modality_idx": np.int64(0), "clinical": rng.normal(0, 1, width).astype(np.float32),
             "mask": np.zeros((1, image_size, image_size), np.float32)} for _ in range(n)]


def training_through_loop(task, rows: list[dict], loop) -> float:
    import ray.data

    from diffkd.train.loop import fit

    result = fit(task, {"train": ray.data.from_items(rows)}, loop)
    return statistics.mean(h["samples_per_s"] for h in result.history[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", default="32,64", help="UNet block_out_channels (the demo's)")
    parser.add_argument("--images", type=int, default=64, help="images sampled per sampling run")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--sampling-batch", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per epoch")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per run; the first is warm-up")
    args = parser.parse_args()

    from diffkd.models.diffusion import DiffusionModelConfig, build_denoiser, save_pipeline, training_scheduler
    from diffkd.raycompat import init_local
    from diffkd.synth import SynthConfig
    from diffkd.train.diffusion_task import DiffusionConfig, DiffusionTask
    from diffkd.train.loop_config import LoopConfig

    centers = ["A", "B", "C"]
    model_cfg = DiffusionModelConfig(image_size=args.image_size,
                                     block_out_channels=tuple(int(c) for c in args.channels.split(",")))
    workdir = tempfile.mkdtemp(prefix="dkd", dir="/tmp")  # short: Ray's socket paths are length-limited
    try:
        init_local(num_cpus=4, temp_dir=os.path.join(workdir, "ray"))
        torch.manual_seed(0)
        model_dir = os.path.join(workdir, "diffusion")
        save_pipeline(build_denoiser(model_cfg, centers), training_scheduler(model_cfg).config, model_dir)
        table = condition_table(args.images, centers)
        synth = dict(num_inference_steps=args.sampling_steps, guidance_scale=2.0, batch_size=args.sampling_batch,
                     cpus_per_actor=1.0)
        plain_sampling = sampling_plain(table, model_dir, SynthConfig(num_actors=1, **synth))
        one_actor = sampling_with_actors(table, model_dir, SynthConfig(num_actors=1, **synth))
        two_actors = sampling_with_actors(table, model_dir, SynthConfig(num_actors=2, **synth))

        task = DiffusionTask(DiffusionConfig(model=model_cfg, centers=centers))
        loop = LoopConfig(num_workers=1, epochs=args.epochs, batch_size=args.batch_size, cpus_per_worker=1.0,
                          threads_per_worker=1, zero_stage=0, shuffle_buffer=0, max_failures=0, progress=False,
                          storage_path=os.path.join(workdir, "runs"), run_name="bench", keep_checkpoints=2)
        rows = training_rows(args.steps * args.batch_size, args.image_size, len(centers))
        plain_training = statistics.mean(plain_torch(task, rows, loop, args.epochs)[0])
        loop_training = training_through_loop(task, rows, loop)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    scaling, vs_plain = two_actors / one_actor, two_actors / plain_sampling
    overhead = loop_training / plain_training
    print(json.dumps({
        "bench": "diffusion", "image_size": args.image_size, "block_out_channels": list(model_cfg.block_out_channels),
        "sampling_images": args.images, "sampling_steps": args.sampling_steps, "guidance": "cfg (2 UNet passes)",
        "sampling_plain_loop_images_per_s": round(plain_sampling, 3),
        "sampling_1_actor_images_per_s": round(one_actor, 3), "sampling_2_actors_images_per_s": round(two_actors, 3),
        "sampling_scaling_2_vs_1": round(scaling, 3), "sampling_scaling_target": 1.8,
        "meets_sampling_target": scaling >= 1.8, "sampling_2_actors_vs_plain_loop": round(vs_plain, 3),
        "train_batch_size": args.batch_size, "train_steps_per_epoch": args.steps, "train_epochs_counted": args.epochs - 1,
        "train_plain_torch_samples_per_s": round(plain_training, 2),
        "train_ray_deepspeed_samples_per_s": round(loop_training, 2),
        "train_overhead_ratio": round(overhead, 3), "train_overhead_target": 0.95,
        "meets_train_overhead_target": overhead >= 0.95, "threads_per_process": 1,
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }))


if __name__ == "__main__":
    main()
