"""Options that many commands share, declared once so that every command spells and explains them alike."""
from __future__ import annotations

import argparse
import sys

def add_dataset(parser: argparse.ArgumentParser, required: bool = True, note: str = "") -> None:
    parser.add_argument("--dataset", required=required, help=f"dataset folder or URI (made by `diffkd ingest`){note}")


def add_address(parser: argparse.ArgumentParser, default: str = "a private local instance") -> None:
    parser.add_argument("--address", default=None, help=f"Ray cluster to join: 'auto' or host:port (default: {default})")


def add_split(parser: argparse.ArgumentParser, external: bool = True, note: str = "") -> None:
    """--external, --val-fraction, --split-seed: the patient-level split (SplitConfig) recomputed from the data."""
    if external:
        parser.add_argument("--external", default="", metavar="C1,C2",
                            help=f"external (held-out) centers: test split only, never trained on{note}")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="internal-validation share of patients")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the patient-level split")


def add_run_name(parser: argparse.ArgumentParser) -> None:
    """--run-name and --resume of a Ray Train run."""
    parser.add_argument("--run-name", default=None, help="name of the Ray Train run (to resume it later)")
    parser.add_argument("--resume", action="store_true", help="continue the run called --run-name")


def names(text: str | None) -> list[str]:
    """A comma-separated option (C1,C2) as a list, blanks dropped."""
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def split_config(args: argparse.Namespace):
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.data.splits import SplitConfig

    return SplitConfig(names(getattr(args, "external", "")), args.val_fraction, args.split_seed)


def alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Mark `parser` as the old spelling `old` of the command `new`: it still runs, after saying so."""
    parser.set_defaults(renamed=(old, new))


def note_renamed(args: argparse.Namespace) -> None:
    renamed = getattr(args, "renamed", None)
    if renamed:
        print(f"note: `{renamed[0]}` is now `{renamed[1]}`; the old form will be removed in the next release",
              file=sys.stderr)
