"""What the training benches share: the reference loops they compare the framework against, datasets
built the way the pipeline builds them, and how a bench hands in its result.

Reference loops (`reference_loop`), each in fresh processes started for it, one torch thread each,
the same task step, optimizer, clipping and LR schedule as `diffkd.train.loop.fit`:

* ``torch``: one plain process, no wrapper; an epoch ends with `torch.save` of model, optimizer and
  schedule, which is what a plain-torch user waits for.
* ``ddp``: torch DistributedDataParallel over gloo with `world` processes, rank 0 checkpointing the
  same way: the fair reference for multi-worker scaling on the same machine.
* ``deepspeed``: the loop's own DeepSpeed engine (`deepspeed_config.build_engine`) and its checkpoint writer
  (`checkpoint.save_checkpoint`), without Ray: what DeepSpeed costs apart from Ray.

Each returns per-epoch rates of the epochs after the first (warm-up): ``inner`` the step loop alone,
``whole`` the step loop plus the checkpoint (and the barrier after it), and ``inner_per_cpu_s`` the
step loop's samples per CPU second of the training processes: on a machine shared with other work,
wall-clock rates move with the load, the work per sample much less.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def emit(result: dict) -> None:
    """Print the bench's one JSON line and keep it as bench/results/<bench>.json (written atomically;
    $BENCH_RESULTS_DIR moves the folder, e.g. for a test)."""
    line = json.dumps(result, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    print(line, flush=True)
    folder = os.environ.get("BENCH_RESULTS_DIR") or os.path.join(BENCH_DIR, "results")
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(line + "\n")
    os.replace(tmp, os.path.join(folder, f"{result['bench']}.json"))


def start_ray(temp_dir: str, num_cpus: int = 4, **kwargs) -> None:
    """A private local Ray instance; one retry, because on an overloaded machine the raylet can miss
    Ray's fixed 30 s start-up wait."""
    import ray

    from diffkd.runtime.raycompat import init_local

    try:
        init_local(num_cpus=num_cpus, temp_dir=temp_dir, **kwargs)
    except Exception as err:  # Ray raises a bare Exception for this
        if "timed out during startup" not in str(err):
            raise
        ray.shutdown()
        init_local(num_cpus=num_cpus, temp_dir=temp_dir + "-retry", **kwargs)


def pipeline_dataset(rows: list[dict], batch_size: int):
    """A Ray dataset of `rows` in blocks of one batch, as the Parquet pipeline makes them (`block_bytes`).

    `from_items` alone would cut a few hundred rows into ~200 blocks of 1-2 rows, each a call to the
    split coordinator, which the real pipeline never does.
    """
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch_size))


def mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def rounded(values: list[float], digits: int = 2) -> list[float]:
    return [round(v, digits) for v in values]


def best_pool_rate(work, items: list, workers: int, passes: int = 2) -> float:
    """Items/s of `work` mapped over `items` in `workers` spawned processes (one per core): the best of
    `passes` passes, after a first call per worker so that start-up and imports are not timed. A
    ceiling the framework's figure is compared with in the same run."""
    import multiprocessing

    rates = []
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(work, items[:workers])
        for _ in range(passes):
            start = time.perf_counter()
            pool.map(work, items, chunksize=8)
            rates.append(len(items) / (time.perf_counter() - start))
    return max(rates)


# ---- through the framework ------------------------------------------------------------------------

