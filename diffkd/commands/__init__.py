"""The `diffkd` command line: parses, configures the console, calls the library, prints what came out.

One module per subcommand family; each contributes its subcommand(s) through `register(subparsers)`
(`options.py` holds the options they share and registers nothing). Modules import heavy libraries
(torch, ray) only inside their handlers so `diffkd --help` stays fast. The parser and `main` live
here, below every command, so that a command that runs others (`diffkd demo`) calls `main` without
importing the console script (`diffkd/cli.py`). The grammar is documented in docs/cli.md.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from diffkd.commands.options import note_renamed
from diffkd.runtime import console


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


DESCRIPTION = """\
Small, fast classifiers for multicenter medical imaging, with the evidence to trust them.
A conditional diffusion model learns each center's images and adds synthetic ones; a teacher learns
from real and synthetic images; a small student is distilled from it (also without paired images) and
exported to ONNX; baselines, leave-one-center-out and external validation with confidence intervals
end in one HTML report. Every stage trains through Ray Train + DeepSpeed, on this machine or a cluster.

Start with `diffkd demo` (a synthetic cohort through the whole pipeline), or: phantom/ingest -> run."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkd", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and every library's own log lines and warnings on the console "
                             "(by default `diffkd run` files them under OUT/logs/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(verbose=args.verbose)
    note_renamed(args)
    try:
        return int(args.handler(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        print(f"diffkd {args.command}: error: {err}", file=sys.stderr)
        return 2

