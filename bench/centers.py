"""From 4 to 200 centers and 100k images: does the pipeline scale with the number of centers?

Data part (this file): images/s of the Ray Data pipeline and peak memory of one epoch, 200 centers of
500 images (100k images) against 4 centers, ratios measured in one run. The images are tiny (48 px
speckle PNGs, trained at 32 px): what is measured is the cost of centers and rows, not of decoding
large images (bench/data_feed.py's real-size mode measures that). At a fixed number of images per
center the 200-center epoch is 50x longer, which amortises Ray's per-epoch start, so the targets
compare 200 centers with a third dataset of 4 centers holding the same total number of images: what
the number of centers itself costs (throughput_ratio_same_total >= 0.9, memory_ratio <= 1.2). The
many-vs-few ratios at a fixed number of images per center stay as diagnostics
(memory_ratio_fixed_per_center: does streaming keep memory flat as the data grows).
`--many 40 --images-per-center 50 --source-px 0 --image-size 128` repeats the earlier 40-center run
on phantom-size images. Throughput runs all datasets in one Ray instance with epochs interleaved
(load swings hit them alike); memory runs each dataset in a fresh process (see bench/data_feed.py
for how memory is sampled).

Leave-one-center-out part: wall time of `diffkd loco` on the 4-center dataset (one small teacher per
held-out center through Ray Tune + Ray Train) with 1 fold at a time vs 2 in parallel.

Prints ONE JSON line and writes bench/results/centers.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import emit  # noqa: E402
from data_feed import SHAPES, RayFeed, mib, run_child, write_speckle_dataset  # noqa: E402


def throughput_child(args) -> dict:
    """Warm epochs of both datasets in one Ray instance, in alternating order."""
    from diffkd.data.pipeline import PipelineConfig

    cfg = PipelineConfig(image_size=args.image_size, batch_size=args.batch_size)
    roots = args.root.split(",")
    feeds = {root: RayFeed(root, cfg) for root in roots}  # the first call starts Ray; the rest join it
    for feed in feeds.values():
        feed.epoch_images(0)  # warm-up: worker processes start
    epochs = {root: [] for root in roots}
    for rep in range(args.epochs):
        for root in roots[rep % len(roots):] + roots[:rep % len(roots)]:
            start = time.perf_counter()
            images = feeds[root].epoch_images(rep + 1)["images"]
            epochs[root].append({"images": images, "seconds": time.perf_counter() - start})
    return {"epochs": epochs}


def leave_one_center_out_timing(args, root: str, out: str) -> dict:
    """Wall time of `diffkd loco` on the few-center dataset, folds one at a time vs two at a time.

    Each fold is a small teacher (resnet18, 32 px, `--loco-epochs` epochs, one worker at one thread)
    trained through Ray Tune + Ray Train exactly as `diffkd loco` runs it; both passes start from
    nothing (their own output folders) in one Ray instance of 4 logical CPUs. As with `diffkd loco`,
    Tune's and Ray's output goes to log files, not the console.
    """
    import torch

    from diffkd.runtime import console
    from diffkd.data.pipeline import PipelineConfig
    from diffkd.experiments.loco import leave_one_center_out
    from diffkd.runtime.raycompat import init_local
    from diffkd.train.loop_config import LoopConfig
    from diffkd.train.teacher import TeacherConfig

    torch.set_num_threads(1)
    cfg = TeacherConfig(arch="resnet18", pipeline=PipelineConfig(image_size=32, batch_size=16, augment=False),
                        loop=LoopConfig(epochs=args.loco_epochs, batch_size=16, cpus_per_worker=1.0, progress=False))
    walls = {}
    with console.capture(os.path.join(out, "logs")):
        init_local(num_cpus=4)
        for parallel in (1, 2):
            outcome = leave_one_center_out(root, cfg, os.path.join(out, f"loco-{parallel}"), parallel=parallel)
            walls[parallel] = outcome.wall_s
    return {"loco_folds": args.few, "loco_epochs": args.loco_epochs,
            "loco_wall_s": {"parallel_1": round(walls[1], 1), "parallel_2": round(walls[2], 1)},
            "loco_speedup_2_vs_1": round(walls[1] / walls[2], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 centers of 20 images, 2 warm epochs")
    parser.add_argument("--images-per-center", type=int, default=500)
    parser.add_argument("--few", type=int, default=4)
    parser.add_argument("--many", type=int, default=200)
    parser.add_argument("--source-px", type=int, default=48,
                        help="side of the (square) source PNGs; 0: phantom-size 280-420 px images")
    parser.add_argument("--epochs", type=int, default=3, help="warm epochs per dataset (after one warm-up)")
    parser.add_argument("--image-size", type=int, default=32, help="training size")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--loco-epochs", type=int, default=2, help="epochs of each leave-one-center-out fold")
    parser.add_argument("--no-loco", action="store_true", help="skip the leave-one-center-out timing")
    parser.add_argument("--child", choices=["throughput"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--shuffle-buffer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(throughput_child(args)))
        return
    if args.quick:
        args.many, args.images_per_center, args.epochs = 20, 20, 2
    shapes = ((args.source_px, args.source_px),) if args.source_px else SHAPES
    with tempfile.TemporaryDirectory(prefix="diffkd-centers-") as tmp:
        roots = {n: os.path.join(tmp, f"c{n}") for n in (args.few, args.many)}
        for n, root in roots.items():
            write_speckle_dataset(root, n, args.images_per_center, shapes=shapes)
        # the many-center image count in few centers: tells center count from epoch size
        same_total = os.path.join(tmp, f"c{args.few}x{args.many // args.few}")
        write_speckle_dataset(same_total, args.few, args.images_per_center * args.many // args.few, shapes=shapes)
        speed = run_child("throughput", ",".join([*roots.values(), same_total]), args,
                          script=os.path.abspath(__file__))
        memory = {n: run_child("memory_ray", root, args) for n, root in roots.items()}
        memory_same_total = run_child("memory_ray", same_total, args)
        extra = {} if args.no_loco else leave_one_center_out_timing(args, roots[args.few], tmp)

    def images_per_s(root: str) -> float:
        return statistics.median(e["images"] / e["seconds"] for e in speed["epochs"][root])

    ips = {n: images_per_s(root) for n, root in roots.items()}
    same_total_ips = images_per_s(same_total)
    speed_ratio = ips[args.many] / same_total_ips
    memory_ratio = memory[args.many]["peak_rss"] / memory_same_total["peak_rss"]
    peaks = {**{str(n): m for n, m in memory.items()}, f"{args.few}_same_total": memory_same_total}
    emit({
        "bench": "centers",
        "images_per_center": args.images_per_center, "centers": [args.few, args.many],
        "images": {"few": args.few * args.images_per_center, "many": args.many * args.images_per_center},
        "source_px": args.source_px or "280-420",
        "image_size": args.image_size, "batch_size": args.batch_size, "cpus": os.cpu_count(), "warm_epochs": args.epochs,
        "images_per_s": {str(n): round(v, 1) for n, v in ips.items()},
        "same_total_images_per_s": round(same_total_ips, 1),
        # targets: many centers vs few holding as many images, what the number of centers itself costs
        "throughput_ratio_same_total": round(speed_ratio, 3),
        "memory_ratio": round(memory_ratio, 3),
        "memory_ratio_pss": round(memory[args.many]["peak_pss"] / memory_same_total["peak_pss"], 3),
        # diagnostics: many vs few centers at a fixed number of images per center (many/few times the data)
        "throughput_ratio_fixed_per_center": round(ips[args.many] / ips[args.few], 3),
        "memory_ratio_fixed_per_center": round(memory[args.many]["peak_rss"] / memory[args.few]["peak_rss"], 3),
        "peak_rss_mib": {k: mib(m["peak_rss"]) for k, m in peaks.items()},
        "peak_pss_mib": {k: mib(m["peak_pss"]) for k, m in peaks.items()},
        "processes_at_peak": {k: m["processes"] for k, m in peaks.items()},
        "targets": {"throughput_ratio_same_total": ">= 0.9", "memory_ratio": "<= 1.2"},
        "meets_target": bool(speed_ratio >= 0.9 and memory_ratio <= 1.2),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **extra,
    })


if __name__ == "__main__":
    main()