def through_loop(task, rows: list[dict] | int, cfg, dataset=None) -> dict[str, Any]:
    """`fit` on `rows` (split over cfg.num_workers): global samples/s per counted epoch, and where epochs go.

    With `dataset` (a Ray dataset from the pipeline), `rows` is its number of rows and `fit` reads it.
    inner: the step loop; whole: epoch start to the next epoch's start (validation, checkpoint,
    `ray.train.report` and its barrier included), so a run of E epochs counts E-2 whole epochs.
    """
    from diffkd.train.loop import epoch_wall_seconds, fit

    count = rows if dataset is not None else len(rows)
    started = time.perf_counter()
    result = fit(task, {"train": dataset if dataset is not None else pipeline_dataset(rows, cfg.batch_size)}, cfg)
    wall = time.perf_counter() - started
    history = result.history
    samples = count // cfg.num_workers // cfg.batch_size * cfg.batch_size * cfg.num_workers
    if cfg.max_steps_per_epoch:
        samples = min(samples, cfg.max_steps_per_epoch * cfg.batch_size * cfg.num_workers)
    counted = history[1:]
    return {"inner": [h["samples_per_s"] for h in counted],
            "whole": [samples / s for s in epoch_wall_seconds(history)[1:]],
            "inner_per_cpu_s": [samples / h["train_cpu_s"] for h in counted],
            "data_wait_s": [round(h["data_wait_s"], 3) for h in counted],
            "first_batch_s": [round(h["first_batch_s"], 3) for h in history],
            "train_s": [round(h["train_s"], 3) for h in counted],
            "run_wall_s": round(wall, 1)}


# ---- reference loops, in processes of their own -----------------------------------------------------

def reference_loop(mode: str, task, rows: list[dict], cfg, world: int = 1) -> dict[str, list[float]]:
    """Run `mode` ('torch' | 'ddp' | 'deepspeed') with `world` processes on `rows` split between them."""
    import torch.multiprocessing as mp

    if mode == "torch" and world != 1:
        raise ValueError("the plain torch reference is one process; use mode 'ddp' for several")
    with tempfile.TemporaryDirectory(prefix="dkref") as tmp:
        out = os.path.join(tmp, "result.json")
        port = _free_port()  # a fresh one per run: two runs on one port collide while the first one's closes
        mp.start_processes(_reference_worker, args=(mode, world, port, task, rows, cfg, tmp, out), nprocs=world,
                           start_method="spawn", join=True)
        with open(out) as f:
            return json.load(f)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _warmup_cosine(optimizer: torch.optim.Optimizer, cfg, total: int):
    warmup = max(1, int(round(cfg.warmup_fraction * total)))

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + np.cos(np.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _reference_worker(rank: int, mode: str, world: int, port: int, task, rows: list[dict], cfg, tmp: str,
                      out: str) -> None:
    import torch.distributed as dist

    from diffkd.train.deepspeed_config import build_optimizer, prepare_deepspeed

    torch.set_num_threads(1)
    if mode != "torch":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank))
        prepare_deepspeed(use_gpu=False)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(cfg.seed)
    device = torch.device("cpu")
    per_rank = len(rows) // world
    mine = rows[rank * per_rank:(rank + 1) * per_rank]
    steps = per_rank // cfg.batch_size
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    tensors = {k: torch.from_numpy(np.stack([r[k] for r in mine]))
               for k, v in mine[0].items() if isinstance(v, (np.ndarray, np.generic))}  # ids stay out
    model = task.build_model()
    if mode == "deepspeed":
        from diffkd.train.checkpoint import LoopState, save_checkpoint
        from diffkd.train.deepspeed_config import build_engine

        engine = build_engine(model, cfg, world, cfg.epochs * steps, device)
        forward, module = engine, engine.module
    else:
        optimizer = build_optimizer(model, cfg)
        schedule = _warmup_cosine(optimizer, cfg, cfg.epochs * steps)
        forward = torch.nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
        module = model
    task.setup(device)
    inner, whole, inner_per_cpu = [], [], []
    for epoch in range(cfg.epochs):
        task.on_epoch_start(epoch + 1)
        order = torch.randperm(per_rank)
        start, cpu_start = time.perf_counter(), time.process_time()
        samples = 0
        for step in range(steps):
            idx = order[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = {k: v[idx] for k, v in tensors.items()}
            result = task.step(forward, batch)
            if mode == "deepspeed":
                engine.backward(result.loss)
                engine.step()
            else:
                optimizer.zero_grad(set_to_none=True)
                result.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                schedule.step()
            task.after_optimizer_step(module)
            samples += result.num_samples
        inner_s, inner_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        if mode == "deepspeed":
            with tempfile.TemporaryDirectory(dir=tmp) as local:
                save_checkpoint(local, engine, LoopState(epoch=epoch + 1), rank=rank, world_size=world,
                                task_name=task.name)
        elif rank == 0:
            path = os.path.join(tmp, "checkpoint.pt")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "epoch": epoch + 1}, path + ".tmp")
            os.replace(path + ".tmp", path)
        if mode != "torch":
            dist.barrier()
        whole_s = time.perf_counter() - start
        cpu_seconds = [None] * world
        if mode != "torch":
            dist.all_gather_object(cpu_seconds, inner_cpu_s)
        else:
            cpu_seconds = [inner_cpu_s]
        if epoch:  # the first epoch is warm-up
            inner.append(samples * world / inner_s)
            whole.append(samples * world / whole_s)
            inner_per_cpu.append(samples * world / sum(cpu_seconds))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"inner": inner, "whole": whole, "inner_per_cpu_s": inner_per_cpu}, f)
    if mode != "torch":
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: with DeepSpeed loaded, about one 2-process run in six
    # aborted there ("terminate called without an active exception") after its results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- whole commands: a phantom cohort, the demo's config, `diffkd ...` timed ---------------------------

