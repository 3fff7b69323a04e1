"""`diffkd train teacher`: train the teacher classifier through the shared Ray Train + DeepSpeed loop."""
from __future__ import annotations

import argparse

EPILOG = """\
The config file's `teacher` section fills TeacherConfig, with its own `pipeline` (PipelineConfig) and
`loop` (LoopConfig) blocks; a top-level `pipeline` section, when present, is the base the teacher's
`pipeline` block overrides. Other top-level sections are ignored (configs/demo.yaml works as is).

examples:
  diffkd train teacher --config configs/teacher_example.yaml --dataset out/data --external C --out out/models/teacher
  diffkd train teacher ... --run-name teacher-a --resume       # continue a stopped run from its last good checkpoint
  diffkd train teacher ... --address auto                      # on the Ray cluster this machine belongs to

OUT receives model.safetensors + config.json (timm; + fusion_head.* with clinical fusion),
predictions.parquet (case_id, patient_id, center, split, label, model, prob for every real case) and
training.json (per-epoch history, best epoch, internal and external AUC, the run's checkpoint folder).
Checkpoints go to teacher.loop.storage_path (or --storage) under the run name; each epoch prints a line.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage (teacher) through Ray Train + DeepSpeed",
                              description="Train one pipeline stage through the shared Ray Train + DeepSpeed loop.")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    t = stages.add_parser("teacher", help="the timm teacher classifier", epilog=EPILOG,
                          description="Train the teacher on the internal training split, select its epoch by "
                                      "internal-validation AUC, export it and predict every case.",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", required=True, help="YAML with a `teacher` section")
    t.add_argument("--dataset", required=True, help="dataset folder or URI")
    t.add_argument("--external", default="", metavar="C1,C2", help="external (held-out) centers: test split only")
    t.add_argument("--out", required=True, help="folder for the exported teacher and its predictions")
    t.add_argument("--synthetic-ratio", type=float, default=0.0,
                   help="synthetic rows mixed in per real training row each epoch (default 0: real only)")
    t.add_argument("--val-fraction", type=float, default=0.2, help="internal-validation share of patients")
    t.add_argument("--split-seed", type=int, default=0)
    t.add_argument("--storage", default=None, help="checkpoint storage (path or URI); overrides teacher.loop")
    t.add_argument("--run-name", default=None, help="name of the Ray Train run (to resume it later)")
    t.add_argument("--resume", action="store_true", help="continue the run called --run-name")
    t.add_argument("--address", default=None, help="Ray cluster to join (default: a private local instance)")
    t.set_defaults(handler=run_teacher)


def load_teacher_config(path: str):
    """TeacherConfig from a YAML file's `teacher` section (top-level `pipeline` as its base)."""
    from diffkd.config import ConfigError, from_dict, load_yaml
    from diffkd.train.teacher import TeacherConfig

    data = load_yaml(path)
    section = dict(data.get("teacher") or {})
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: the `teacher` section must be a mapping")
    if isinstance(data.get("pipeline"), dict):
        section["pipeline"] = {**data["pipeline"], **(section.get("pipeline") or {})}
    return from_dict(TeacherConfig, section, "teacher")


def run_teacher(args) -> int:
    import dataclasses

    from diffkd.data.splits import dataset_splits
    from diffkd.raycompat import init as ray_init
    from diffkd.train.teacher import train_teacher

    cfg = load_teacher_config(args.config)
    loop = cfg.loop
    loop = dataclasses.replace(loop, run_name=args.run_name or loop.run_name, resume=args.resume or loop.resume,
                               storage_path=args.storage or loop.storage_path)
    if loop.resume and not loop.run_name:
        raise ValueError("--resume needs --run-name (the name printed when the run started)")
    cfg = dataclasses.replace(cfg, loop=loop)
    external = [c.strip() for c in args.external.split(",") if c.strip()]
    assignments = dataset_splits(args.dataset, external, val_fraction=args.val_fraction, seed=args.split_seed,
                                 synthetic=False)
    ray_init(args.address)
    train_teacher(args.dataset, assignments, cfg, args.out, synthetic_ratio=args.synthetic_ratio)
    return 0
