"""Decoded images set aside on disk until their center is written.

An ingest checks the whole source before it writes anything, so every decoded image must wait for
the checks. Held in memory, they made an ingest's memory grow with its source; in a spool each
image's PNG (and mask) bytes go to one anonymous temporary file as soon as they are decoded, and
only a `Blob` (offset, length, sha256) stays in memory. The partition is then written from the spool
one row group at a time, so an ingest's memory is bounded by the images decoded at once and one
row group, whatever the size of the source.

The file is unlinked from the start (`tempfile.TemporaryFile`): nothing of it is left behind, even
after a crash, and no other process can open it. It is placed beside a local dataset (the disk that
must hold the images anyway; a memory-backed /tmp would hold them in memory again), else in the
temporary directory ($TMPDIR).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Blob:
    """Bytes kept in a `Spool`: where they are, and their sha256 (the stored `sha256` of an image)."""
    offset: int
    length: int
    sha256: str


class Spool:
    """An append-only temporary file of byte strings; `put` is safe from several threads at once."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._file = tempfile.TemporaryFile(prefix="diffkd-ingest-", suffix=".spool", dir=directory)
        self._fd = self._file.fileno()
        self._end = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Bytes set aside so far."""
        return self._end

    def put(self, data: bytes) -> Blob:
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:  # reserve the place; the writes themselves run in parallel
            offset, self._end = self._end, self._end + len(data)
        view, done = memoryview(data), 0
        while done < len(data):  # a write may take fewer bytes than asked
            done += os.pwrite(self._fd, view[done:], offset + done)
        return Blob(offset, len(data), digest)

    def get(self, blob: Blob) -> bytes:
        parts, done = [], 0
        while done < blob.length:
            part = os.pread(self._fd, blob.length - done, blob.offset + done)
            if not part:
                raise OSError(f"ingest spool {self._file.name}: {blob.length - done} byte(s) missing at "
                              f"offset {blob.offset + done}")
            parts.append(part)
            done += len(part)
        return b"".join(parts)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