DIFFKD = os.path.join(os.path.dirname(sys.executable), "diffkd")  # the venv's console script


def run_diffkd(argv: list[str], log_path: str, env: dict[str, str] | None = None) -> float:
    """Run `diffkd argv` as its own process, output into `log_path`; its wall seconds. One retry when
    Ray's start timed out (an overloaded machine, see `start_ray`: the command failed before doing
    anything); any other failure raises with the log's tail."""
    retried = False
    while True:
        offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        started = time.perf_counter()
        with open(log_path, "a") as log:
            code = subprocess.call([DIFFKD, *argv], stdout=log, stderr=log, env={**os.environ, **(env or {})})
        seconds = time.perf_counter() - started
        if not code:
            return seconds
        with open(log_path) as f:
            f.seek(offset)
            output = f.read()
        if retried or "timed out during startup" not in output:
            raise RuntimeError(f"diffkd {' '.join(argv[:2])} failed (exit {code}); end of {log_path}:\n"
                               f"{output[-3000:]}")
        retried = True


def phantom_dataset(root: str, centers: int, patients: int, log_path: str, doppler_fraction: float = 0.0,
                    seed: int = 0) -> tuple[str, list[str]]:
    """A demo-size phantom cohort ingested as the demo does it: (dataset folder, center names); the
    last center is the one a bench holds out as external."""
    phantom, data = os.path.join(root, "phantom"), os.path.join(root, "data")
    run_diffkd(["phantom", "--out", phantom, "--size", "demo", "--centers", str(centers), "--patients",
                str(patients), "--seed", str(seed), "--doppler-fraction", str(doppler_fraction)], log_path)
    names = sorted(n for n in os.listdir(phantom) if os.path.exists(os.path.join(phantom, n, "clinical.csv")))
    for name in names:
        run_diffkd(["ingest", os.path.join(phantom, name), "--center", name, "--dataset", data, "--clinical",
                    os.path.join(phantom, name, "clinical.csv")], log_path)
    return data, names


def demo_config(path: str, student_epochs: int, teacher_epochs: int, image_size: int = 64, **sections) -> str:
    """configs/demo.yaml with the teacher's and student's epochs (and image size) set, every epoch
    eligible as the best (min_epochs 0, no early stop), and any top-level `sections` replaced; written
    to `path`."""
    import yaml

    with open(os.path.join(os.path.dirname(BENCH_DIR), "configs", "demo.yaml")) as f:
        cfg = yaml.safe_load(f)
    for stage, epochs in (("teacher", teacher_epochs), ("student", student_epochs)):
        cfg[stage]["loop"].update(epochs=epochs, min_epochs=0, patience=0, progress=False)
        cfg[stage]["pipeline"]["image_size"] = image_size
    cfg.update(sections)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path
