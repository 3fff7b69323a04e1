"""One module per `diffkd` subcommand family; each defines `register(subparsers)` (see diffkd/cli.py)."""
