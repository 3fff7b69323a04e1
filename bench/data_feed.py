"""Ray Data pipeline vs a torch DataLoader over the same Parquet files, and memory at 1x vs 10x data.

Both sides read the same dataset (speckle images written through ImageDataset.write_center) and run
the same `decode_batch` with the same per-row training augmentation; only the machinery differs:

* ray (streamed): `make_dataset(train=True, cache=False)` -> `iter_shard_batches` in the driver with
  the local shuffle buffer training uses (read + decode in Ray tasks every epoch). The headline
  `ray_vs_dataloader`; the same without the buffer is reported to show what the buffer costs.
* ray (cached): `make_dataset(train=True, cache=True)`: PNGs decoded once into the object store,
  resizing and augmentation per epoch, the same shuffle buffer: `ray_cached_vs_dataloader`. Its
  first epoch includes the decode-once pass.
* torch: an IterableDataset over the Parquet row groups (shuffled per epoch, split between workers),
  DataLoader(num_workers = cores, persistent_workers, prefetch_factor 4, pin_memory off on CPU).

Each measurement runs in a fresh child process so its process tree (driver, Ray's raylet/GCS/workers,
or DataLoader workers) is its own; a thread samples the tree's memory. Throughput is the median of
warm epochs (the first epoch, which starts workers, is reported apart). RSS summed over processes
counts shared pages (Ray's object store) once per process that maps them, so PSS is reported beside it.

Real-size mode (`real_size` in the JSON; `--no-real-size` skips it): public breast-US sets are gray
PNGs of 270-860 px, larger than the phantom's, so every streamed epoch decodes and resizes more. The
same three feeds (streamed, cached, DataLoader) over such PNGs at each training size (128 and 224 px),
against the ceiling of the same machine measured in the same run: PNG decode + one resize to the
training size in one process per core, bytes already in memory, nothing else
(`ray_streamed_vs_ceiling`, target >= 0.5 at 128 px; `ray_cached_vs_dataloader` >= 1.0).

Prints ONE JSON line and writes bench/results/data_feed.json. `make bench` runs it; `--quick` is a
smaller run.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before numpy/torch: one thread per process on a 2-core box

import numpy as np  # noqa: E402
import torch.utils.data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import best_pool_rate, emit, start_ray  # noqa: E402


# ---- data ---------------------------------------------------------------------------------------

def speckle_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Fully developed speckle (Rayleigh magnitude of a PSF-blurred complex field), log-compressed, darker with depth."""
    from scipy.ndimage import gaussian_filter

    field = rng.standard_normal((height, width)) + 1j * rng.standard_normal((height, width))
    blurred = gaussian_filter(field.real, (1.0, 2.0)) + 1j * gaussian_filter(field.imag, (1.0, 2.0))
    amplitude = np.abs(blurred) * np.exp(-np.linspace(0, 1.5, height))[:, None]
    db = 20 * np.log10(amplitude / amplitude.max() + 1e-6)
    return np.clip((db + 50) / 50 * 255, 0, 255).astype(np.uint8)


# Source image shapes (height, width): the phantom-like default, and the spread of public breast
# ultrasound sets (BUS-BRA, BUSI: gray PNGs of 270 to 860 px a side)
SHAPES = ((300, 400), (360, 360), (280, 420), (400, 300))
REAL_SIZE_SHAPES = ((270, 360), (456, 600), (580, 760), (860, 660))


