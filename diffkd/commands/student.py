"""`diffkd distill`: train the small student from a teacher (or the plain no-KD control) and export it."""
from __future__ import annotations

import argparse

EPILOG = """\
The config file's `student` section is read (StudentConfig: arch, clinical, mode, its `distill`,
`pipeline` and `loop` blocks); other top-level sections are ignored, so the experiment config
(configs/demo.yaml) and a search's best_config.yaml both work.

examples:
  diffkd distill --dataset out/data --external C --config configs/demo.yaml --teacher out/models/teacher \\
      --out out/models/student
  diffkd distill --dataset out/data --external C --config out/tune/best_config.yaml --out out/models/student
  diffkd distill --dataset out/data --external C --config configs/demo.yaml --plain --out out/models/student_plain
  diffkd distill ... --mode pairing_free        # teacher on us_doppler, student on B-mode, no pairs

Only the train and internal-validation rows are used; the external centers are never read.
The OUT folder receives model.safetensors + config.json (timm) and model.onnx.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="train the student by distillation (or --plain) and export it",
                              description="Train a small timm student from a trained teacher through the shared "
                                          "Ray Train loop, then export it as timm safetensors and ONNX.",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="dataset folder or URI")
    p.add_argument("--external", default="", metavar="C1,C2", help="external (held-out) centers, never read")
    p.add_argument("--config", required=True, help="YAML with a `student` section")
    p.add_argument("--out", required=True, help="folder for the exported student")
    p.add_argument("--teacher", default=None, metavar="DIR", help="teacher folder (overrides student.teacher_dir)")
    p.add_argument("--mode", choices=("paired", "pairing_free"), default=None, help="overrides student.mode")
    p.add_argument("--plain", action="store_true",
                   help="the student_plain control: same architecture, no teacher, no synthetic images")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--run-name", default=None, help="name of the Ray Train run (to resume it later)")
    p.add_argument("--resume", action="store_true", help="continue the run called --run-name")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: a private local instance)")
    p.set_defaults(handler=run)


def load_student_config(path: str):
    """The `student` section of a YAML config (other sections ignored) as a StudentConfig."""
    from diffkd.config import ConfigError, load_yaml
    from diffkd.tune import student_from_dict

    data = load_yaml(path)
    if not isinstance(data.get("student"), dict):
        raise ConfigError(f"{path} has no `student` section")
    return student_from_dict(data["student"], f"{path}: student")


def splits_for(dataset, external: str, val_fraction: float, seed: int):
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.splits import make_splits

    ds = ImageDataset(dataset)
    centers = [c.strip() for c in external.split(",") if c.strip()]
    return ds, make_splits(ds.metadata().to_pandas(), centers, val_fraction=val_fraction, seed=seed)


def run(args) -> int:
    import dataclasses

    from diffkd.raycompat import init as ray_init
    from diffkd.train.student import plain_variant, train_student

    student = load_student_config(args.config)
    if args.teacher:
        student = dataclasses.replace(student, teacher_dir=args.teacher)
    if args.mode:
        student = dataclasses.replace(student, mode=args.mode)
    if args.plain:
        student = plain_variant(student)
    elif not student.teacher_dir:
        raise ValueError("no teacher: pass --teacher DIR or set student.teacher_dir (or --plain for the control)")
    loop = dataclasses.replace(student.loop, run_name=args.run_name or student.loop.run_name,
                               resume=args.resume or student.loop.resume)
    student = dataclasses.replace(student, loop=loop)
    ray_init(args.address)
    dataset, splits = splits_for(args.dataset, args.external, args.val_fraction, args.split_seed)
    name = "student_plain" if args.plain else "student_kd"
    result = train_student(dataset, splits, student, out_dir=args.out, model_name=name)
    print(f"{name} {student.arch}: {result.params:,} parameters, internal val AUC {result.val_auc:.3f} "
          f"(epoch {result.fit.best_epoch}); exported to {args.out}")
    return 0
