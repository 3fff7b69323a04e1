"""Jobs the multi-node tests submit with `diffkd submit` (run on the cluster as `python tests/cluster/cluster_jobs.py ...`).

deepspeed  a Ray Train TorchTrainer of 2 workers on 2 nodes (STRICT_SPREAD) training a small MLP
           with DeepSpeed ZeRO-2; checkpoints every epoch (all ranks save, ZeRO shards keep their
           rank in the name), resumes from the latest one after a failure (FailureConfig), and
           writes a JSON result: node ranks and IPs, the loss of every epoch and which attempt ran it.
tune       a Tune search of function trials that checkpoint every iteration; trials lost with
           their node are retried from their checkpoints (tune.FailureConfig).

Data and results are on the shared storage given by --storage / --out, never in the job package.
Everything is seeded per (epoch, rank), so an interrupted and resumed run reproduces an
uninterrupted one exactly: that is how the fault test shows nothing was lost.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

FEATURES, HIDDEN, SAMPLES_PER_RANK, MICRO_BATCH = 16, 64, 256, 32


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _epoch_data(seed: int, epoch: int, rank: int):
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + rank)
    x = torch.randn(SAMPLES_PER_RANK, FEATURES, generator=gen)
    true_w = torch.linspace(-1, 1, FEATURES)
    y = (x @ true_w).unsqueeze(1) + 0.05 * torch.randn(SAMPLES_PER_RANK, 1, generator=gen)
    return x, y


def deepspeed_train_fn(config: dict) -> None:
    """One Ray Train worker: DeepSpeed ZeRO-2 on CPU (gloo), checkpoint per epoch, resume on restart."""
    started = time.monotonic()
    import deepspeed
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "train_batch_size": MICRO_BATCH * world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    print(f"[rank {rank}] DeepSpeed ready in {time.monotonic() - started:.1f}s", flush=True)

    history, start = [], 0
    attempt = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="state")
            with open(os.path.join(ckpt_dir, "progress.json")) as f:
                progress = json.load(f)
        history, start, attempt = progress["history"], progress["epoch"] + 1, progress["attempt"] + 1

    where = {"rank": rank, "node_rank": ctx.get_node_rank(), "ip": ray.util.get_node_ip_address(),
             "hostname": socket.gethostname()}
    for epoch in range(start, config["epochs"]):
        epoch_started = time.monotonic()
        x, y = _epoch_data(config["seed"], epoch, rank)
        total = 0.0
        for i in range(0, SAMPLES_PER_RANK, MICRO_BATCH):
            loss = torch.nn.functional.mse_loss(engine(x[i:i + MICRO_BATCH]), y[i:i + MICRO_BATCH])
            engine.backward(loss)
            engine.step()
            total += float(loss.detach())
        mean = torch.tensor([total / (SAMPLES_PER_RANK // MICRO_BATCH)])
        torch.distributed.all_reduce(mean)
        time.sleep(config.get("epoch_sleep_s", 0))  # gives the fault test a window to strike in
        train_s = time.monotonic() - epoch_started
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state")  # every rank: its own shard
            history.append({"epoch": epoch, "loss": float(mean) / world, "attempt": attempt,
                            "train_s": round(train_s, 2), "save_s": round(time.monotonic() - epoch_started - train_s, 2)})
            if rank == 0:
                _write_json(os.path.join(tmp, "progress.json"), {"epoch": epoch, "history": history,
                                                                 "attempt": attempt})
            ray.train.report({"epoch": epoch, "loss": history[-1]["loss"], "attempt": attempt, **where},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
    placement = [None] * world
    torch.distributed.all_gather_object(placement, where)
    if rank == 0:
        _write_json(config["out"], {"history": history, "placement": placement, "world_size": world})


def run_deepspeed(args) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(address="auto")
    trainer = TorchTrainer(
        deepspeed_train_fn,
        train_loop_config={"epochs": args.epochs, "seed": args.seed, "out": args.out,
                           "epoch_sleep_s": args.epoch_sleep},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, placement_strategy="STRICT_SPREAD",
                                     resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=args.name, storage_path=args.storage,
                             failure_config=FailureConfig(max_failures=3),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    print("FINAL", json.dumps({"epoch": result.metrics["epoch"], "checkpoint": result.checkpoint.path}))


def tune_trial(config: dict) -> None:
    """A trial that checkpoints every iteration and picks up where its checkpoint left off."""
    import ray.train
    import ray.tune

    start, restored = 0, False
    checkpoint = ray.tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            with open(os.path.join(d, "state.json")) as f:
                start = json.load(f)["iteration"] + 1
        restored = True
    value = config["x"]
    for iteration in range(start, config["iterations"]):
        time.sleep(config["sleep_s"])
        score = -(value - 3.0) ** 2 + iteration * 1e-3
        with tempfile.TemporaryDirectory() as d:
            _write_json(os.path.join(d, "state.json"), {"iteration": iteration})
            ray.tune.report({"iteration_done": iteration, "score": score, "restored": restored,
                             "ip": ray.util.get_node_ip_address()},
                            checkpoint=ray.tune.Checkpoint.from_directory(d))


def run_tune(args) -> None:
    import ray
    from ray import tune

    ray.init(address="auto")
    tuner = tune.Tuner(
        tune.with_resources(tune_trial, {"CPU": 1}),
        param_space={"x": tune.grid_search([1.0, 2.0, 3.0, 4.0]), "iterations": args.iterations,
                     "sleep_s": args.epoch_sleep},
        tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=4),
        run_config=tune.RunConfig(name=args.name, storage_path=args.storage,
                                  failure_config=tune.FailureConfig(max_failures=3)),
    )
    results = tuner.fit()
    trials = [{"x": r.config["x"], "iterations": r.metrics["iteration_done"] + 1,
               "restored": r.metrics["restored"], "error": str(r.error) if r.error else None} for r in results]
    best = results.get_best_result()
    _write_json(args.out, {"trials": trials, "best_x": best.config["x"]})
    print("FINAL", json.dumps({"trials": len(trials), "best_x": best.config["x"]}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["deepspeed", "tune"])
    parser.add_argument("--storage", required=True, help="shared storage for Ray Train / Tune runs")
    parser.add_argument("--name", required=True, help="run name (unique per run: reusing it resumes)")
    parser.add_argument("--out", required=True, help="where the JSON result goes")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--epoch-sleep", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    (run_deepspeed if args.kind == "deepspeed" else run_tune)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