def write_speckle_dataset(root: str, centers: int, images_per_center: int, replicas: int = 1, seed: int = 0,
                          shapes: tuple[tuple[int, int], ...] = SHAPES):
    """`centers` centers of `images_per_center` images each (center c's of shape shapes[c % len(shapes)]),
    every row repeated `replicas` times (new case ids)."""
    import pyarrow as pa
    from PIL import Image

    from diffkd.data.dataset import ImageDataset
    from diffkd.data.schema import arrow_schema

    rng = np.random.default_rng(seed)
    ds = ImageDataset(root)
    pool = []  # a few distinct images per center shape, reused: decoding cost does not depend on the content
    for c in range(centers):
        height, width = shapes[c % len(shapes)]
        if len(pool) <= c % len(shapes):
            images = []
            for _ in range(8):
                buf = io.BytesIO()
                Image.fromarray(speckle_image(rng, height, width)).save(buf, format="PNG")
                images.append(buf.getvalue())
            pool.append(images)
        name = f"C{c:02d}"
        rows = []
        for r in range(replicas):
            for i in range(images_per_center):
                data = pool[c % len(shapes)][i % 8]
                rows.append(dict(case_id=f"{name}-{r}-{i}", patient_id=f"{name}-p{i}", center=name, modality="us",
                                 label=int(rng.random() < 0.26), image=data, mask=None, height=height, width=width,
                                 spacing_mm=0.1, synthetic=False, source="bench", sha256=hashlib.sha256(data).hexdigest(),
                                 age=float(rng.uniform(30, 80)), lesion_size_mm=float(rng.uniform(5, 40))))
        table = pa.Table.from_pylist(rows)
        for f in arrow_schema():
            if f.name not in table.column_names:
                table = table.append_column(f.name, pa.nulls(len(table), f.type))
        ds.write_center(name, table)
    return ds


# ---- memory -------------------------------------------------------------------------------------

class PeakMemory:
    """Samples RSS and PSS summed over a process (default: this one) and all its descendants, in a
    background thread."""

    def __init__(self, interval: float = 0.05, pid: int | None = None):
        self.interval, self.peak_rss, self.peak_pss, self.processes = interval, 0, 0, 0
        self.pid = pid
        self._stop = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            me = psutil.Process(self.pid)
            tree = [me, *me.children(recursive=True)]
        except psutil.NoSuchProcess:  # the watched process (or a child being listed) has exited
            return
        rss = pss = count = 0
        for proc in tree:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss, pss, count = rss + info.rss, pss + getattr(info, "pss", info.rss), count + 1
        if rss > self.peak_rss:
            self.peak_rss, self.processes = rss, count
        self.peak_pss = max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# ---- the two feeders (run in child processes) -----------------------------------------------------

class ParquetRowGroups(torch.utils.data.IterableDataset):
    """The DataLoader side: row groups of the dataset's files, shuffled per epoch, dealt out to the workers."""

    def __init__(self, root: str, cfg, epoch_counter):
        import pyarrow.parquet as pq

        from diffkd.data.dataset import ImageDataset

        self.dataset, self.cfg, self.epoch = ImageDataset(root), cfg, epoch_counter
        self.units = [(center, path, rg) for center in self.dataset.centers() for path in self.dataset.files([center])
                      for rg in range(pq.ParquetFile(path, filesystem=self.dataset.fs).num_row_groups)]

    def __iter__(self):
        import pyarrow.parquet as pq

        from diffkd.data.pipeline import READ_COLUMNS, collate, decode_batch, row_generators

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch = self.epoch.value
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.units))
        files = {}
        for k in order[worker::workers]:
            center, path, rg = self.units[k]
            if path not in files:
                files[path] = pq.ParquetFile(path, filesystem=self.dataset.fs)
            # the files do not carry the center (their partition directory does)
            table = files[path].read_row_group(rg, columns=[c for c in READ_COLUMNS if c != "center"])
            for start in range(0, table.num_rows, self.cfg.batch_size):
                chunk = table.slice(start, self.cfg.batch_size)
                rows = {n: chunk.column(n).to_numpy(zero_copy_only=False) for n in chunk.column_names}
                rows["center"] = np.full(chunk.num_rows, center, dtype=object)
                yield collate(decode_batch(rows, self.cfg, row_generators(rows["case_id"], self.cfg.seed, epoch)))


