"""`diffkd phantom`: write a synthetic multicenter cohort (folder layout + clinical CSV) for ingest."""
from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "phantom", help="generate a synthetic multicenter breast ultrasound / mammography cohort",
        description="Generate a synthetic multicenter cohort in the `folder` ingest layout: "
                    "OUT/<center>/images, OUT/<center>/masks, OUT/<center>/clinical.csv, plus readers.csv, "
                    "truth.csv and cohort.json.")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent unless --overwrite)")
    p.add_argument("--size", choices=("demo", "paper"), default="paper",
                   help="paper: 4 centers, 1,435 patients (mammo: 2 centers, 294 cases); demo: 60-100 patients "
                        "per center, ~256 px images (default: paper)")
    p.add_argument("--centers", type=int, default=None, help="number of centers (default: 4, mammo 2)")
    p.add_argument("--patients", type=int, default=None, help="total patients over all centers (default: preset)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    p.add_argument("--difficulty", type=float, default=1.0,
                   help="1.0 = published-like task difficulty; lower is easier, higher harder")
    p.add_argument("--doppler-fraction", type=float, default=0.0,
                   help="share of each center's patients imaged with Doppler only (modality us_doppler)")
    p.add_argument("--modality", choices=("us", "mammo"), default="us",
                   help="us: B-mode (+ Doppler) ultrasound upgrade cohort; mammo: DCIS vs IDC calcifications")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (output does not depend on it)")
    p.add_argument("--preview", metavar="PNG", default=None,
                   help="also write a contact sheet: sample images per center x label")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.data.phantom import contact_sheet, generate_cohort

    def progress(msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)

    summary = generate_cohort(
        args.out, size=args.size, centers=args.centers, patients=args.patients, seed=args.seed,
        difficulty=args.difficulty, doppler_fraction=args.doppler_fraction, modality=args.modality,
        overwrite=args.overwrite, workers=args.workers, progress=progress)
    print(f"wrote {summary.patients} patients, {summary.images} images in {len(summary.centers)} centers "
          f"to {summary.out} ({summary.seconds:.1f} s)")
    for c in summary.centers:
        labels = ", ".join(f"{k} {v}" for k, v in c["labels"].items())
        mods = ", ".join(f"{k} {v}" for k, v in c["modalities"].items())
        print(f"  {c['name']:<10} {c['patients']:>5} patients ({labels}); images: {mods}")
    if args.preview:
        print(f"preview: {contact_sheet(args.out, args.preview)}")
    return 0
