"""A search's throughput: the same N student trials one after another as plain processes, through
`diffkd tune` with FIFO, and with ASHA; and where each one's time goes.

The cohort is a demo-size phantom (ingested as the demo does), the student is the demo's (its config,
distilling from a teacher trained once beforehand), the space is small (the learning rate and the
logit term's weight) and searched at random with a fixed seed, so FIFO and ASHA draw the same N
trials. Three runs, side by side in one process tree:

* sequential: each of FIFO's N trial settings as its own process, one after another, exactly what a
  Tune trial runs (`train_student` on the train and val rows, no export), each with its own Ray;
* fifo: `diffkd tune` with every trial at the full budget, as many at once as the cluster holds;
* asha: the same with ASHA (grace 1 epoch, reduction factor 2).

Headline: `tune_vs_sequential`, FIFO's trials/hour over the sequential processes' (target >= 0.90);
`asha_compute_saved`, the share of FIFO's trial-epochs ASHA did not train (target >= 0.40) with
`asha_best_within_0_01` (ASHA's best internal AUC within 0.01 of FIFO's best). Each run's time is split
into Ray's start (sequential: per process; tune: before the first trial), per-trial data preparation
(splits and datasets, a cached set's decode pass), start-up (Train worker group, engine), training,
validation, and checkpoint + report; and the PNG decodes each run made (`DIFFKD_DECODE_LOG`).

Prints ONE JSON line and writes bench/results/search.json. `--quick`: a smaller cohort, 2 epochs, 32 px.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import demo_config, emit, phantom_dataset, run_diffkd, start_ray  # noqa: E402

STARTED = time.time()  # a child trial's process start, for its Ray start-up


def space(path: str, scheduler: str, trials: int) -> str:
    """The bench's search space: random search with a fixed seed (FIFO and ASHA draw the same trials)."""
    import yaml

    spec = {"objective": "val_auc", "mode": "max", "num_samples": trials, "max_concurrent_trials": "auto",
            "scheduler": {"name": scheduler, "grace_period": 1, "reduction_factor": 2},
            "search": {"name": "random", "seed": 0},
            "params": {"loop.lr": {"loguniform": [1.0e-3, 1.0e-2]},
                       "distill.terms.logit_standardized.weight": {"uniform": [0.3, 0.9]}}}
    with open(path, "w") as f:
        yaml.safe_dump(spec, f, sort_keys=False)
    return path


# ---- one trial as a plain process ------------------------------------------------------------------

def child_trial(args) -> None:
    """What a Tune trial runs, in this process with its own Ray: prints its timings and history."""
    import dataclasses

    from diffkd.commands.train import real_splits
    from diffkd.experiments.experiment import load_section
    from diffkd.train.student import train_student
    from diffkd.experiments.tune import search_base, student_from_dict, training_rows
    from diffkd.experiments.tune_space import apply_params, load_space

    start_ray(os.path.join(os.path.dirname(args.runs), f"ray-{args.name}"))  # removed with the bench's folder
    ray_ready = time.time()
    cfg = dataclasses.replace(load_section(args.config, "student", required=True), teacher_dir=args.teacher)
    base = search_base(cfg, load_space(args.space))
    params = json.loads(args.params)
    trial = student_from_dict(apply_params(base, params))
    trial = dataclasses.replace(trial, loop=dataclasses.replace(trial.loop, storage_path=args.runs,
                                                                run_name=args.name, progress=False))
    dataset, splits = real_splits(args.dataset, argparse.Namespace(external=args.external, val_fraction=0.2,
                                                                   split_seed=0))
    result = train_student(dataset, training_rows(splits), trial, out_dir=None)
    print(json.dumps({"process_started": STARTED, "ray_ready": ray_ready, "finished": time.time(),
                      "history": result.fit.history}))


def sequential(args, trials: list[dict], paths: dict, tmp: str) -> dict:
    """FIFO's trial settings, each as its own process, one after another."""
    import subprocess

    runs = []
    for k, trial in enumerate(trials):
        started = time.time()
        cmd = [sys.executable, os.path.abspath(__file__), "--child-trial", "--params", json.dumps(trial["params"]),
               "--config", paths["config"], "--teacher", paths["teacher"], "--space", paths["fifo_space"],
               "--dataset", paths["data"], "--external", paths["external"], "--runs", os.path.join(tmp, "seq-runs"),
               "--name", f"seq-{k}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DIFFKD_DECODE_LOG":
                                                                          paths["decodes"]("sequential")})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            sys.stderr.write(proc.stderr[-3000:])
            raise RuntimeError(f"sequential trial {k} failed (exit {proc.returncode})")
        out = json.loads(lines[-1])
        out["wall_s"] = time.time() - started
        runs.append(out)
    return {"wall_s": sum(r["wall_s"] for r in runs), "runs": runs}


