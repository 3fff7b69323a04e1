"""Writing local files and folders so that a crash or a full disk never leaves a half-written result.

One file: the content goes to a hidden temporary file beside the target (same filesystem), is
flushed to the disk (fsync), renamed over the target, and the folder is flushed too, so after a
power cut the folder holds the old file or the new one, never a torn or an empty one.

A folder of several files (a report, a diffusers model, a checkpoint): everything is written into a
hidden staging folder beside the target, which is then swapped with the target in one step
(`renameat2(RENAME_EXCHANGE)` on Linux; elsewhere two renames that `recover_directory` finishes or
undoes after a crash). `recover_directory` removes whatever staging or retired folders a crash left.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    import pandas as pd

STAGING = "staging"  # .<name>.staging-<hex>: a folder being written, not yet switched in
RETIRED = "retired"  # .<name>.retired-<hex>: the previous folder, removed once the new one is in place


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries (new, renamed or removed names) to the disk."""
    fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any], mode: int | None = None) -> None:
    """Call `write(binary file)` for a temporary file beside `path`, fsync it, rename it over `path`.

    `mode`: the new file's permissions (default: what the umask allows, as for `open`).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask() if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | os.PathLike, content: Any, indent: int = 2) -> None:
    """JSON with numpy scalars and other odd values written as their plain equivalents (or strings)."""
    atomic_write_text(path, json.dumps(content, indent=indent, default=_plain))


def atomic_write_parquet(path: str | os.PathLike, frame: "pd.DataFrame") -> None:
    atomic_write(path, lambda f: frame.to_parquet(f, index=False))


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> str:
    """Save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=dpi, format="png"))
    finally:
        plt.close(fig)
    return os.fspath(path)


# ---- folders ------------------------------------------------------------------------------------

def _sibling(target: str, kind: str) -> str:
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.{kind}-{secrets.token_hex(4)}")


def _leftovers(target: str, kind: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(target))
    prefix = f".{name}.{kind}-"
    try:
        return sorted(os.path.join(parent, n) for n in os.listdir(parent) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def recover_directory(target: str | os.PathLike) -> None:
    """Finish or undo what an interrupted `replace_directory` of `target` left.

    A missing target with a retired copy beside it gets the copy back (the swap had not happened);
    staging folders (never switched in) and retired ones (already replaced) are removed.
    """
    target = os.fspath(target)
    retired = _leftovers(target, RETIRED)
    if retired and not os.path.lexists(target):
        os.rename(retired.pop(), target)
        fsync_directory(os.path.dirname(os.path.abspath(target)))
    for leftover in _leftovers(target, STAGING) + retired:
        shutil.rmtree(leftover)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh staging folder beside `target`; on success it replaces `target` whole.

    A failure inside the block removes the staging folder and leaves `target` as it was.
    """
    target = os.fspath(target)
    recover_directory(target)
    staging = _sibling(target, STAGING)
    os.makedirs(staging)
    try:
        yield Path(staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _sync_tree(root: str) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(dirpath)


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the complete folder `staging` in the place of `target` (which may not exist) in one step."""
    staging, target = os.fspath(staging), os.fspath(target)
    parent = os.path.dirname(os.path.abspath(target))
    _sync_tree(staging)
    if os.path.lexists(target) and _exchange(staging, target):
        fsync_directory(parent)
        shutil.rmtree(staging)  # now holds the old content
        return
    retired = None
    if os.path.lexists(target):
        retired = _sibling(target, RETIRED)
        os.rename(target, retired)
    try:
        os.rename(staging, target)
    except BaseException:
        if retired:
            os.rename(retired, target)
        raise
    fsync_directory(parent)
    if retired:
        shutil.rmtree(retired)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a)


def _plain(value: Any) -> Any:
    item = getattr(value, "item", None)  # numpy scalars
    return item() if callable(item) else str(value)
