"""`diffkd diffusion train`, `diffkd synth` and `diffkd synth audit`: stage 1 of the pipeline."""
from __future__ import annotations

import argparse

DIFFUSION_EPILOG = """\
The config file's `diffusion` section is read as `diffkd run` reads it ({enabled, model: DiffusionConfig,
loop: LoopConfig}, as in configs/demo.yaml), or as a DiffusionConfig itself (with its `model` block:
image_size, block_out_channels, prediction_type, ...) beside a `diffusion_loop` section for the loop
(LoopConfig: epochs, batch_size, lr, num_workers, zero_stage, ...). Other sections are ignored.

examples:
  diffkd diffusion train --dataset out/data --external C --config configs/demo.yaml --out out/models/diffusion
  diffkd diffusion train ... --run-name diff1 --resume          # continue an interrupted run
  diffkd diffusion train --dataset out/data --base-model out/models/diffusion --out out/models/diffusion_hospE
                                                                # a newly ingested center gets its own embedding

Only the internal training split is learnt from; the validation split gives val_loss, the external
centers are never read. OUT becomes a diffusers pipeline folder (model_index.json, unet/, scheduler/,
condition_encoder/) plus diffkd_training.json.
"""

SYNTH_EPILOG = """\
examples:
  diffkd synth --dataset out/data --model out/models/diffusion --per-cell 32
  diffkd synth --dataset out/data --model out/models/diffusion --mode real --total 500 --guidance 3
  diffkd synth --dataset out/data --model out/models/diffusion --config configs/demo.yaml   # `synth` section
  diffkd synth audit --dataset out/data --model out/models/diffusion --out out/report/synthetic

Rows go to the dataset's synthetic/ partition tree (synthetic=true, source=<run id>). The run id is a
digest of the model and the table's settings, so rerunning the same command after an interruption
generates only the rows that are missing. Conditions (modality, clinical values) are drawn from the
generator's own training rows of each center x label.
"""


