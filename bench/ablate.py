"""One `diffkd ablate` on a small phantom cohort: where its wall time goes, and how many images each
trial decodes.

The cohort is demo-size (ingested as the demo does), the config is the demo's with the diffusion
stage off (the arms that need synthetic rows drop out: what is left is `neither` and
`no_synthesis`, whose teacher trains inside the trial), `--seeds` seeds, one trial at a time so that
every PNG decode falls inside exactly one trial's span. Decodes are counted where they happen, in the
pipeline's decode functions (`DIFFKD_DECODE_LOG`, diffkd/data/source_cache.py); the trials share one
cache of decoded images, so after the first trial they should decode almost nothing (target: at most
5% of the first trial's decodes, `later_vs_first_decodes`).

Time split: Ray's start and the job's set-up before the first trial; per trial, from the histories of
the models it trained (the student, and a teacher when the trial trained one): start-up (worker
group, engine), training, validation, checkpoint + report, and the rest of the trial (splits and
datasets, export, predictions of every split, Tune's bookkeeping); after the last trial (tables, plot).

Prints ONE JSON line and writes bench/results/ablate.json. `--quick`: 90 patients, 2 epochs, 32 px.
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

from common import demo_config, emit, phantom_dataset, run_diffkd  # noqa: E402
from search import history_split, summed  # noqa: E402

ARMS = ("neither", "no_synthesis")


def trial_spans(out: str) -> list[dict]:
    """Each trial's arm, seed and wall-clock span, in the order they ran."""
    spans = []
    for result in glob.glob(os.path.join(out, "experiment-*", "*", "result.json")):
        with open(result) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows:
            last = rows[-1]
            trial = last["config"]["trial"]
            spans.append({"arm": trial["arm"], "seed": int(trial["seed"]), "started_at": last["started_at"],
                          "finished_at": last["finished_at"]})
    return sorted(spans, key=lambda s: s["started_at"])


def models_in(out: str, span: dict) -> list[list[dict]]:
    """Histories of the models trained within a trial's span: its student, and its teacher if it trained one."""
    histories = []
    for info in glob.glob(os.path.join(out, "trials", "*", "training.json")) + \
            glob.glob(os.path.join(out, "teachers", "*", "training.json")):
        with open(info) as f:
            history = json.load(f)["history"]
        if history and span["started_at"] <= history[0]["started_at"] <= span["finished_at"]:
            histories.append(history)
    return histories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="90 patients, 2 epochs, 32 px")
    parser.add_argument("--seeds", type=int, default=2, help=f"seeds per arm ({', '.join(ARMS)})")
    parser.add_argument("--epochs", type=int, default=4, help="teacher and student epochs")
    parser.add_argument("--patients", type=int, default=180, help="phantom patients over all centers")
    parser.add_argument("--centers", type=int, default=3, help="phantom centers; the last is external")
    parser.add_argument("--image-size", type=int, default=64, help="the demo's 64 px")
    args = parser.parse_args()
    if args.quick:
        args.patients, args.epochs, args.image_size = 90, 2, 32

    from diffkd.data.source_cache import read_decode_log

    with tempfile.TemporaryDirectory(prefix="dka") as tmp:
        log = os.path.join(tmp, "commands.log")
        data, centers = phantom_dataset(tmp, args.centers, args.patients, log)
        config = demo_config(os.path.join(tmp, "bench.yaml"), args.epochs, args.epochs, args.image_size,
                             diffusion={"enabled": False})
        out, decode_log = os.path.join(tmp, "ablation"), os.path.join(tmp, "decodes.log")
        started = time.time()
        wall = run_diffkd(["ablate", "--dataset", data, "--external", centers[-1], "--config", config, "--out", out,
                           "--arms", ",".join(ARMS), "--seeds", str(args.seeds), "--parallel", "1"], log,
                          env={"DIFFKD_DECODE_LOG": decode_log})
        spans = trial_spans(out)
        models = [models_in(out, span) for span in spans]
        decoded = read_decode_log(decode_log)

    per_trial, outside = [], 0
    for span in spans:
        per_trial.append(sum(n for t, n, kind in decoded if span["started_at"] <= t <= span["finished_at"]))
    outside = sum(n for _, n, _ in decoded) - sum(per_trial)
    synthetic = sum(n for _, n, kind in decoded if kind == "synthetic")
    later = per_trial[1:]
    ratio = (sum(later) / len(later)) / per_trial[0] if later and per_trial[0] else float("nan")
    trial_s = [s["finished_at"] - s["started_at"] for s in spans]
    parts = summed([history_split(h) for trained in models for h in trained])
    emit({
        "bench": "ablate", "arms": list(ARMS), "seeds": args.seeds, "trials": len(spans), "epochs": args.epochs,
        "patients": args.patients, "centers": args.centers, "image_size": args.image_size, "parallel": 1,
        "wall_s": round(wall, 1),
        "time_split_s": {"before_first_trial": round(spans[0]["started_at"] - started, 1) if spans else None,
                         "trials": round(sum(trial_s), 1), **parts,
                         "rest_of_trials": round(sum(trial_s) - sum(parts.values()), 1),
                         "after_last_trial": round(started + wall - spans[-1]["finished_at"], 1) if spans else None},
        "trial_s": [round(s, 1) for s in trial_s],
        "trial_order": [f"{s['arm']}-s{s['seed']}" for s in spans],
        "images_decoded_per_trial": per_trial, "images_decoded_outside_trials": outside,
        "synthetic_images_decoded": synthetic,
        "later_vs_first_decodes": round(ratio, 4),
        "targets": {"later_vs_first_decodes": "<= 0.05"},
        "meets_target": bool(ratio <= 0.05),
        "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
    })


if __name__ == "__main__":
    main()
