"""`diffkd train {diffusion,teacher,student}`: train one pipeline stage through the shared Ray Train + DeepSpeed loop.

The old spellings `diffkd diffusion train` and `diffkd distill` still run, after saying the new form.
"""
from __future__ import annotations

import argparse
import dataclasses

from diffkd.commands.options import add_address, add_dataset, add_run_name, add_split, alias, names, split_config
from diffkd.runtime.raycompat import init as ray_init

CONFIG_NOTE = """\
Every stage reads its section of the same config file (docs/cli.md): `diffkd run`'s experiment config
(configs/demo.yaml) works as is, other sections are ignored. A top-level `pipeline` section is the base
of the teacher's and the student's `pipeline` blocks."""

DIFFUSION_EPILOG = f"""\
{CONFIG_NOTE} The `diffusion` section is {{enabled, model: DiffusionConfig, loop: LoopConfig}}.

examples:
  diffkd train diffusion --dataset out/data --external C --config configs/demo.yaml --out out/models/diffusion
  diffkd train diffusion ... --run-name diff1 --resume          # continue an interrupted run
  diffkd train diffusion --dataset out/data --base-model out/models/diffusion --out out/models/diffusion_hospE
                                                                # a newly ingested center gets its own embedding

Only the internal training split is learnt from; the validation split gives val_loss, the external
centers are never read. OUT becomes a diffusers pipeline folder (model_index.json, unet/, scheduler/,
condition_encoder/) plus diffkd_training.json.
"""

TEACHER_EPILOG = f"""\
{CONFIG_NOTE} The `teacher` section fills TeacherConfig, with its own `pipeline` (PipelineConfig) and
`loop` (LoopConfig) blocks.

examples:
  diffkd train teacher --config configs/teacher_example.yaml --dataset out/data --external C --out out/models/teacher
  diffkd train teacher ... --run-name teacher-a --resume       # continue a stopped run from its last good checkpoint
  diffkd train teacher ... --address auto                      # on the Ray cluster this machine belongs to

OUT receives model.safetensors + config.json (timm; + fusion_head.* with clinical fusion),
predictions.parquet (case_id, patient_id, center, split, label, model, prob for every real case) and
training.json (per-epoch history, best epoch, internal and external AUC, the run's checkpoint folder).
Checkpoints go to teacher.loop.storage_path (or --storage) under the run name; each epoch prints a line.
"""