class TorchFeed:
    """A well-configured DataLoader: one worker per core, persistent, prefetching; pin_memory off on CPU."""

    def __init__(self, root: str, cfg, workers: int):
        import multiprocessing

        self.epoch = multiprocessing.Value("i", 0)
        self.loader = torch.utils.data.DataLoader(ParquetRowGroups(root, cfg, self.epoch), batch_size=None,
                                                  num_workers=workers, persistent_workers=True, prefetch_factor=4,
                                                  pin_memory=False)

    def epoch_images(self, epoch: int) -> dict:
        self.epoch.value = epoch
        return count(self.loader)


class RayFeed:
    """The pipeline as training uses it: make_dataset(train=True) -> iter_shard_batches, consumed in this process."""

    def __init__(self, root: str, cfg, cache: bool = False):
        import ray

        from diffkd.data.dataset import ImageDataset
        from diffkd.data.pipeline import make_dataset
        if not ray.is_initialized():
            start_ray(tempfile.mkdtemp(prefix="rb", dir="/tmp"), logging_level="ERROR")
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        self.cfg, self.dataset = cfg, make_dataset(ImageDataset(root), None, cfg, train=True, cache=cache)

    def epoch_images(self, epoch: int, shuffle_buffer: int = 0) -> dict:
        from diffkd.data.pipeline import iter_shard_batches

        return count(iter_shard_batches(self.dataset, self.cfg.batch_size, shuffle_buffer=shuffle_buffer,
                                        shuffle_seed=epoch))


def count(batches) -> dict:
    """Images in an epoch, how many distinct centers a batch holds on average (how well the stream mixes),
    and the seconds until the first batch arrived (the epoch's start-up, shuffle-buffer fill included)."""
    images, mixing, first_batch_s = 0, [], None
    start = time.perf_counter()
    for batch in batches:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - start
        images += len(batch["label"])
        mixing.append(len(set(batch["center_idx"].tolist())))
    return {"images": images, "centers_per_batch": sum(mixing) / max(len(mixing), 1), "first_batch_s": first_batch_s}


def process_cpu(processes) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except Exception:  # exited between listing and reading
            pass
    return total


def cpu_groups() -> dict[str, list]:
    """This process's tree split into the DataLoader's forked workers and Ray's processes; this process is in both."""
    import psutil

    me = psutil.Process()
    mine = me.cmdline()
    groups = {"torch": [me], "ray": [me]}
    for proc in me.children(recursive=True):
        try:
            groups["torch" if proc.ppid() == me.pid and proc.cmdline() == mine else "ray"].append(proc)
        except psutil.NoSuchProcess:
            pass
    return groups


def timed_epoch(system: str, run) -> dict:
    before = {p.pid: process_cpu([p]) for p in cpu_groups()[system]}
    start = time.perf_counter()
    counted = run()
    seconds = time.perf_counter() - start
    cpu = sum(process_cpu([p]) - before.get(p.pid, 0.0) for p in cpu_groups()[system])
    return {**counted, "seconds": seconds, "cpu_seconds": cpu}


def throughput_child(args, cfg) -> dict:
    """Both systems alive in one process, epochs interleaved in rotating order, so load swings hit both alike."""
    torch_feed = TorchFeed(args.root, cfg, args.workers)
    first_torch = timed_epoch("torch", lambda: torch_feed.epoch_images(0))  # forks the workers before Ray starts
    ray_feed = RayFeed(args.root, cfg)
    first_ray = timed_epoch("ray", lambda: ray_feed.epoch_images(0, args.shuffle_buffer))
    feeds = {}
    # the cached feed's first epoch includes decoding the set once into the object store
    first_cached = timed_epoch("ray", lambda: (feeds.setdefault("cached", RayFeed(args.root, cfg, cache=True))
                                               .epoch_images(0, args.shuffle_buffer)))
    runs = {
        "ray_shuffle": lambda e: timed_epoch("ray", lambda: ray_feed.epoch_images(e, args.shuffle_buffer)),
        "torch": lambda e: timed_epoch("torch", lambda: torch_feed.epoch_images(e)),
        "ray_cached": lambda e: timed_epoch("ray", lambda: feeds["cached"].epoch_images(e, args.shuffle_buffer)),
        "ray": lambda e: timed_epoch("ray", lambda: ray_feed.epoch_images(e)),
    }
    names, epochs = list(runs), {name: [] for name in runs}
    for rep in range(args.epochs):
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]
            epochs[name].append(runs[name](rep + 1))
    return {"epochs": epochs, "first": {"ray": first_ray, "ray_cached": first_cached, "torch": first_torch}}


