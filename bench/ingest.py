"""`diffkd ingest` against the machine's PNG decode + hash ceiling, and its memory as the source grows 10x.

The source is a `folder` layout with a clinical CSV (one row per image: file, patient_id, label),
gray PNGs of real size (270-860 px, as public breast-US sets; bench/data_feed.py's REAL_SIZE_SHAPES),
every image distinct (a pool of speckle images, each copy with its own few marked pixels, so that
ingest's duplicate check finds none). Two sources, N and 10N images, each ingested by `diffkd ingest`
into a fresh dataset as its own process, whose process tree's peak RSS is sampled.

* `images_per_s`: the marginal rate, (10N - N) images over the difference of the two wall times, so
  the command's fixed start (imports, salt, manifest) is left out; `images_per_s_whole_run` is the 10N
  run's own rate with it.
* ceiling: what any ingest must do per image, measured on the 10N source in the same run: read the
  file, decode the PNG, sha256 of the file bytes and of the pixels, in one process per core.
  `images_per_s_vs_ceiling` (target >= 0.5).
* `rss_ratio_10x`: peak RSS of the 10N run over the N run's (target <= 1.2).

Prints ONE JSON line and writes bench/results/ingest.json. `--quick`: N = 20.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from common import DIFFKD, best_pool_rate, emit  # noqa: E402
from data_feed import REAL_SIZE_SHAPES, PeakMemory, mib, speckle_image  # noqa: E402


def write_source(root: str, images: int, seed: int = 0) -> str:
    """`images` distinct real-size gray PNGs in SRC/<label>/, with SRC/clinical.csv; returns SRC."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pool = [speckle_image(rng, *shape) for shape in REAL_SIZE_SHAPES for _ in range(2)]
    rows = []
    for i in range(images):
        pixels = pool[i % len(pool)].copy()
        pixels[0, :8] = np.frombuffer(i.to_bytes(8, "little"), dtype=np.uint8)  # distinct pixels per image
        label = "upgrade" if i % 4 == 0 else "dcis"
        rel = f"{label}/img{i:06d}.png"
        os.makedirs(os.path.join(root, label), exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(root, rel), format="PNG")
        rows.append({"file": rel, "patient_id": f"p{i:06d}", "label": label})
    with open(os.path.join(root, "clinical.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "patient_id", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def ingest(src: str, dataset: str, log_path: str) -> dict:
    """`diffkd ingest SRC` into `dataset` as its own process: wall seconds and the tree's peak memory."""
    cmd = [DIFFKD, "ingest", src, "--center", "bench", "--dataset", dataset, "--clinical",
           os.path.join(src, "clinical.csv"), "--label-names", "dcis,upgrade"]
    with open(log_path, "a") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        with PeakMemory(pid=proc.pid) as memory:
            code = proc.wait()
        wall = time.perf_counter() - started
    if code:
        with open(log_path) as f:
            raise RuntimeError(f"diffkd ingest failed (exit {code}):\n{f.read()[-3000:]}")
    return {"wall_s": wall, "peak_rss": memory.peak_rss, "peak_pss": memory.peak_pss}


def _decode_and_hash(path: str) -> int:
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    hashlib.sha256(data).digest()
    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image)
    hashlib.sha256(pixels.tobytes()).digest()
    return pixels.shape[0]


def ceiling(src: str, workers: int, passes: int = 2) -> float:
    """Images/s of read + PNG decode + sha256 of the file and of the pixels, one process per core; best pass."""
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(src) for name in names
                   if name.endswith(".png"))
    return best_pool_rate(_decode_and_hash, paths, workers, passes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 20 images (and 200)")
    parser.add_argument("--images", type=int, default=150, help="N: the small source; the large one has 10N")
    args = parser.parse_args()
    if args.quick:
        args.images = 20
    small_n, large_n = args.images, 10 * args.images
    with tempfile.TemporaryDirectory(prefix="dki") as tmp:
        log = os.path.join(tmp, "ingest.log")
        small = write_source(os.path.join(tmp, "src-small"), small_n)
        large = write_source(os.path.join(tmp, "src-large"), large_n)
        runs = {"small": ingest(small, os.path.join(tmp, "ds-small"), log),
                "large": ingest(large, os.path.join(tmp, "ds-large"), log)}
        limit = ceiling(large, os.cpu_count() or 1)

    marginal = (large_n - small_n) / max(runs["large"]["wall_s"] - runs["small"]["wall_s"], 1e-9)
    vs_ceiling = marginal / limit
    rss_ratio = runs["large"]["peak_rss"] / runs["small"]["peak_rss"]
    emit({
        "bench": "ingest", "images": {"small": small_n, "large": large_n},
        "source": "gray PNGs 270-860 px (bench/data_feed.py REAL_SIZE_SHAPES), folder layout + clinical CSV",
        "wall_s": {k: round(r["wall_s"], 1) for k, r in runs.items()},
        "images_per_s": round(marginal, 1),
        "images_per_s_whole_run": round(large_n / runs["large"]["wall_s"], 1),
        "ceiling_images_per_s": round(limit, 1), "ceiling": "read + PNG decode + sha256 of file and pixels, "
                                                           "one process per core",
        "images_per_s_vs_ceiling": round(vs_ceiling, 3),
        "peak_rss_mib": {k: mib(r["peak_rss"]) for k, r in runs.items()},
        "peak_pss_mib": {k: mib(r["peak_pss"]) for k, r in runs.items()},
        "rss_ratio_10x": round(rss_ratio, 3),
        "targets": {"images_per_s_vs_ceiling": ">= 0.5", "rss_ratio_10x": "<= 1.2"},
        "meets_target": bool(vs_ceiling >= 0.5 and rss_ratio <= 1.2),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
