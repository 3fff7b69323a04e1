"""`diffkd synth {run,audit}`: synthetic rows from the trained generator, and the audit that judges them.

`diffkd synth` with the run's options (the previous release's form) still runs, after saying the new form.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from diffkd.commands.options import add_address, add_dataset, add_split, alias, names, split_config
from diffkd.runtime.raycompat import init as ray_init

RUN_EPILOG = """\
examples:
  diffkd synth run --dataset out/data --model out/models/diffusion --per-cell 32
  diffkd synth run --dataset out/data --model out/models/diffusion --mode real --total 500 --guidance 3
  diffkd synth run --dataset out/data --model out/models/diffusion --config configs/demo.yaml   # `synth` section

Rows go to the dataset's _synthetic/ partition tree (synthetic=true, source=<run id>). The run id is a
digest of the model and the table's settings, so rerunning the same command after an interruption
generates only the rows that are missing. Conditions (modality, clinical values) are drawn from the
generator's own training rows of each center x label.
"""

AUDIT_EPILOG = """\
examples:
  diffkd synth audit --dataset out/data --model out/models/diffusion --out out/report/synthetic
  diffkd synth audit ... --config configs/demo.yaml      # its `audit` section; label pairs sample as `synth`

Writes synthetic_audit.json (every measure, with what it means), synthetic_grid.png,
synthetic_near_copies.png and, with --model, synthetic_label_pairs.png.
"""


def register(subparsers) -> None:
    synth = subparsers.add_parser("synth", help="synthetic rows from a trained generator (run), and their audit",
                                  description="`synth run` samples a condition table with a Ray Data actor pool "
                                              "and writes the images into the dataset's synthetic partition tree; "
                                              "`synth audit` judges them against real images.",
                                  epilog=RUN_EPILOG + "\n" + AUDIT_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    # The previous release's `diffkd synth --dataset ...` (no action) is `synth run`; its options stay
    # out of this parser's help.
    _run_arguments(synth, required=False)
    for action in synth._actions:
        if action.option_strings and action.dest != "help":
            action.help = argparse.SUPPRESS
    alias(synth, "diffkd synth", "diffkd synth run")
    actions = synth.add_subparsers(dest="action", metavar="{run,audit}")
    run = actions.add_parser("run", help="generate the rows the dataset lacks", epilog=RUN_EPILOG,
                             description="Sample a condition table with a Ray Data actor pool and write the images "
                                         "into the dataset's synthetic partition tree.",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    _run_arguments(run, required=True)
    run.set_defaults(renamed=None)
    audit = actions.add_parser("audit", help="FID/KID, conditional accuracy, near copies, TSTR AUC and image grids",
                               description="Audit the synthetic rows against real ones the generator never saw.",
                               epilog=AUDIT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset(audit)
    audit.add_argument("--out", required=True, help="folder for the audit's JSON and PNGs")
    audit.add_argument("--model", metavar="DIR", default=None,
                       help="the generator: its saved split says which real rows it learnt from (recommended)")
    audit.add_argument("--run", action="append", default=None, metavar="RUN_ID",
                       help="audit only this synthesis run (repeatable; default: every synthetic row)")
    audit.add_argument("--config", default=None,
                       help="YAML whose `audit` section fills AuditConfig (label pairs sample as its `synth` section)")
    add_split(audit, note=" (used without --model)")
    add_address(audit)
    audit.set_defaults(handler=run_audit, renamed=None)


def _run_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    add_dataset(p, required=required)
    p.add_argument("--model", metavar="DIR", required=required, help="the diffusion pipeline folder")
    p.add_argument("--config", default=None, help="YAML whose `synth` section fills SynthConfig")
    p.add_argument("--mode", choices=("balanced", "real"), default=None,
                   help="balanced: --per-cell rows per center x label; real: --total rows in the real mix")
    p.add_argument("--per-cell", type=int, default=None)
    p.add_argument("--total", type=int, default=None)
    p.add_argument("--centers", default=None, metavar="C1,C2", help="only these centers (default: all trained)")
    p.add_argument("--sampler", choices=("ddim", "dpm"), default=None, help="default: the saved scheduler")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--actors", type=int, default=None, help="sampling actors (model loaded once per actor)")
    p.add_argument("--gpus-per-actor", type=float, default=None)
    p.add_argument("--replace", action="store_true",
                   help="delete synthetic rows of other runs first (training mixes every synthetic row)")
    add_address(p)
    p.set_defaults(handler=run_synth)


def _section(path: str | None, name: str, cls):
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.experiments.experiment import load_section

    return load_section(path, name) if path else cls()


def run_synth(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.synth import SynthConfig, synthesize

    if not args.dataset or not args.model:
        raise ValueError("diffkd synth run needs --dataset and --model")
    cfg = _section(args.config, "synth", SynthConfig)
    overrides = {"mode": args.mode, "per_cell": args.per_cell, "total": args.total, "sampler": args.sampler,
                 "num_inference_steps": args.steps, "guidance_scale": args.guidance, "num_actors": args.actors,
                 "gpus_per_actor": args.gpus_per_actor, "centers": names(args.centers) or None}
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
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.synth import AuditConfig, SynthConfig, audit, with_synthesis_sampling

    cfg = with_synthesis_sampling(_section(args.config, "audit", AuditConfig),
                                  _section(args.config, "synth", SynthConfig))
    ray_init(args.address)
    summary = audit(args.dataset, args.out, model_dir=args.model, run_ids=args.run, split=split_config(args), cfg=cfg)
    print(json.dumps(summary, indent=2))
    print(f"audit written to {args.out}/synthetic_audit.json (+ synthetic_grid.png, synthetic_near_copies.png"
          f"{', synthetic_label_pairs.png' if 'label_effect' in summary else ''})")
    return 0
