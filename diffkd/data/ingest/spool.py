"""Decoded images set aside on disk until their center is written.

An ingest checks the whole source before it writes anything, so every decoded image must wait for
the checks. Held in memory, they made an ingest's memory grow with its source; in a spool each
image's PNG (and mask) bytes go to one anonymous temporary file as soon as they are decoded, and
only a `Blob` (offset, length, sha256) stays in memory. The partition is then written from the spool
one row group at a time, so an ingest's memory is bounded by the images decoded at once and one
row group, whatever the size of the source.

An image whose stored bytes are exactly its source file's (a gray PNG without ancillary chunks, the
usual case) is not copied at all: its `Blob` names the file, which is read again when the center is
written (from the page cache, as a rule) and checked against the sha256 taken when it was decoded.
This halves the bytes an ingest writes.

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


class SourceChanged(ValueError):
    """A source file differs, when its center is written, from what was decoded and checked (the
    command reports it as bad input; the center being written is left as it was)."""


@dataclass(frozen=True)
class FileBytes:
    """Bytes that are the whole content of the file at `path`, so that a spool can keep the name alone."""
    path: str
    data: bytes


@dataclass(frozen=True)
class Blob:
    """Bytes kept in a `Spool`: where they are (an offset in the spool, or a source file), and their
    sha256 (the stored `sha256` of an image)."""
    offset: int
    length: int
    sha256: str
    path: str | None = None  # the source file holding exactly these bytes; then `offset` is unused


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

    def put(self, data: bytes | FileBytes) -> Blob:
        if isinstance(data, FileBytes):  # nothing to copy: the file is read again by `get`
            return Blob(0, len(data.data), hashlib.sha256(data.data).hexdigest(), data.path)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:  # reserve the place; the writes themselves run in parallel
            offset, self._end = self._end, self._end + len(data)
        view, done = memoryview(data), 0
        while done < len(data):  # a write may take fewer bytes than asked
            done += os.pwrite(self._fd, view[done:], offset + done)
        return Blob(offset, len(data), digest)

    def get(self, blob: Blob) -> bytes:
        if blob.path is not None:
            return _read_unchanged(blob)
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


def _read_unchanged(blob: Blob) -> bytes:
    try:
        with open(blob.path, "rb") as f:
            data = f.read(blob.length + 1)
    except OSError as err:
        raise SourceChanged(f"{blob.path}: cannot be read again to be stored ({err.strerror or err}); it was "
                            "moved or removed while the ingest ran; run the ingest again") from None
    if len(data) != blob.length or hashlib.sha256(data).hexdigest() != blob.sha256:
        raise SourceChanged(f"{blob.path}: changed while the ingest ran (it is no longer what was decoded and "
                            "checked); its center was not written; run the ingest again once the source is settled")
    return data