STUDENT_EPILOG = f"""\
{CONFIG_NOTE} The `student` section fills StudentConfig (arch, clinical, mode, its `distill` terms,
`pipeline` and `loop` blocks); a search's best_config.yaml works too.

examples:
  diffkd train student --dataset out/data --external C --config configs/demo.yaml --teacher out/models/teacher \\
      --out out/models/student
  diffkd train student --dataset out/data --external C --config out/tune/best_config.yaml --out out/models/student
  diffkd train student --dataset out/data --external C --config configs/demo.yaml --plain --out out/models/student_plain
  diffkd train student ... --mode pairing_free        # teacher on us_doppler, student on B-mode, no pairs

Only the train and internal-validation rows are used; the external centers are never read.
The OUT folder receives model.safetensors + config.json (timm) and model.onnx.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a stage: diffusion, teacher or student",
                              description="Train one pipeline stage through the shared Ray Train + DeepSpeed loop.")
    stages = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    _diffusion_arguments(stages.add_parser(
        "diffusion", help="the conditional diffusion model (a diffusers pipeline folder)", epilog=DIFFUSION_EPILOG,
        description="Train the conditional diffusion model on the internal training split and save it as a "
                    "diffusers pipeline.", formatter_class=argparse.RawDescriptionHelpFormatter))
    _teacher_arguments(stages.add_parser(
        "teacher", help="the timm teacher classifier", epilog=TEACHER_EPILOG,
        description="Train the teacher on the internal training split, select its epoch by internal-validation "
                    "AUC, export it and predict every case.", formatter_class=argparse.RawDescriptionHelpFormatter))
    _student_arguments(stages.add_parser(
        "student", help="the small student, distilled from the teacher (or --plain)", epilog=STUDENT_EPILOG,
        description="Train a small timm student from a trained teacher, then export it as timm safetensors "
                    "and ONNX.", formatter_class=argparse.RawDescriptionHelpFormatter))

    # The previous release's verbs.
    old = subparsers.add_parser("diffusion", help="old form of `diffkd train diffusion`")
    actions = old.add_subparsers(dest="action", required=True, metavar="ACTION")
    old_train = actions.add_parser("train", help="old form of `diffkd train diffusion`", epilog=DIFFUSION_EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _diffusion_arguments(old_train)
    alias(old_train, "diffkd diffusion train", "diffkd train diffusion")
    distill = subparsers.add_parser("distill", help="old form of `diffkd train student`", epilog=STUDENT_EPILOG,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    _student_arguments(distill)
    alias(distill, "diffkd distill", "diffkd train student")


# ---- diffusion ----------------------------------------------------------------------------------------

def _diffusion_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset(p)
    p.add_argument("--out", required=True, help="pipeline folder to write (e.g. OUT/models/diffusion)")
    p.add_argument("--config", default=None, help="YAML with a `diffusion` section (default: its defaults)")
    add_split(p)
    p.add_argument("--epochs", type=int, default=None, help="override diffusion.loop.epochs")
    p.add_argument("--image-size", type=int, default=None, help="override diffusion.model.model.image_size")
    p.add_argument("--base-model", metavar="DIR", default=None,
                   help="extend this trained pipeline to centers it does not know: only their center "
                        "embeddings are trained, on their rows alone (its architecture and split apply)")
    add_run_name(p)
    add_address(p)
    p.set_defaults(handler=run_diffusion)


def run_diffusion(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.experiments.experiment import DiffusionStage, load_section
    from diffkd.train.diffusion_task import DiffusionTrainConfig, train_diffusion

    stage = load_section(args.config, "diffusion") if args.config else DiffusionStage()
    config, loop = stage.model, stage.loop
    if args.image_size:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, image_size=args.image_size))
    if args.base_model:
        config = dataclasses.replace(config, base_model=args.base_model)
    loop = dataclasses.replace(loop, epochs=args.epochs or loop.epochs, run_name=args.run_name or loop.run_name,
                               resume=args.resume or loop.resume)
    ray_init(args.address)
    result = train_diffusion(args.dataset, split_config(args), DiffusionTrainConfig(config, loop), args.out)
    best = result.best_metrics
    print(f"diffusion: {result.train_rows} training rows, best val_loss {best.get('val_loss', float('nan')):.4f} "
          f"(epoch {best.get('epoch')}); pipeline written to {result.model_dir}")
    return 0


# ---- teacher ------------------------------------------------------------------------------------------

def _teacher_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML with a `teacher` section")
    add_dataset(p)
    p.add_argument("--out", required=True, help="folder for the exported teacher and its predictions")
    add_split(p)
    p.add_argument("--synthetic-ratio", type=float, default=0.0,
                   help="synthetic rows mixed in per real training row each epoch (default 0: real only)")
    p.add_argument("--storage", default=None, help="checkpoint storage (path or URI); overrides teacher.loop")
    add_run_name(p)
    add_address(p)
    p.set_defaults(handler=run_teacher)


def run_teacher(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.experiments.experiment import load_section
    from diffkd.data.splits import dataset_splits
    from diffkd.train.teacher import train_teacher

    cfg = load_section(args.config, "teacher")
    loop = cfg.loop
    loop = dataclasses.replace(loop, run_name=args.run_name or loop.run_name, resume=args.resume or loop.resume,
                               storage_path=args.storage or loop.storage_path)
    if loop.resume and not loop.run_name:
        raise ValueError("--resume needs --run-name (the name printed when the run started)")
    cfg = dataclasses.replace(cfg, loop=loop)
    assignments = dataset_splits(args.dataset, names(args.external), val_fraction=args.val_fraction,
                                 seed=args.split_seed, synthetic=False)
    ray_init(args.address)
    train_teacher(args.dataset, assignments, cfg, args.out, synthetic_ratio=args.synthetic_ratio)
    return 0


# ---- student ------------------------------------------------------------------------------------------

def _student_arguments(p: argparse.ArgumentParser) -> None:
    add_dataset(p)
    add_split(p)
    p.add_argument("--config", required=True, help="YAML with a `student` section")
    p.add_argument("--out", required=True, help="folder for the exported student")
    p.add_argument("--teacher", default=None, metavar="DIR", help="teacher folder (overrides student.teacher_dir)")
    p.add_argument("--mode", choices=("paired", "pairing_free"), default=None, help="overrides student.mode")
    p.add_argument("--plain", action="store_true",
                   help="the student_plain control: same architecture, no teacher, no synthetic images")
    add_run_name(p)
    add_address(p)
    p.set_defaults(handler=run_student)


def real_splits(dataset: str, args):
    """(ImageDataset, the real rows' splits table) from the command's split options."""
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.splits import make_splits

    ds = ImageDataset(dataset)
    return ds, make_splits(ds.metadata().to_pandas(), names(args.external), val_fraction=args.val_fraction,
                           seed=args.split_seed)


def run_student(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.experiments.experiment import load_section
    from diffkd.train.student import plain_variant, train_student

    student = load_section(args.config, "student", required=True)
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
    dataset, splits = real_splits(args.dataset, args)
    name = "student_plain" if args.plain else "student_kd"
    result = train_student(dataset, splits, student, out_dir=args.out, model_name=name)
    print(f"{name} {student.arch}: {result.params:,} parameters, internal val AUC {result.val_auc:.3f} "
          f"(epoch {result.fit.best_epoch}); exported to {args.out}")
    return 0