def memory_child(args, cfg) -> dict:
    with PeakMemory() as memory:
        if args.child == "memory_torch":
            feed = TorchFeed(args.root, cfg, args.workers)
        else:
            feed = RayFeed(args.root, cfg)
        images = feed.epoch_images(0)["images"]
    return {"images": images, "peak_rss": memory.peak_rss, "peak_pss": memory.peak_pss, "processes": memory.processes}


def _decode_and_resize(item: tuple[bytes, int]) -> int:
    from PIL import Image

    data, size = item
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.resize((size, size), Image.Resampling.BILINEAR).size[0]


def decode_resize_ceiling(root: str, image_size: int, workers: int, passes: int = 2) -> dict:
    """The machine's ceiling for the data side: images/s of PNG decode + one bilinear resize to the
    training size and nothing else, in `workers` processes (one per core), PNG bytes already in
    memory; the best of `passes` passes."""
    from diffkd.data.dataset import ImageDataset

    images = ImageDataset(root).read_table(columns=["image"]).column("image").to_pylist()
    items = [(data, image_size) for data in images]
    return {"images_per_s": best_pool_rate(_decode_and_resize, items, workers, passes), "images": len(items)}


def child(args) -> None:
    from diffkd.data.pipeline import PipelineConfig

    if args.child == "ceiling":
        print(json.dumps(decode_resize_ceiling(args.root, args.image_size, args.workers)))
        return
    cfg = PipelineConfig(image_size=args.image_size, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer)
    print(json.dumps(throughput_child(args, cfg) if args.child == "throughput" else memory_child(args, cfg)))


