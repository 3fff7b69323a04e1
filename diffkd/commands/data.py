"""`diffkd ingest ...` and `diffkd data info|grid DS`: bring a center in, see what a dataset holds."""
from __future__ import annotations

import argparse

INGEST_EPILOG = """\
layouts:
  folder  SRC/<label>/<images>, or any tree described by a CSV (--clinical, or SRC/clinical.csv):
          one row per image; columns file (relative to SRC), patient_id, label (one of the
          --label-names, or 0/1),
          optional case_id, mask, modality, spacing_mm and clinical columns (age, lesion_size_mm,
          birads, lesion_type, palpable, ...; headers matched case-insensitively, common aliases accepted)
  busi    SRC/<class>/<name>.png with <name>_mask.png (+ _mask_1.png, OR-merged); needs --label-map
  busbra  BUS-BRA: SRC/bus_data.csv, SRC/Images/bus_<case>-<view>.png, SRC/Masks/mask_<case>-<view>.png;
          patient = Case, BIRADS -> birads, Pathology -> label (benign,malignant), the scanner in each
          row's source; Histology is never stored; --center-by device: one center per scanner
  dicom   ultrasound DICOM files (single or multi-frame); label from a CSV or SRC/<label>/ folders;
          de-identified: only pixels (cropped to the tissue region), spacing and salted ids are kept

examples:
  diffkd ingest exports/hospital_a --center A --dataset data/ds --clinical exports/hospital_a.csv
  diffkd ingest Dataset_BUSI_with_GT --center busi --dataset data/ds --layout busi \\
      --label-names benign,malignant --label-map benign=0,malignant=1,normal=skip
  diffkd ingest pacs_export --center C --dataset data/ds --layout dicom --clinical labels.csv --quarantine rejected/
  diffkd ingest BUSBRA --layout busbra --center-by device --dataset data/busbra   # logiq7, logiq5, aplio300, usystems
  diffkd ingest export --clinical export/all_sites.csv --center-column site --dataset data/ds  # one center per site

Patient and case ids, and the file paths, are stored as salted HMAC-SHA256 pseudonyms. The salt lives
in a private file outside the dataset (default ~/.config/diffkd/salts/DSNAME-DIGEST.salt, created on the
first ingest with mode 0600; a salt other users can read is refused); keep it: later ingests into the
same dataset need it. Re-running an ingest changes nothing; adding a center rewrites no other center.
A file that cannot be stored (unreadable, truncated, empty, over the limits, a link out of SRC, DICOM
without a region to crop) is a problem naming it: --quarantine sets it aside and ingests the rest.
"""