# ---- the same through diffkd tune ------------------------------------------------------------------

def tune_run(name: str, paths: dict, tmp: str, log: str) -> dict:
    out = os.path.join(tmp, f"tune-{name}")
    started = time.time()
    wall = run_diffkd(["tune", "--space", paths[f"{name}_space"], "--dataset", paths["data"], "--external",
                       paths["external"], "--config", paths["config"], "--teacher", paths["teacher"], "--out", out],
                      log, env={"DIFFKD_DECODE_LOG": paths["decodes"](name)})
    import pandas as pd

    table = pd.read_csv(os.path.join(out, "trials.csv"))
    trials = []
    for result in glob.glob(os.path.join(out, "search", "*", "result.json")):
        with open(result) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(os.path.dirname(result), "params.json")) as f:
            params = json.load(f)
        if rows:
            trials.append({"params": params, "rows": rows})
    return {"wall_s": wall, "started": started, "table": table, "trials": trials}


def curves(trials: list[dict]) -> list[dict]:
    """Each trial's settings and its internal AUC at every epoch it ran, ordered by settings."""
    out = [{"params": {k: round(v, 5) if isinstance(v, float) else v for k, v in t["params"].items()},
            "val_auc": [round(r["val_auc"], 4) for r in t["rows"] if "val_auc" in r]} for t in trials]
    return sorted(out, key=lambda c: json.dumps(c["params"], sort_keys=True))


# ---- where the time goes ---------------------------------------------------------------------------

def _gaps(history: list[dict]) -> list[float]:
    """Checkpoint + report of each epoch but the last: its whole wall less its step loop and validation."""
    return [b["started_at"] - a["started_at"] - a["train_s"] - a["val_s"] for a, b in zip(history, history[1:])]


def run_end(history: list[dict]) -> float:
    """When a run's last epoch ended, which no later epoch start bounds: its step loop and validation
    plus the mean checkpoint + report of the earlier epochs."""
    gaps, last = _gaps(history), history[-1]
    return last["started_at"] + last["train_s"] + last["val_s"] + (sum(gaps) / len(gaps) if gaps else 0.0)


def history_split(history: list[dict], last_epoch_end: float | None = None) -> dict:
    """A training run's seconds from its history: start-up (worker group, engine), training,
    validation, checkpoint + report (the last epoch ending at `last_epoch_end`, or `run_end`)."""
    end = run_end(history) if last_epoch_end is None else last_epoch_end
    last = history[-1]
    return {"startup_s": history[0]["startup_s"], "training_s": sum(h["train_s"] for h in history),
            "validation_s": sum(h["val_s"] for h in history),
            "checkpoint_report_s": sum(_gaps(history)) + end - last["started_at"] - last["train_s"] - last["val_s"]}


def split_trial(history: list[dict], trial_start: float, last_epoch_end: float | None = None) -> dict:
    """One trial's seconds: data preparation (before `fit`), then `history_split`."""
    submitted = history[0]["started_at"] - history[0]["startup_s"]
    return {"data_prep_s": submitted - trial_start, **history_split(history, last_epoch_end)}


def summed(parts: list[dict]) -> dict:
    return {k: round(sum(p[k] for p in parts), 1) for k in parts[0]} if parts else {}


def tune_split(run: dict) -> dict:
    """Per-trial parts summed over a search's trials, and what came before the first trial."""
    parts, starts = [], []
    for trial in run["trials"]:
        rows = trial["rows"]
        last = rows[-1]
        # a trial's last report came at the end of its last epoch (Tune stamps it to the second), and
        # its clock (time_total_s) started with the trial
        end = float(last["timestamp"])
        start = end - last["time_total_s"]
        starts.append(start)
        parts.append(split_trial(rows, start, end))
    out = summed(parts)
    out["before_first_trial_s"] = round(min(starts) - run["started"], 1)
    out["trial_seconds"] = round(sum(t["rows"][-1]["time_total_s"] for t in run["trials"]), 1)
    out["mean_trials_at_once"] = round(out["trial_seconds"] / run["wall_s"], 2)
    return out