def run_child(kind: str, root: str, args, script: str = os.path.abspath(__file__)) -> dict:
    """Run `script --child kind` in a fresh process (its own process tree) and return its JSON line."""
    cmd = [sys.executable, script, "--child", kind, "--root", root, "--epochs", str(args.epochs),
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--shuffle-buffer", str(args.shuffle_buffer), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"benchmark child {kind} on {root} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def summarise(epochs: list[dict]) -> dict:
    return {"images_per_s": statistics.median(e["images"] / e["seconds"] for e in epochs),
            "cpu_ms_per_image": statistics.median(1000 * e["cpu_seconds"] / e["images"] for e in epochs),
            "centers_per_batch": statistics.mean(e["centers_per_batch"] for e in epochs),
            "first_batch_s": statistics.median(e["first_batch_s"] for e in epochs),
            # images/s once the first batch is in: the stream's steady rate, start-up left out
            "after_first_batch_images_per_s": statistics.median(
                e["images"] / max(e["seconds"] - e["first_batch_s"], 1e-9) for e in epochs)}


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller dataset and fewer epochs")
    parser.add_argument("--centers", type=int, default=4)
    parser.add_argument("--images-per-center", type=int, default=150)
    parser.add_argument("--scale", type=int, default=10, help="the large dataset is this many times the small one")
    parser.add_argument("--epochs", type=int, default=4, help="warm epochs per system (after one warm-up each)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shuffle-buffer", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--real-size-images", type=int, default=240,
                        help="images in the real-size mode (source PNGs of 270-860 px, as public breast-US sets)")
    parser.add_argument("--real-size-train-sizes", default="128,224", help="training sizes of the real-size mode")
    parser.add_argument("--no-real-size", action="store_true", help="skip the real-size mode")
    parser.add_argument("--child", choices=["throughput", "memory_ray", "memory_torch", "ceiling"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.images_per_center, args.epochs, args.scale, args.real_size_images = 40, 2, 4, 48

    with tempfile.TemporaryDirectory(prefix="diffkd-bench-") as tmp:
        small, large = os.path.join(tmp, "x1"), os.path.join(tmp, f"x{args.scale}")
        write_speckle_dataset(small, args.centers, args.images_per_center)
        write_speckle_dataset(large, args.centers, args.images_per_center, replicas=args.scale)
        speed = run_child("throughput", small, args)
        memory = {(system, scale): run_child(f"memory_{system}", root, args)
                  for scale, root in (("x1", small), (f"x{args.scale}", large)) for system in ("ray", "torch")}
        real_size = {} if args.no_real_size else real_size_mode(args, os.path.join(tmp, "real-size"))

    names = ("ray", "torch", "ray_shuffle", "ray_cached")
    ray, loader, shuffled, cached = (summarise(speed["epochs"][name]) for name in names)

    streamed_ratio, cached_ratio = _paired(speed, "ray_shuffle"), _paired(speed, "ray_cached")
    big = f"x{args.scale}"
    ray_memory_ratio = memory["ray", big]["peak_rss"] / memory["ray", "x1"]["peak_rss"]
    result = {
        "bench": "data_feed",
        "images": args.centers * args.images_per_center, "scale": args.scale, "image_size": args.image_size,
        "batch_size": args.batch_size, "cpus": os.cpu_count(), "dataloader_workers": args.workers,
        "warm_epochs": args.epochs, "shuffle_buffer": args.shuffle_buffer,
        "modes": {"ray_vs_dataloader": "streamed, shuffle buffer on",
                  "ray_cached_vs_dataloader": "cached in the object store, shuffle buffer on"},
        "ray_images_per_s": round(shuffled["images_per_s"], 1),
        "ray_cached_images_per_s": round(cached["images_per_s"], 1),
        "dataloader_images_per_s": round(loader["images_per_s"], 1),
        "ray_vs_dataloader": round(streamed_ratio, 3),
        "ray_cached_vs_dataloader": round(cached_ratio, 3),
        "ray_no_shuffle_buffer_images_per_s": round(ray["images_per_s"], 1),
        "ray_no_shuffle_buffer_vs_dataloader": round(_paired(speed, "ray"), 3),
        "shuffle_buffer_cost": round(1 - shuffled["images_per_s"] / ray["images_per_s"], 3),
        "cpu_ms_per_image": {"ray": round(shuffled["cpu_ms_per_image"], 2),
                             "ray_cached": round(cached["cpu_ms_per_image"], 2),
                             "dataloader": round(loader["cpu_ms_per_image"], 2)},
        "first_epoch_images_per_s": {k: round(v["images"] / v["seconds"], 1) for k, v in speed["first"].items()},
        # where a warm epoch goes: its start-up (seconds to the first batch) and the rate after it
        "first_batch_s": {"ray": round(shuffled["first_batch_s"], 3), "ray_cached": round(cached["first_batch_s"], 3),
                          "ray_no_shuffle_buffer": round(ray["first_batch_s"], 3),
                          "dataloader": round(loader["first_batch_s"], 3)},
        "after_first_batch_images_per_s": {"ray": round(shuffled["after_first_batch_images_per_s"], 1),
                                           "ray_cached": round(cached["after_first_batch_images_per_s"], 1),
                                           "ray_no_shuffle_buffer": round(ray["after_first_batch_images_per_s"], 1),
                                           "dataloader": round(loader["after_first_batch_images_per_s"], 1)},
        "centers_per_batch": {"ray": round(shuffled["centers_per_batch"], 2),
                              "ray_cached": round(cached["centers_per_batch"], 2),
                              "ray_no_shuffle_buffer": round(ray["centers_per_batch"], 2),
                              "dataloader": round(loader["centers_per_batch"], 2), "of": args.centers},
        "peak_rss_mib": {f"{system}_{scale}": mib(m["peak_rss"]) for (system, scale), m in memory.items()},
        "peak_pss_mib": {f"{system}_{scale}": mib(m["peak_pss"]) for (system, scale), m in memory.items()},
        "processes_at_peak": {f"{system}_{scale}": m["processes"] for (system, scale), m in memory.items()},
        "ray_memory_ratio": round(ray_memory_ratio, 3),
        "ray_memory_ratio_pss": round(memory["ray", big]["peak_pss"] / memory["ray", "x1"]["peak_pss"], 3),
        "dataloader_memory_ratio": round(memory["torch", big]["peak_rss"] / memory["torch", "x1"]["peak_rss"], 3),
        "targets": {"ray_vs_dataloader": ">= 0.85", "ray_cached_vs_dataloader": ">= 1.0",
                    "ray_memory_ratio": "<= 1.2"},
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    result["meets_target"] = bool(streamed_ratio >= 0.85 and cached_ratio >= 1.0 and ray_memory_ratio <= 1.2)
    if real_size:
        result["real_size"] = real_size
        at_128 = real_size["by_train_size"].get("128")
        if at_128:
            result["meets_real_size_target"] = bool(at_128["ray_cached_vs_dataloader"] >= 1.0
                                                    and at_128["ray_streamed_vs_ceiling"] >= 0.5)
    emit(result)


def real_size_mode(args, root: str) -> dict:
    """Real-size source PNGs (270-860 px) at each training size: the Ray feed streamed and cached and
    the DataLoader, epochs interleaved as in the main mode, against the decode + resize ceiling
    measured on the same PNGs in the same run."""
    centers = len(REAL_SIZE_SHAPES)
    per_center = max(1, args.real_size_images // centers)
    write_speckle_dataset(root, centers, per_center, shapes=REAL_SIZE_SHAPES)
    out = {"source_shapes": [list(s) for s in REAL_SIZE_SHAPES], "images": centers * per_center,
           "targets": {"ray_cached_vs_dataloader at 128": ">= 1.0", "ray_streamed_vs_ceiling at 128": ">= 0.5"},
           "by_train_size": {}}
    for size in (int(s) for s in args.real_size_train_sizes.split(",")):
        sized = argparse.Namespace(**{**vars(args), "image_size": size})
        speed = run_child("throughput", root, sized)
        ceiling = run_child("ceiling", root, sized)["images_per_s"]
        rates = {name: summarise(speed["epochs"][name])["images_per_s"] for name in ("ray_shuffle", "ray_cached", "torch")}
        out["by_train_size"][str(size)] = {
            "ray_streamed_images_per_s": round(rates["ray_shuffle"], 1),
            "ray_cached_images_per_s": round(rates["ray_cached"], 1),
            "dataloader_images_per_s": round(rates["torch"], 1),
            "decode_resize_ceiling_images_per_s": round(ceiling, 1),
            "ray_cached_vs_dataloader": round(_paired(speed, "ray_cached"), 3),
            "ray_streamed_vs_dataloader": round(_paired(speed, "ray_shuffle"), 3),
            "ray_streamed_vs_ceiling": round(rates["ray_shuffle"] / ceiling, 3),
            "ray_cached_vs_ceiling": round(rates["ray_cached"] / ceiling, 3),
            "dataloader_vs_ceiling": round(rates["torch"] / ceiling, 3),
        }
    return out


def _paired(speed: dict, name: str) -> float:
    """Median over epochs of (that Ray feed / the DataLoader), epochs run back to back."""
    return statistics.median((r["images"] / r["seconds"]) / (t["images"] / t["seconds"])
                             for r, t in zip(speed["epochs"][name], speed["epochs"]["torch"]))


if __name__ == "__main__":
    main()
