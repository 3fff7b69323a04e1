"""What the shared Ray Train loop costs over plain torch, measured side by side in one run.

The teacher step (same timm model, batch, data, AdamW, clipping, LR schedule) through every row:

* plain torch, one process (bench/common.py's reference loop): the baseline;
* DeepSpeed without Ray (the loop's engine and checkpoint writer), 1 and 2 processes: DeepSpeed's share;
* Ray Train with plain DDP (`LoopConfig(engine="ddp")`, the default at ZeRO stage 0), 1 and 2 workers:
  what a user runs;
* Ray Train + DeepSpeed (`LoopConfig(engine="deepspeed")`), 1 and 2 workers: DeepSpeed inside Ray;
* plain torch DDP over gloo, 1 and 2 processes: the fair reference for 2-worker scaling here.

Headline: whole epochs, what a user waits for: the step loop plus the checkpoint, and for the Ray rows
`ray.train.report` and its barrier (the gap between consecutive epochs' starts). The step loop alone
(`inner`) is the diagnostic. The first epoch of every run is warm-up. Ray rows also give the time
their step loop waited for data (`data_wait_s`) and the first batch's arrival (`first_batch_s`).

Targets: epoch_overhead_ratio (Ray, default engine, 1 worker / plain torch, whole epochs) >= 0.90,
overhead_ratio (the same, step loop) >= 0.95, scaling_vs_ddp ((Ray 2w / 1w) / (DDP 2 / 1
processes), whole epochs) >= 0.95. One torch thread per process everywhere. On a shared machine the
rates move with other processes' load (`load_avg_1m`); the ratios are measured in one run.

The headline Ray rows train with the engine ZeRO stage 0 gets by default (`loop.engine: auto`: plain
torch DDP, which overlaps the gradient all-reduce with backward); the other engine's rows
(`ray_deepspeed_*`) stay as attribution, with `scaling_vs_ddp_by_engine`.

Real-size mode (`real_size`; `--no-real-size` skips it): one worker training from real-size source PNGs
(270-860 px gray, as public breast-US sets) at 128 and 224 px through the pipeline, cached and
streamed, against plain torch on the same images already decoded and the decode + resize ceiling of
the machine measured in the same run (bench/data_feed.py).

Prints one JSON line and writes bench/results/train_overhead.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from common import emit, mean, reference_loop, rounded, start_ray, through_loop  # noqa: E402


def make_rows(n: int, image_size: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0, 1, (n, 1, image_size, image_size)).astype(np.float32)
    images[labels == 1, :, image_size // 4: image_size // 2, image_size // 4: image_size // 2] += 1.0
    return [{"image": images[i], "label": np.int64(labels[i]), "case_id": f"b{i}"} for i in range(n)]


def real_size_inputs(args, root: str) -> dict:
    """Real-size source PNGs (270-860 px) for one worker's epoch, and per training size the rows the
    plain torch reference trains on (decoded by the pipeline's own decode, no augmentation) and the
    machine's decode + resize ceiling (measured now, before Ray starts)."""
    from data_feed import REAL_SIZE_SHAPES, decode_resize_ceiling, write_speckle_dataset

    from diffkd.data.pipeline import PipelineConfig, load_arrays

    n = args.steps * args.batch_size
    per_center = -(-n // len(REAL_SIZE_SHAPES))
    dataset = write_speckle_dataset(root, len(REAL_SIZE_SHAPES), per_center, shapes=REAL_SIZE_SHAPES)
    ids = sorted(dataset.metadata().column("case_id").to_pylist())[:n]
    inputs = {"root": root, "ids": ids, "by_size": {}}
    for size in args.real_size_train_sizes:
        arrays = load_arrays(dataset, ids, PipelineConfig(image_size=size, batch_size=args.batch_size))
        rows = [{"image": arrays["image"][i], "label": arrays["label"][i], "case_id": str(arrays["case_id"][i])}
                for i in range(len(ids))]
        inputs["by_size"][size] = {"rows": rows, "ceiling": decode_resize_ceiling(root, size, os.cpu_count() or 1)}
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=int(os.environ.get("BENCH_IMAGE_SIZE", 64)))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=int(os.environ.get("BENCH_STEPS", 12)),
                        help="optimizer steps per worker and epoch")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run; the first is warm-up")
    parser.add_argument("--no-attribution", action="store_true", help="only the headline rows")
    parser.add_argument("--real-size-train-sizes", default="128,224",
                        help="training sizes of the real-size mode (one worker, source PNGs of 270-860 px)")
    parser.add_argument("--no-real-size", action="store_true", help="skip the real-size mode")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be at least 3: one warm-up, and whole epochs need a following one")
    args.real_size_train_sizes = [] if args.no_real_size else [int(s) for s in args.real_size_train_sizes.split(",")]

    from diffkd.data.dataset import ImageDataset
    from diffkd.data.pipeline import PipelineConfig, make_dataset
    from diffkd.train.loop_config import LoopConfig
    from diffkd.train.teacher import TeacherConfig, TeacherTask

    def teacher(size: int) -> TeacherTask:
        return TeacherTask(TeacherConfig(arch=args.arch, drop_rate=0.0, class_weighting="none",
                                         pipeline=PipelineConfig(image_size=size)))

    task = teacher(args.image_size)
    default = LoopConfig().resolved_engine  # what a stage at ZeRO stage 0 trains with
    engines = [default] + ([] if args.no_attribution else [e for e in ("ddp", "deepspeed") if e != default])
    per_worker = args.steps * args.batch_size
    one_rows, two_rows = make_rows(per_worker, args.image_size), make_rows(2 * per_worker, args.image_size)
    workdir = tempfile.mkdtemp(prefix="dkb", dir="/tmp")  # short: Ray's socket paths are length-limited
    base = dict(epochs=args.epochs, batch_size=args.batch_size, cpus_per_worker=1.0, threads_per_worker=1,
                zero_stage=0, shuffle_buffer=0, storage_path=os.path.join(workdir, "runs"), max_failures=0,
                progress=False, keep_checkpoints=2)

    def loop(workers: int, engine: str = "deepspeed", name: str = "") -> LoopConfig:
        return LoopConfig(num_workers=workers, engine=engine, run_name=name or f"{engine}-{workers}", **base)

    rows, real = {}, {}
    try:
        # references first, in their own processes, before Ray starts
        rows["plain_torch"] = reference_loop("torch", task, one_rows, loop(1))
        if not args.no_attribution:
            rows["deepspeed_no_ray"] = reference_loop("deepspeed", task, one_rows, loop(1))
        rows["ddp_1proc"] = reference_loop("ddp", task, one_rows, loop(1), world=1)
        rows["ddp_2proc"] = reference_loop("ddp", task, two_rows, loop(2), world=2)
        if not args.no_attribution:
            rows["deepspeed_no_ray_2proc"] = reference_loop("deepspeed", task, two_rows, loop(2), world=2)
        inputs = real_size_inputs(args, os.path.join(workdir, "real-size")) if args.real_size_train_sizes else {}
        for size, given in inputs.get("by_size", {}).items():
            real[size] = {"plain_torch": reference_loop("torch", teacher(size), given["rows"], loop(1))}
        start_ray(os.path.join(workdir, "ray"))
        for engine in engines:
            rows[f"ray_{engine}_1w"] = through_loop(task, one_rows, loop(1, engine))
            rows[f"ray_{engine}_2w"] = through_loop(task, two_rows, loop(2, engine))
        for size, given in inputs.get("by_size", {}).items():
            dataset = ImageDataset(inputs["root"])
            for mode, cache in (("ray_cached", True), ("ray_streamed", False)):
                feed = make_dataset(dataset, inputs["ids"], PipelineConfig(image_size=size, batch_size=args.batch_size),
                                    train=True, cache=cache)
                real[size][mode] = through_loop(teacher(size), len(inputs["ids"]), loop(1, default, f"{mode}-{size}"),
                                                dataset=feed)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    whole = {name: mean(r["whole"]) for name, r in rows.items()}
    inner = {name: mean(r["inner"]) for name, r in rows.items()}
    ray_1w, ray_2w = f"ray_{default}_1w", f"ray_{default}_2w"
    epoch_overhead = whole[ray_1w] / whole["plain_torch"]
    overhead = inner[ray_1w] / inner["plain_torch"]
    ddp_scaling = whole["ddp_2proc"] / whole["ddp_1proc"]
    scaling = whole[ray_2w] / whole[ray_1w]
    result = {
        "bench": "train_overhead", "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
        "steps_per_epoch": args.steps, "epochs": args.epochs, "threads_per_process": 1,
        # the headline rows train with the default engine of ZeRO stage 0 (loop.engine auto)
        "engine": default,
        "whole_epoch_samples_per_s": {n: round(v, 2) for n, v in whole.items()},
        "inner_loop_samples_per_s": {n: round(v, 2) for n, v in inner.items()},
        "epoch_overhead_ratio": round(epoch_overhead, 3), "epoch_overhead_target": 0.90,
        "meets_epoch_overhead_target": epoch_overhead >= 0.90,
        "overhead_ratio": round(overhead, 3), "overhead_target": 0.95, "meets_overhead_target": overhead >= 0.95,
        "scaling_2w_vs_1w": round(scaling, 3), "ddp_scaling_2_vs_1": round(ddp_scaling, 3),
        "scaling_vs_ddp": round(scaling / ddp_scaling, 3), "scaling_vs_ddp_target": 0.95,
        "meets_scaling_vs_ddp_target": scaling / ddp_scaling >= 0.95,
        "scaling_vs_ddp_inner": round((inner[ray_2w] / inner[ray_1w]) / (inner["ddp_2proc"] / inner["ddp_1proc"]), 3),
        "scaling_vs_ddp_by_engine": {e: round(whole[f"ray_{e}_2w"] / whole[f"ray_{e}_1w"] / ddp_scaling, 3)
                                     for e in engines},
        # attribution, each relative to plain torch (whole epochs)
        "attribution_vs_plain_torch": {n: round(v / whole["plain_torch"], 3) for n, v in whole.items()},
        # per CPU second of the training processes (Ray Data's and Ray's own processes not counted): the
        # work each row adds per sample, much less sensitive than wall time to other load on the machine
        "inner_loop_samples_per_cpu_s": {n: round(mean(r["inner_per_cpu_s"]), 2) for n, r in rows.items()},
        "cpu_overhead_ratio": round(mean(rows[ray_1w]["inner_per_cpu_s"]) / mean(rows["plain_torch"]["inner_per_cpu_s"]), 3),
        "per_epoch": {n: {"whole": rounded(r["whole"]), "inner": rounded(r["inner"])} for n, r in rows.items()},
        "ray_data_wait_s": {n: r["data_wait_s"] for n, r in rows.items() if "data_wait_s" in r},
        "ray_first_batch_s": {n: r["first_batch_s"] for n, r in rows.items() if "first_batch_s" in r},
        "ray_train_s": {n: r["train_s"] for n, r in rows.items() if "train_s" in r},
        "ray_run_wall_s": {n: r["run_wall_s"] for n, r in rows.items() if "run_wall_s" in r},
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "device": "cpu",
    }
    if "deepspeed_no_ray_2proc" in whole and "ray_deepspeed_2w" in whole:
        # DeepSpeed's miss split in two: its own 2-process scaling against DDP's, then what Ray adds to it
        ds_scaling = whole["deepspeed_no_ray_2proc"] / whole["deepspeed_no_ray"]
        result["deepspeed_no_ray_scaling_vs_ddp"] = round(ds_scaling / ddp_scaling, 3)
        result["ray_deepspeed_scaling_vs_deepspeed"] = round(
            whole["ray_deepspeed_2w"] / whole["ray_deepspeed_1w"] / ds_scaling, 3)
    if real:
        result["real_size"] = real_size_summary(real, inputs)
    emit(result)


