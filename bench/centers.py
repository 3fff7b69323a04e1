"""From 4 to 40 centers at a fixed number of images per center (issue 8): does the pipeline scale?

Data part (this file): images/s of the Ray Data pipeline and peak memory of one epoch, 40 centers
against 4, ratios measured in one run. At a fixed number of images per center the 40-center epoch is
10x longer, which amortises Ray's per-epoch start; a third dataset (4 centers holding the 40-center
image count) separates that from what the number of centers itself costs. Throughput runs both datasets in one Ray instance with epochs
interleaved (load swings hit both alike); memory runs each dataset in a fresh process (see
bench/data_feed.py for how memory is sampled). Targets: throughput 40/4 >= 0.9, memory 40/4 <= 1.2.

`leave_one_center_out_timing` is where the leave-one-center-out wall time (2 parallel trials vs 1)
plugs in; it needs the training stages and is filled in by their owner.

Prints ONE JSON line.
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

from data_feed import RayFeed, mib, run_child, write_speckle_dataset  # noqa: E402


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


def leave_one_center_out_timing(args, roots: dict[int, str]) -> dict:
    """EXTENSION POINT (issue 8, lead): wall time of leave-one-center-out with 2 parallel trials vs 1.

    Expected to run one training trial per held-out center on the datasets in `roots` (centers ->
    dataset path) and return e.g. {"loco_wall_s": {"parallel_1": s1, "parallel_2": s2}, "loco_speedup": s1 / s2}.
    The data-pipeline part of this benchmark does not depend on it; until it is filled in it adds nothing.
    """
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images per center and epochs")
    parser.add_argument("--images-per-center", type=int, default=50)
    parser.add_argument("--few", type=int, default=4)
    parser.add_argument("--many", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=4, help="warm epochs per dataset (after one warm-up)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", choices=["throughput"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--shuffle-buffer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(throughput_child(args)))
        return
    if args.quick:
        args.images_per_center, args.epochs = 20, 2
    with tempfile.TemporaryDirectory(prefix="diffkd-centers-") as tmp:
        roots = {n: os.path.join(tmp, f"c{n}") for n in (args.few, args.many)}
        for n, root in roots.items():
            write_speckle_dataset(root, n, args.images_per_center)
        # Diagnostic: the many-center image count in few centers, to tell center count from epoch size.
        same_total = os.path.join(tmp, f"c{args.few}x{args.many // args.few}")
        write_speckle_dataset(same_total, args.few, args.images_per_center * args.many // args.few)
        speed = run_child("throughput", ",".join([*roots.values(), same_total]), args,
                          script=os.path.abspath(__file__))
        memory = {n: run_child("memory_ray", root, args) for n, root in roots.items()}
        extra = leave_one_center_out_timing(args, roots)

    def images_per_s(root: str) -> float:
        return statistics.median(e["images"] / e["seconds"] for e in speed["epochs"][root])

    ips = {n: images_per_s(root) for n, root in roots.items()}
    speed_ratio = ips[args.many] / ips[args.few]
    memory_ratio = memory[args.many]["peak_rss"] / memory[args.few]["peak_rss"]
    result = {
        "bench": "centers",
        "images_per_center": args.images_per_center, "centers": [args.few, args.many],
        "image_size": args.image_size, "batch_size": args.batch_size, "cpus": os.cpu_count(), "warm_epochs": args.epochs,
        "images_per_s": {str(n): round(v, 1) for n, v in ips.items()},
        "throughput_ratio": round(speed_ratio, 3),
        # same images per epoch, 40 centers vs 4: what the number of centers (files, tasks) itself costs
        "same_total_images_per_s": round(images_per_s(same_total), 1),
        "throughput_ratio_same_total": round(ips[args.many] / images_per_s(same_total), 3),
        "peak_rss_mib": {str(n): mib(m["peak_rss"]) for n, m in memory.items()},
        "peak_pss_mib": {str(n): mib(m["peak_pss"]) for n, m in memory.items()},
        "processes_at_peak": {str(n): m["processes"] for n, m in memory.items()},
        "memory_ratio": round(memory_ratio, 3),
        "memory_ratio_pss": round(memory[args.many]["peak_pss"] / memory[args.few]["peak_pss"], 3),
        "targets": {"throughput_ratio": ">= 0.9", "memory_ratio": "<= 1.2"},
        "meets_target": bool(speed_ratio >= 0.9 and memory_ratio <= 1.2),
        **extra,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