def register(subparsers) -> None:
    ing = subparsers.add_parser(
        "ingest", help="import one center's images (+ clinical CSV) into a dataset",
        description="Import a folder of images (folder, BUSI, BUS-BRA or DICOM layout) as one center of a Parquet "
                    "dataset, or as one center per value of a CSV column (--center-column, --center-by).",
        epilog=INGEST_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ing.add_argument("src", help="the source folder")
    where = ing.add_mutually_exclusive_group(required=True)
    where.add_argument("--center", help="center name (the partition; letters, digits, - or _)")
    where.add_argument("--center-column", default=None, metavar="COL",
                       help="one center per distinct value of this CSV column, in one run (a CSV holding several "
                            "scanners or sites); centers are named by the value, lower-cased, other characters "
                            "than letters and digits as '_' ('Hospital A' -> hospital_a)")
    where.add_argument("--center-by", default=None, metavar="NAME",
                       help="a grouping the layout defines; busbra: 'device', one center per scanner, named by its "
                            "model ('GE Logiq 7 @10-14MHz' -> logiq7)")
    ing.add_argument("--dataset", required=True, help="dataset folder or URI (created if missing)")
    ing.add_argument("--clinical", default=None, metavar="CSV",
                     help="clinical CSV, one row per image (default: SRC/clinical.csv when present)")
    ing.add_argument("--layout", default="folder", choices=("folder", "busi", "busbra", "dicom"))
    ing.add_argument("--label-names", default=None, metavar="NEG,POS",
                     help="names of the two outcomes, label 0 then label 1 (the positive class), e.g. "
                          "benign,malignant; stored in the dataset and used by every output (default: the "
                          "dataset's names; for a new dataset the layout's, busbra: benign,malignant, "
                          "else DCIS,upgrade)")
    ing.add_argument("--label-map", default=None, metavar="MAP",
                     help="label names to 0/1/skip, e.g. benign=0,malignant=1,normal=skip (required for busi)")
    ing.add_argument("--quarantine", default=None, metavar="DIR",
                     help="write rejected rows with reasons to DIR/rejected-CENTER.PHI.csv (it holds raw ids: keep "
                          "it with the source, not the dataset) and ingest the rest")
    ing.add_argument("--salt-file", default=None, metavar="F",
                     help="pseudonymisation salt file (default: ~/.config/diffkd/salts/DSNAME-DIGEST.salt; "
                          "created if missing)")
    ing.add_argument("--allow-burned-in", action="store_true",
                     help="store DICOM files that have no ultrasound region to crop (mammography, secondary "
                          "captures) whole, burned-in text included; BurnedInAnnotation YES is refused even so")
    ing.add_argument("--max-pixels", type=int, default=None, metavar="N",
                     help="refuse images over N pixels per frame, checked in the header before decoding "
                          "(default 100000000)")
    ing.add_argument("--max-frames", type=int, default=None, metavar="N",
                     help="refuse DICOM files over N frames (default 1000)")
    ing.add_argument("--replace", action="store_true",
                     help="rebuild the center from this source instead of adding new images to it")
    ing.add_argument("--frames", default="all", choices=("all", "middle", "first"),
                     help="multi-frame DICOM: store every frame as a row (default), or only the middle/first one")
    ing.add_argument("--workers", type=int, default=None,
                     help="decoding threads (default: CPUs, at most 4; each may hold one image of --max-pixels)")
    ing.set_defaults(handler=run_ingest)

    data = subparsers.add_parser("data", help="inspect a dataset: info (counts, clinical summary), grid (images)")
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    info = actions.add_parser("info", help="counts per center x label x split and a clinical summary")
    info.add_argument("dataset")
    _split_args(info)
    info.set_defaults(handler=run_info)
    grid = actions.add_parser("grid", help="PNG grid of sample images per center x label")
    grid.add_argument("dataset")
    grid.add_argument("--out", required=True, metavar="PNG")
    grid.add_argument("--per-cell", type=int, default=4, metavar="N", help="images per center x label (default 4)")
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--no-synthetic", action="store_true", help="leave out synthetic rows")
    grid.add_argument("--no-masks", action="store_true", help="do not outline lesion masks")
    grid.set_defaults(handler=run_grid)


def _split_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--external", default="", metavar="C1,C2", help="external (test-only) centers")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="internal patients held out for val")


def _centers(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def run_ingest(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.data.ingest import DecodeLimits, ingest, ingest_centers

    limits = DecodeLimits(**{name: value for name, value in (("max_pixels", args.max_pixels),
                                                            ("max_frames", args.max_frames)) if value is not None})
    common = dict(layout=args.layout, clinical_csv=args.clinical, quarantine=args.quarantine,
                  label_map=args.label_map, salt=args.salt_file, replace=args.replace, frames=args.frames,
                  workers=args.workers, label_names=args.label_names, allow_burned_in=args.allow_burned_in,
                  limits=limits)
    if args.center is not None:
        report = ingest(args.src, args.center, args.dataset, **common)
    else:
        report = ingest_centers(args.src, args.dataset, center_column=args.center_column, center_by=args.center_by,
                                **common)
    print(report.summary())
    return 0


def run_info(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.data.info import dataset_info

    print(dataset_info(args.dataset, _centers(args.external), seed=args.seed, val_fraction=args.val_fraction).format())
    return 0


def run_grid(args) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.data.grid import make_grid

    path = make_grid(args.dataset, args.out, per_cell=args.per_cell, seed=args.seed, synthetic=not args.no_synthetic,
                     masks=not args.no_masks)
    print(f"wrote {path}")
    return 0
