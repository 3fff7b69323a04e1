"""`diffkd ...`: thin. Parses, loads config, calls the library.

Each module in `diffkd/commands/` contributes its subcommand(s) through `register(subparsers)`;
modules import heavy libraries (torch, ray) only inside their handlers so `diffkd --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from diffkd import commands, console


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffkd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and every library's own log lines and warnings on the console "
                             "(by default `diffkd run` files them under OUT/logs/)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(verbose=args.verbose)
    try:
        return int(args.handler(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        print(f"diffkd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