def register(subparsers) -> None:
    diffusion = subparsers.add_parser("diffusion", help="train the conditional diffusion model (stage 1)",
                                      description="Train the conditional diffusion model through the shared "
                                                  "Ray Train + DeepSpeed loop and save it as a diffusers pipeline.",
                                      epilog=DIFFUSION_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = diffusion.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = actions.add_parser("train", help="train and export the generator", epilog=DIFFUSION_EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--dataset", required=True, help="dataset folder or URI")
    train.add_argument("--out", required=True, help="pipeline folder to write (e.g. OUT/models/diffusion)")
    train.add_argument("--config", default=None, help="YAML with diffusion / diffusion_loop sections")
    _split_args(train)
    train.add_argument("--epochs", type=int, default=None, help="override diffusion_loop.epochs")
    train.add_argument("--image-size", type=int, default=None, help="override diffusion.model.image_size")
    train.add_argument("--base-model", metavar="DIR", default=None,
                       help="extend this trained pipeline to centers it does not know: only their center "
                            "embeddings are trained, on their rows alone (its architecture and split apply)")
    train.add_argument("--run-name", default=None, help="name of the Ray Train run (to resume it later)")
    train.add_argument("--resume", action="store_true", help="continue the run called --run-name")
    train.add_argument("--address", default=None, help="Ray cluster to join (default: a private local instance)")
    train.set_defaults(handler=run_train)

    synth = subparsers.add_parser("synth", help="generate synthetic rows with a trained generator; `synth audit`",
                                  description="Sample a condition table with a Ray Data actor pool and write the "
                                              "images into the dataset's synthetic partition tree.",
                                  epilog=SYNTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    synth.add_argument("--dataset", help="dataset folder or URI")
    synth.add_argument("--model", metavar="DIR", help="the diffusion pipeline folder")
    synth.add_argument("--config", default=None, help="YAML whose `synth` section fills SynthConfig")
    synth.add_argument("--mode", choices=("balanced", "real"), default=None,
                       help="balanced: --per-cell rows per center x label; real: --total rows in the real mix")
    synth.add_argument("--per-cell", type=int, default=None)
    synth.add_argument("--total", type=int, default=None)
    synth.add_argument("--centers", default=None, metavar="C1,C2", help="only these centers (default: all trained)")
    synth.add_argument("--sampler", choices=("ddim", "dpm"), default=None, help="default: the saved scheduler")
    synth.add_argument("--steps", type=int, default=None, help="sampling steps")
    synth.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    synth.add_argument("--actors", type=int, default=None, help="sampling actors (model loaded once per actor)")
    synth.add_argument("--gpus-per-actor", type=float, default=None)
    synth.add_argument("--replace", action="store_true",
                       help="delete synthetic rows of other runs first (training mixes every synthetic row)")
    synth.add_argument("--address", default=None, help="Ray cluster to join (default: a private local instance)")
    synth.set_defaults(handler=run_synth)
    sub = synth.add_subparsers(dest="action", metavar="[audit]")
    audit = sub.add_parser("audit", help="FID/KID, conditional accuracy, near copies, TSTR AUC and image grids",
                           description="Audit the synthetic rows against real ones; writes synthetic_audit.json, "
                                       "synthetic_grid.png and synthetic_near_copies.png to --out.")
    audit.add_argument("--dataset", required=True, help="dataset folder or URI")
    audit.add_argument("--out", required=True, help="folder for the audit's JSON and PNGs")
    audit.add_argument("--model", metavar="DIR", default=None,
                       help="the generator: its saved split says which real rows it learnt from (recommended)")
    audit.add_argument("--run", action="append", default=None, metavar="RUN_ID",
                       help="audit only this synthesis run (repeatable; default: every synthetic row)")
    audit.add_argument("--config", default=None,
                       help="YAML whose `audit` section fills AuditConfig (label pairs sample as its `synth` section)")
    _split_args(audit, " (used without --model)")
    audit.add_argument("--address", default=None, help="Ray cluster to join (default: a private local instance)")
    audit.set_defaults(handler=run_audit)


def _split_args(parser, note: str = "") -> None:
    parser.add_argument("--external", default="", metavar="C1,C2", help=f"external (held-out) centers{note}")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--split-seed", type=int, default=0)


def _section(path: str | None, name: str, cls):
    from diffkd.config import from_dict, load_yaml

    return from_dict(cls, (load_yaml(path).get(name) or {}) if path else {}, name)


def _names(text: str | None) -> list[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def run_train(args) -> int:
    import dataclasses

    from diffkd.raycompat import init as ray_init
    from diffkd.data.splits import SplitConfig
    from diffkd.train.diffusion_task import train_diffusion

    config, loop = _diffusion_sections(args.config)
    if args.image_size:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, image_size=args.image_size))
    if args.base_model:
        config = dataclasses.replace(config, base_model=args.base_model)
    loop = dataclasses.replace(loop, epochs=args.epochs or loop.epochs, run_name=args.run_name or loop.run_name,
                               resume=args.resume or loop.resume)
    ray_init(args.address)
    result = train_diffusion(args.dataset, args.out, config, loop,
                             SplitConfig(_names(args.external), args.val_fraction, args.split_seed))
    best = result.best_metrics
    print(f"diffusion: {result.train_rows} training rows, best val_loss {best.get('val_loss', float('nan')):.4f} "
          f"(epoch {best.get('epoch')}); pipeline written to {result.model_dir}")
    return 0


def _diffusion_sections(path: str | None):
    """(DiffusionConfig, LoopConfig) from a config file in either layout: `diffkd run`'s
    `diffusion: {enabled, model: <DiffusionConfig>, loop: <LoopConfig>}`, or a `diffusion` section that
    is itself a DiffusionConfig beside a `diffusion_loop` section."""
    from diffkd.config import from_dict, load_yaml
    from diffkd.run import DiffusionStage
    from diffkd.train.diffusion_task import DiffusionConfig
    from diffkd.train.loop_config import LoopConfig

    data = load_yaml(path) if path else {}
    section = data.get("diffusion") or {}
    if isinstance(section, dict) and ("loop" in section or "enabled" in section):
        stage = from_dict(DiffusionStage, section, "diffusion")
        return stage.model, stage.loop
    return (from_dict(DiffusionConfig, section, "diffusion"),
            from_dict(LoopConfig, data.get("diffusion_loop") or {}, "diffusion_loop"))


def run_synth(args) -> int:
    import dataclasses
    import sys

    from diffkd.raycompat import init as ray_init
    from diffkd.synth import SynthConfig, synthesize

    if not args.dataset or not args.model:
        raise ValueError("diffkd synth needs --dataset and --model (or: diffkd synth audit ...)")
    cfg = _section(args.config, "synth", SynthConfig)
    overrides = {"mode": args.mode, "per_cell": args.per_cell, "total": args.total, "sampler": args.sampler,
                 "num_inference_steps": args.steps, "guidance_scale": args.guidance, "num_actors": args.actors,
                 "gpus_per_actor": args.gpus_per_actor, "centers": _names(args.centers) or None}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    ray_init(args.address)

    def progress(done: int, total: int) -> None:
        print(f"  synth: {done}/{total} rows", file=sys.stderr, flush=True)

    result = synthesize(args.dataset, args.model, cfg, progress=progress, replace=args.replace)
    per_center = ", ".join(f"{c} {n}" for c, n in sorted(result.per_center.items())) or "nothing new"
    print(f"synth run {result.run_id}: {result.requested} rows requested, {result.existing} already present, "
          f"{result.written} written ({per_center}) in {result.seconds:.1f} s "
          f"({result.images_per_second:.2f} images/s)")
    return 0


def run_audit(args) -> int:
    import json

    from diffkd.raycompat import init as ray_init
    from diffkd.synth import AuditConfig, SynthConfig, audit, with_synthesis_sampling
    from diffkd.data.splits import SplitConfig

    cfg = with_synthesis_sampling(_section(args.config, "audit", AuditConfig),
                                  _section(args.config, "synth", SynthConfig))
    ray_init(args.address)
    summary = audit(args.dataset, args.out, model_dir=args.model, run_ids=args.run,
                    split=SplitConfig(_names(args.external), args.val_fraction, args.split_seed), cfg=cfg)
    print(json.dumps(summary, indent=2))
    print(f"audit written to {args.out}/synthetic_audit.json (+ synthetic_grid.png, synthetic_near_copies.png"
          f"{', synthetic_label_pairs.png' if 'label_effect' in summary else ''})")
    return 0