def sequential_split(run: dict) -> dict:
    out = summed([split_trial(r["history"], r["ray_ready"]) for r in run["runs"]])
    out["ray_start_s"] = round(sum(r["ray_ready"] - r["process_started"] for r in run["runs"]), 1)
    out["process_start_s"] = round(sum(r["wall_s"] - (r["finished"] - r["process_started"]) for r in run["runs"]), 1)
    out["after_training_s"] = round(sum(r["finished"] - run_end(r["history"]) for r in run["runs"]), 1)
    return out


def decodes(path: str) -> int:
    from diffkd.data.source_cache import read_decode_log

    return sum(n for _, n, _ in read_decode_log(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="90 patients, 2 student epochs, 32 px")
    parser.add_argument("--trials", type=int, default=8, help="trials per run (the target asks for >= 8)")
    parser.add_argument("--epochs", type=int, default=4, help="student epochs per full trial")
    parser.add_argument("--patients", type=int, default=180, help="phantom patients over all centers")
    parser.add_argument("--centers", type=int, default=3, help="phantom centers; the last is external")
    parser.add_argument("--image-size", type=int, default=64, help="the demo's 64 px")
    for hidden in ("--params", "--config", "--teacher", "--space", "--dataset", "--external", "--runs", "--name"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--child-trial", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_trial:
        return child_trial(args)
    if args.quick:
        args.patients, args.epochs, args.image_size = 90, 2, 32

    with tempfile.TemporaryDirectory(prefix="dks") as tmp:
        log = os.path.join(tmp, "commands.log")
        setup_started = time.time()
        data, centers = phantom_dataset(tmp, args.centers, args.patients, log)
        paths = {"data": data, "external": centers[-1], "teacher": os.path.join(tmp, "teacher"),
                 "config": demo_config(os.path.join(tmp, "bench.yaml"), args.epochs, 2, args.image_size),
                 "fifo_space": space(os.path.join(tmp, "fifo.yaml"), "fifo", args.trials),
                 "asha_space": space(os.path.join(tmp, "asha.yaml"), "asha", args.trials),
                 "decodes": lambda run: os.path.join(tmp, f"decodes-{run}.log")}
        run_diffkd(["train", "teacher", "--config", paths["config"], "--dataset", data, "--external",
                    centers[-1], "--out", paths["teacher"], "--storage", os.path.join(tmp, "teacher-runs")], log)
        setup_s = time.time() - setup_started
        fifo = tune_run("fifo", paths, tmp, log)
        seq = sequential(args, [t for t in fifo["trials"]], paths, tmp)
        asha = tune_run("asha", paths, tmp, log)
        decoded = {name: decodes(paths["decodes"](name)) for name in ("sequential", "fifo", "asha")}

    fifo_epochs, asha_epochs = int(fifo["table"]["epochs"].sum()), int(asha["table"]["epochs"].sum())
    fifo_best, asha_best = float(fifo["table"]["val_auc"].max()), float(asha["table"]["val_auc"].max())
    n = len(fifo["trials"])
    hours = {"sequential": seq["wall_s"] / 3600, "fifo": fifo["wall_s"] / 3600, "asha": asha["wall_s"] / 3600}
    tune_vs_sequential = seq["wall_s"] / fifo["wall_s"]
    saved = 1 - asha_epochs / fifo_epochs
    within = asha_best >= fifo_best - 0.01
    emit({
        "bench": "search", "trials": n, "epochs": args.epochs, "patients": args.patients, "centers": args.centers,
        "image_size": args.image_size, "student": "configs/demo.yaml student", "setup_s": round(setup_s, 1),
        "wall_s": {k: round(v * 3600, 1) for k, v in hours.items()},
        "trials_per_hour": {k: round(n / v, 1) for k, v in hours.items()},
        "tune_vs_sequential": round(tune_vs_sequential, 3),
        "fifo_trial_epochs": fifo_epochs, "asha_trial_epochs": asha_epochs,
        "asha_compute_saved": round(saved, 3),
        "best_val_auc": {"fifo": round(fifo_best, 4), "asha": round(asha_best, 4)},
        "asha_best_within_0_01": bool(within),
        "time_split_s": {"sequential": sequential_split(seq), "fifo": tune_split(fifo), "asha": tune_split(asha)},
        "images_decoded": decoded,
        # each trial's internal AUC per epoch, by its settings: how early ASHA's ranking matches FIFO's final one
        "val_auc_curves": {name: curves(run["trials"]) for name, run in (("fifo", fifo), ("asha", asha))},
        "targets": {"tune_vs_sequential": ">= 0.90", "asha_compute_saved": ">= 0.40, best within 0.01"},
        "meets_target": bool(tune_vs_sequential >= 0.9 and saved >= 0.4 and within and n >= 8),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
