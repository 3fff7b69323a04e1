"""`diffkd loco`: leave-one-center-out validation of the teacher as one distributed job."""
from __future__ import annotations

import argparse
from pathlib import Path

from diffkd.commands.options import add_address, add_dataset, add_split
from diffkd.commands.run import ray_for_command
from diffkd.runtime import console
from diffkd.runtime.raycompat import init as ray_init

EPILOG = """\
One Ray Tune trial per center: the teacher (the config's `teacher` section, as `diffkd train teacher`)
trains on every other center, selects its epoch on an internal-validation share of them, and is
scored on the held-out center. Trials run in parallel as far as the cluster holds them.

examples:
  diffkd loco --dataset out/data --config configs/demo.yaml --out out/loco
  diffkd loco ... --parallel 1                   # one fold at a time
  diffkd submit --address http://HEAD:8265 -- diffkd loco --dataset /mnt/shared/data --config ... --out /mnt/shared/loco

Rerunning the same command keeps folds whose inputs did not change, resumes unfinished ones, and
trains a fold for a center ingested since (the other folds train again: their training set grew).
OUT receives loco.csv, loco_pooled.json (the random-effects pooled AUC: DerSimonian-Laird on logit AUC,
with I^2 and tau^2), loco_auc.png (forest plot with the pooled diamond) and folds/<center>/.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("loco", help="leave-one-center-out validation (one parallel trial per center)",
                              description="Leave-one-center-out validation of the teacher stage as one "
                                          "distributed Ray Tune job.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset(p)
    p.add_argument("--config", required=True, help="YAML with a `teacher` section")
    p.add_argument("--out", required=True, help="folder for the folds, loco.csv and loco_auc.png")
    p.add_argument("--parallel", type=int, default=0, help="folds at once (default 0: as many as the cluster holds)")
    add_split(p, external=False)
    add_address(p)
    p.set_defaults(handler=run_loco)


def run_loco(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.experiments.experiment import load_section
    from diffkd.data.dataset import ImageDataset
    from diffkd.experiments.loco import format_table, leave_one_center_out

    if args.parallel < 0:
        raise ValueError("--parallel must be 0 (as many as fit) or a positive number of folds")
    cfg = load_section(args.config, "teacher")
    logs = Path(args.out) / "logs"
    with console.capture(logs, verbose=args.verbose), ray_for_command():  # library output to OUT/logs/
        ray_init(args.address)
        outcome = leave_one_center_out(args.dataset, cfg, args.out, parallel=args.parallel,
                                       val_fraction=args.val_fraction, seed=args.split_seed)
    print(format_table(outcome.table, outcome.pooled, positive_name=ImageDataset(args.dataset).label_names[1]))
    print(f"{len(outcome.table) - 1} folds, {outcome.parallel} at a time, {outcome.wall_s:.0f} s; "
          f"table {outcome.files['table']}, pooled {outcome.files['pooled']}, plot {outcome.files['plot']}")
    print(f"logs: {logs}/ (Ray, Tune, DeepSpeed and torch messages)")
    return 0
