"""`diffkd tune`: Ray Tune search over the student stage (temperature, loss weights, learning rate)."""
from __future__ import annotations

import argparse
import dataclasses
import os

from diffkd.commands.options import add_address, add_dataset, add_split
from diffkd.commands.train import real_splits
from diffkd.runtime.raycompat import init as ray_init

EPILOG = """\
examples:
  diffkd tune --space tune_spaces/kd_demo.yaml --dataset out/data --external C --config configs/demo.yaml \\
      --teacher out/models/teacher --out out/tune
  diffkd tune kd_demo ... --out out/tune            # same: a bare name means tune_spaces/<name>.yaml
  diffkd tune --space tune_spaces/kd_demo.yaml ... --out out/tune --resume  # after an interruption

A space's distill.terms.* parameters must name terms the config's student has (kd.yaml: paper.yaml's).
  diffkd tune ... --out out/tune --final-out out/models/student            # then train the tuned student

The objective is internal-validation AUC: trials get the train and val rows only, never the external
centers. OUT receives trials.csv, curves.csv, objective_vs_params.png, learning_curves.png,
best_config.yaml (feed it to `diffkd train student --config`) and the resumable Tune experiment OUT/search.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="search distillation settings with Ray Tune (ASHA + Optuna)",
                              description="Search the student stage's temperature, loss weights and learning rate "
                                          "with Ray Tune; each trial is a Ray Train run of the stage.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space_name", nargs="?", default=None, metavar="SPACE",
                   help="a space in tune_spaces/ by name (e.g. kd); or use --space FILE")
    p.add_argument("--space", default=None, metavar="FILE", help="search-space YAML")
    add_dataset(p)
    p.add_argument("--config", required=True, help="YAML whose `student` section is the base of every trial")
    p.add_argument("--teacher", default=None, metavar="DIR", help="teacher folder (overrides student.teacher_dir)")
    p.add_argument("--out", required=True, help="folder for the search and its results")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search in --out")
    p.add_argument("--samples", type=int, default=None, help="override the space's num_samples")
    p.add_argument("--final-out", default=None, metavar="DIR",
                   help="afterwards, train the student with the best config and export it here")
    add_split(p)
    add_address(p)
    p.set_defaults(handler=run)


def space_path(args) -> str:
    if bool(args.space) == bool(args.space_name):
        raise ValueError("give the search space either by name (diffkd tune kd) or as --space FILE")
    if args.space:
        return args.space
    path = os.path.join("tune_spaces", f"{args.space_name}.yaml")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no search space {path}; pass --space FILE")
    return path


def run(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.experiments.experiment import load_section
    from diffkd.train.student import train_student
    from diffkd.experiments.tune import tune_student
    from diffkd.experiments.tune_space import load_space

    space = load_space(space_path(args))
    if args.samples:
        space = dataclasses.replace(space, num_samples=args.samples)
    student = load_section(args.config, "student", required=True)
    if args.teacher:
        student = dataclasses.replace(student, teacher_dir=args.teacher)
    if not student.teacher_dir:
        raise ValueError("the search distils from a teacher: pass --teacher DIR or set student.teacher_dir")
    ray_init(args.address)
    dataset, splits = real_splits(args.dataset, args)
    outcome = tune_student(dataset.uri, splits, student, space, args.out, resume=args.resume)
    print(f"{outcome.num_trials} trials, {outcome.trial_epochs} trial-epochs; best {space.objective} "
          f"{outcome.best_objective:.4f} with {outcome.best_params}")
    for name, path in outcome.files.items():
        print(f"  {name:<15} {path}")
    if not outcome.complete:
        print(f"the search was interrupted; continue it with: diffkd tune ... --out {args.out} --resume")
        return 1
    if args.final_out:
        result = train_student(dataset, splits, outcome.best_config, out_dir=args.final_out)
        print(f"final student: internal val AUC {result.val_auc:.3f}; exported to {args.final_out}")
    return 0
