"""`diffkd ablate`: every arm of the method (full, no synthesis, no KD, neither, teacher, pairing-free)
over K seeds as one Ray Tune job, with pooled paired differences against the full method."""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from diffkd.commands.options import names
from diffkd.commands.run import ray_for_command
from diffkd.runtime import console

EPILOG = """\
One Ray Tune trial per arm x seed, as many at once as the cluster holds:
  full          student distilled from the real+synthetic teacher, synthetic rows in its stream
  no_synthesis  student distilled from a real-only teacher, real rows only
  no_kd         plain student (no teacher) with synthetic rows
  neither       plain student, real rows only
  teacher       the full arm's teacher
  pairing_free  group KD from the second modality's teacher (datasets with two modalities)
The diffusion model and its synthesis run once for the whole ablation (seeds vary the teachers' and
students' weights, augmentation and data order) unless --per-seed-generators. No arm has a
hyperparameter search. Every model is scored on the same external cases.

The plan comes first: OUT/plan.json (cohort fingerprint, external centers, config digest, arms,
seeds, the primary endpoint full - neither pooled over the external centers, secondary endpoints,
analysis method and alpha, expected precision, when it was written) is written before anything
trains, or by --plan-only alone. It cannot be rewritten once a trial has finished (use a new --out).
The tables compare the run with it: "pre-registered" when nothing deviated, else "exploratory"
with every deviation listed.

examples:
  diffkd ablate ... --plan-only                            # write OUT/plan.json, train nothing
  diffkd ablate --dataset out/data --external center4 --config configs/evidence.yaml --seeds 5 --out out/ablation
  diffkd ablate ... --arms full,neither --seeds 2          # two arms only
  diffkd ablate ... --time-budget-min 40                   # stop the job after 40 min; rerun to finish
  diffkd ablate ... --report-only                          # tables from the trials finished so far

Rerunning the same command keeps finished trials and trains only missing or stale ones.
OUT receives ablation.csv (arm, seed, center, external AUC and 95% CI), ablation_summary.csv and
ablation.json (per arm: mean AUC over seeds with 95% CI; paired difference from full with 95% CI, p
and the minimum detectable difference at 80% power, by a hierarchical bootstrap over seeds and
patients) and ablation_forest.png.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="ablation: each stage's contribution over K seeds (one Tune job)",
                              description="Train every arm of the method over K seeds as one Ray Tune job and "
                                          "compare each arm with the full method on the same external cases.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset folder or URI (made by diffkd ingest)")
    p.add_argument("--external", required=True, help="comma-separated external centers (never trained on)")
    p.add_argument("--config", required=True, help="experiment config YAML (as diffkd run; its `ablation` "
                                                   "section sets the defaults of the flags below)")
    p.add_argument("--out", required=True, help="folder for trials/, teachers/, the tables and the plot")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: ablation.seeds)")
    p.add_argument("--arms", default=None, help="comma-separated arms (default: ablation.arms, all)")
    p.add_argument("--per-seed-generators", action="store_true", default=None,
                   help="train a diffusion model and synthesise once per seed instead of once")
    p.add_argument("--parallel", type=int, default=None, help="trials at once (default 0: as many as fit)")
    p.add_argument("--time-budget-min", type=float, default=None,
                   help="start no trial after this many minutes (0: no limit); rerunning finishes the rest")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables and plot from the trials finished so far")
    p.add_argument("--plan-only", action="store_true",
                   help="write OUT/plan.json (the analysis plan) and train nothing; run this before training")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: the config's ray.address)")
    p.set_defaults(handler=run_ablate)


def run_ablate(args) -> int:

    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.experiments.ablate import AblationConfig, ablate, format_summary, plan_ablation
    from diffkd.experiments.experiment import load_experiment

    cfg = load_experiment(args.config)
    if args.address:
        cfg.ray.address = args.address
    changes = {"seeds": args.seeds, "per_seed_generators": args.per_seed_generators, "parallel": args.parallel,
               "time_budget_min": args.time_budget_min,
               "arms": [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None}
    settings = AblationConfig(**{**dataclasses.asdict(cfg.ablation),
                                 **{k: v for k, v in changes.items() if v is not None}})
    if args.plan_only:
        plan = plan_ablation(args.dataset, names(args.external), cfg, args.out, settings)
        print(format_plan(plan, Path(args.out) / "plan.json"))
        return 0
    logs = Path(args.out) / "logs"
    with console.capture(logs, verbose=args.verbose), ray_for_command():  # library output to OUT/logs/
        outcome = ablate(args.dataset, names(args.external), cfg, args.out, settings, train=not args.report_only)
    for note in outcome.notes:
        print(f"note: {note}")
    print(format_summary(outcome.summary, settings.target_half_width))
    print(f"{len(outcome.table)} trial row(s), {outcome.parallel} trial(s) at a time, {outcome.wall_s:.0f} s; "
          f"table {outcome.files['table']}, summary {outcome.files['summary']}, plot {outcome.files['plot']}, "
          f"distillation {outcome.files['distillation']}")
    print(f"logs: {logs}/ (Ray, Tune, DeepSpeed and torch messages)")
    status = outcome.plan.get("status", "exploratory")
    print(f"evidence: {status}" + (f" (plan {outcome.plan['digest']}, written {outcome.plan['written_at']})"
                                    if outcome.plan.get("digest") else ""))
    for deviation in outcome.plan.get("deviations", []):
        print(f"  deviation: {deviation}")
    for failure in outcome.failed:
        print(f"failed: {failure}")
    return 1 if outcome.failed else 0


def format_plan(plan: dict, path) -> str:
    primary = plan["primary_endpoint"]
    lines = [f"plan {path}: digest {plan['digest']}, written {plan['written_at']}",
             f"  cohort {plan['cohort']['fingerprint']}, external {', '.join(plan['external'])}, "
             f"config digest {plan['config_digest']}",
             f"  arms {', '.join(plan['arms'])}; seeds {', '.join(map(str, plan['seeds']))}",
             f"  primary endpoint: {primary['arm']} - {primary['comparator']}, {primary['measure']}, "
             f"{primary['center']}" + ("" if primary["estimable"] else " (NOT estimable: an arm is missing)"),
             f"  analysis: {plan['analysis']['method']}, alpha {plan['analysis']['alpha']}"]
    expected = plan.get("expected")
    if expected:
        lines.append(f"  expected: 95% CI +/-{expected['ci_half_width']:.3f}, minimum detectable difference "
                     f"{expected['mdd_80']:.3f} at 80% power ({expected['cases_positive']} positive, "
                     f"{expected['cases_negative']} negative external cases; assumptions {expected['assumptions']})")
    for trial in plan.get("trials_finished_before_plan", []):
        lines.append(f"  written after trial {trial} had finished: this run cannot be pre-registered")
    return "\n".join(lines)
