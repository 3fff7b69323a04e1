"""Writing results so that an interrupted run never leaves a half-written file behind.

Every writer puts the content in a temporary file beside the target (same filesystem) and renames it
over the target: readers see the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def _temporary_beside(path: str | os.PathLike, suffix: str = "") -> str:
    directory = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix + ".tmp", dir=directory)
    os.close(fd)
    return tmp


def _replace(tmp: str, path: str | os.PathLike) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    tmp = _temporary_beside(path)
    with open(tmp, "w") as f:
        f.write(text)
    _replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, content: Any, indent: int = 2) -> None:
    """JSON with numpy scalars and other odd values written as their plain equivalents (or strings)."""
    atomic_write_text(path, json.dumps(content, indent=indent, default=_plain))


def atomic_write_parquet(path: str | os.PathLike, frame: "pd.DataFrame") -> None:
    tmp = _temporary_beside(path, ".parquet")
    try:
        frame.to_parquet(tmp, index=False)
    except BaseException:
        os.unlink(tmp)
        raise
    _replace(tmp, path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> str:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    tmp = _temporary_beside(path, ".png")
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    _replace(tmp, path)
    return os.fspath(path)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    return item() if callable(item) else str(value)
