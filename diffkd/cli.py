"""The `diffkd` console script (`diffkd = "diffkd.cli:main"` in pyproject.toml; `python -m diffkd.cli`,
which cluster jobs run). The parser and the subcommands are in `diffkd.commands`."""
from __future__ import annotations

import sys

from diffkd.commands import main

if __name__ == "__main__":
    sys.exit(main())