def real_size_summary(real: dict, inputs: dict) -> dict:
    """Whole-epoch samples/s per training size: plain torch on decoded tensors (no data cost), Ray
    cached and streamed from the PNGs, and the decode + resize ceiling; `bound` is the lower of plain
    torch and the ceiling, what a streamed epoch could reach at best on this machine."""
    out = {"source_shapes": "270-860 px gray PNGs (bench/data_feed.py REAL_SIZE_SHAPES)",
           "images": len(inputs["ids"]), "engine": "loop.engine auto, 1 worker", "by_train_size": {}}
    for size, runs in real.items():
        whole = {name: mean(r["whole"]) for name, r in runs.items()}
        ceiling = inputs["by_size"][size]["ceiling"]["images_per_s"]
        bound = min(whole["plain_torch"], ceiling)
        out["by_train_size"][str(size)] = {
            "whole_epoch_samples_per_s": {n: round(v, 2) for n, v in whole.items()},
            "decode_resize_ceiling_images_per_s": round(ceiling, 1),
            "cached_vs_plain_torch": round(whole["ray_cached"] / whole["plain_torch"], 3),
            "streamed_vs_plain_torch": round(whole["ray_streamed"] / whole["plain_torch"], 3),
            "streamed_vs_bound": round(whole["ray_streamed"] / bound, 3),
            "ray_data_wait_s": {n: r["data_wait_s"] for n, r in runs.items() if "data_wait_s" in r},
        }
    return out


if __name__ == "__main__":
    main()
