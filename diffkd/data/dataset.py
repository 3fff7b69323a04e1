"""The Parquet dataset on disk: hive partitions by center plus an atomically updated manifest.

Layout (docs/dataset.md)::

    DS/_manifest.json
    DS/center=<C>/part-<digest>.parquet               real rows, one partition per center
    DS/_synthetic/center=<C>/part-<run_id>.parquet    generated rows, their own partition tree

The center is stored once, in the partition path (the files carry every other column), so the
ecosystem's readers open the dataset with no options: ``pd.read_parquet(DS)``,
``pyarrow.dataset.dataset(DS, partitioning="hive")`` and DuckDB's
``read_parquet('DS/**/*.parquet', hive_partitioning=true)`` each return one string ``center``
column. Names starting with ``_`` or ``.`` are skipped by pandas and pyarrow (like Spark's
``_SUCCESS``), so a plain read of DS returns the real rows only; a glob that does descend into
``_synthetic`` still tells those rows apart by their ``synthetic`` column.

Every change has one commit point, the manifest: new data files are written beside the old ones
under new names (each through a temporary file, fsynced, renamed), then the manifest is replaced
atomically (temporary file, fsync, rename, fsync of the folder), and only then are the files the old
manifest named deleted. A crash or a full disk at any step leaves the old manifest (the dataset
reads as before) or the new one (it reads as after); the next write, under the lock, runs `recover`,
which deletes every data file the manifest does not name, finishing or rolling back what was left.
diffkd reads only the files the manifest names; a plain directory read (pandas, DuckDB) sees the
same rows whenever no write is under way or was interrupted since the last successful write.
Adding or replacing a center touches only that center's partition and the manifest. Every
read-modify-write of the manifest holds the dataset's write lock (`ImageDataset.lock`), so
concurrent writers (two ingests of different centers, say) wait for each other instead of losing
an entry. On an object store (no file locks, no rename) objects are uploaded whole under new names,
and one machine writes a dataset: `_writer.json` names it and writes from other machines are refused.

Datasets written before this layout (``manifest.json``, a ``center`` column inside the files, a
``synthetic/`` tree) are read as they are and converted on their next write (`_migrate_legacy`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.fs  # noqa: F401  (pa.fs)
import pyarrow.parquet as pq

from diffkd.data.schema import (CLINICAL_SCHEMA, DEFAULT_LABEL_NAMES, SCHEMA_VERSION, arrow_schema,
                                check_label_names, stored_schema)
from diffkd.runtime.files import atomic_write, atomic_write_bytes
from diffkd.runtime.storage import resolve

log = logging.getLogger("diffkd.data")

MANIFEST = "_manifest.json"
SYNTHETIC_DIR = "_synthetic"
LEGACY_MANIFEST = "manifest.json"  # before the leading underscore
LEGACY_SYNTHETIC_DIR = "synthetic"
PARTITION_KEY = "center"
WRITER_FILE = "_writer.json"  # object stores: the one machine that writes the dataset
# Row groups: Ray Data reads each as a block and streams them, and a writer holds one at a time.
# Real-size images reach the byte bound first (~25 rows of 270-860 px), small ones the row bound.
ROW_GROUP_ROWS = 256
ROW_GROUP_BYTES = 8 << 20  # of image and mask bytes


def _encoding(schema: pa.Schema) -> dict:
    """Parquet options: zstd and dictionaries for the table columns; the image and mask columns hold
    PNGs, already compressed, which zstd cannot shrink and a dictionary cannot share, so they are
    stored plain (both cost CPU on every write and read for nothing)."""
    png = {f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)}
    return {"compression": {f.name: "none" if f.name in png else "zstd" for f in schema},
            "use_dictionary": [f.name for f in schema if f.name not in png]}

Rows = Union[pa.Table, Iterable[Union[pa.Table, pa.RecordBatch]]]  # a table, or its pieces in order


class DatasetError(ValueError):
    """The dataset on disk is missing, malformed, or does not match the schema."""


def validate_center_name(center: str) -> str:
    if not center or any(ch in center for ch in "/\\=\0") or center.startswith(".") or center == LEGACY_SYNTHETIC_DIR:
        raise DatasetError(f"center name {center!r} is not usable as a partition name: "
                           "use letters, digits, '-' or '_' (no '/', '=' or leading '.')")
    return center


def partitioning() -> pds.Partitioning:
    """The hive partitioning of a diffkd dataset: `center=<C>` directories, the center read as a string."""
    return pds.partitioning(pa.schema([pa.field(PARTITION_KEY, pa.string())]), flavor="hive")


class _WriteLock:
    """An exclusive lock on one dataset, across processes (flock) and threads; re-entrant in a thread.

    A local dataset is locked through `DS/../.<DS name>.lock`, beside the dataset rather than in it, so
    that a refused first ingest leaves no dataset folder behind. Object stores have no file locks:
    there the lock file lives in the local temporary directory, which orders one machine's writers only.
    """

    _registry: dict[str, "_WriteLock"] = {}
    _registry_guard = threading.Lock()

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @classmethod
    def for_path(cls, path: str, what: str) -> "_WriteLock":
        with cls._registry_guard:
            return cls._registry.setdefault(path, cls(path, what))

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        import fcntl

        with self._thread_lock:
            if self._depth == 0:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.warning("another process is writing %s; waiting for it to finish (lock %s)",
                                self.what, self.path)
                    started = time.monotonic()
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    log.warning("the other writer of %s finished after %.1fs; continuing", self.what,
                                time.monotonic() - started)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0:
                    fd, self._fd = self._fd, None
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)


class ImageDataset:
    """A diffkd dataset directory (local path, `file://`/`s3://`/`gs://` URI, or (filesystem, path))."""

    def __init__(self, root, filesystem: pa.fs.FileSystem | None = None):
        location = resolve(root, filesystem)
        self.fs, self.root = location.fs, location.path
        # a URI as given; a local path made absolute (Tune trials and Ray workers run in other directories)
        self.uri = root if isinstance(root, str) and "://" in root else self.root

    @classmethod
    def open(cls, dataset) -> "ImageDataset":
        """`dataset` itself when it already is an ImageDataset, else the dataset at that location."""
        return dataset if isinstance(dataset, cls) else cls(dataset)

    # ---- manifest -------------------------------------------------------------------------
    def _manifest_file(self) -> str | None:
        """The manifest's name on disk: the current one, else a legacy `manifest.json`, else None."""
        for name in (MANIFEST, LEGACY_MANIFEST):
            if self.fs.get_file_info(self._path(name)).type == pa.fs.FileType.File:
                return name
        return None

    def exists(self) -> bool:
        return self._manifest_file() is not None

    @property
    def manifest(self) -> dict:
        name = self._manifest_file()
        if name is None:
            return self._empty_manifest()
        with self.fs.open_input_stream(self._path(name)) as f:
            try:
                manifest = json.loads(f.read())
            except json.JSONDecodeError as err:
                raise DatasetError(f"{self._path(name)} is not valid JSON ({err}); restore it from backup "
                                   "or re-run ingest into a new dataset") from err
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(f"{self._path(name)} has schema_version {manifest.get('schema_version')}, "
                               f"this diffkd reads version {SCHEMA_VERSION}")
        return manifest

    def _empty_manifest(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "created": _now(),
            "updated": _now(),
            "clinical_schema": [asdict(c) for c in CLINICAL_SCHEMA],
            "centers": {},
            "synthetic": {},
        }

    @property
    def label_names(self) -> tuple[str, str]:
        """(name of label 0, name of label 1): the user's outcome names, DCIS/upgrade when none were given."""
        vocabulary = self.manifest.get("label_vocabulary")
        if not vocabulary:
            return DEFAULT_LABEL_NAMES
        return str(vocabulary["0"]), str(vocabulary["1"])

    def claim_label_names(self, names: tuple[str, str] | None) -> tuple[str, str]:
        """The dataset's outcome names after a writer that means `names` (None: whatever the dataset has).

        A new dataset takes `names` (default DCIS/upgrade); an existing one must already use them,
        because its stored 0/1 labels mean what its names say. Call under `lock()` before writing.
        """
        if names is None:
            return self.label_names
        names = check_label_names(names)
        if self.exists() and self.centers() and self.label_names != names:
            raise DatasetError(
                f"dataset {self.uri} names its outcomes {','.join(self.label_names)} (label 0, label 1), "
                f"but this ingest says {','.join(names)}: ingest into this dataset with "
                f"--label-names {','.join(self.label_names)}, or into a new dataset")
        return names

    def _write_manifest(self, manifest: dict) -> None:
        manifest["updated"] = _now()
        self._atomic_write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
        if self.fs.get_file_info(self._path(LEGACY_MANIFEST)).type == pa.fs.FileType.File:
            self.fs.delete_file(self._path(LEGACY_MANIFEST))

    def centers(self, synthetic: bool = False) -> list[str]:
        return sorted(self.manifest["synthetic" if synthetic else "centers"])

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the dataset's write lock (waits, with a logged message, while another writer holds it).

        Writers that read the dataset to decide what to write (ingest's checks against the stored
        centers) hold it across the read and the write; the write methods below take it themselves.
        """
        if self.fs.type_name == "local":
            parent, name = os.path.split(self.root.rstrip("/"))
            path = os.path.join(parent, f".{name}.lock")
        else:
            key = hashlib.sha256(str(self.uri).encode()).hexdigest()[:24]
            path = os.path.join(tempfile.gettempdir(), f"diffkd-dataset-{key}.lock")
        with _WriteLock.for_path(path, str(self.uri)).hold():
            yield

    # ---- reading ---------------------------------------------------------------------------
    def _synthetic_root(self) -> str:
        """`_synthetic`, or `synthetic` in a dataset written before the rename and not yet migrated."""
        legacy = self.fs.get_file_info(self._path(LEGACY_SYNTHETIC_DIR)).type == pa.fs.FileType.Directory
        return LEGACY_SYNTHETIC_DIR if legacy else SYNTHETIC_DIR

    def partition_base(self, synthetic: bool = False) -> str:
        """The directory holding the `center=<C>` partitions of real (or synthetic) rows."""
        return self._path(self._synthetic_root()) if synthetic else self.root

    def files(self, centers: Iterable[str] | None = None, synthetic: bool = False) -> list[str]:
        """Parquet file paths (filesystem-relative) of the chosen centers, for Ray Data or pyarrow.

        The files do not carry the center: read them with `partitioning()` relative to
        `partition_base(synthetic)`, or through `arrow_dataset` / `read_table`.
        """
        manifest = self.manifest
        section = manifest["synthetic" if synthetic else "centers"]
        wanted = sorted(section) if centers is None else list(centers)
        unknown = [c for c in wanted if c not in section and not synthetic]
        if unknown:
            raise DatasetError(f"center(s) {', '.join(unknown)} not in dataset {self.uri}; "
                               f"it has: {', '.join(sorted(section)) or 'none'}")
        base = self.partition_base(synthetic)
        return [posixpath.join(base, f"{PARTITION_KEY}={c}", name)
                for c in wanted if c in section for name in section[c]["files"]]

    def arrow_dataset(self, centers: Iterable[str] | None = None, synthetic: bool = False) -> pds.Dataset:
        """A pyarrow dataset over the chosen centers' files, with the `center` column from the paths."""
        return pds.dataset(self.files(centers, synthetic), filesystem=self.fs, format="parquet",
                           schema=arrow_schema(), partitioning=partitioning(),
                           partition_base_dir=self.partition_base(synthetic))

    def read_table(self, centers: Iterable[str] | None = None, synthetic: bool = False,
                   columns: list[str] | None = None) -> pa.Table:
        """Read rows of the chosen centers into memory (for small tables: metadata, splits, tests)."""
        names = arrow_schema().names if columns is None else list(columns)
        if not self.files(centers, synthetic):
            return arrow_schema().empty_table().select(names)
        return self.arrow_dataset(centers, synthetic).to_table(columns=names)

    def metadata(self, centers: Iterable[str] | None = None, synthetic: bool = False) -> pa.Table:
        """Every column except the pixel and mask bytes."""
        names = [f.name for f in arrow_schema() if f.name not in ("image", "mask")]
        return self.read_table(centers, synthetic, columns=names)

    def iter_center(self, center: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """A real center's rows in stored order, one row group at a time (memory holds one, not the center)."""
        names = arrow_schema().names if columns is None else list(columns)
        stored = [n for n in names if n != PARTITION_KEY]
        for path in self.files([center]):
            with self.fs.open_input_file(path) as f:
                stored_file = pq.ParquetFile(f)
                for group in range(stored_file.num_row_groups):  # iter_batches would join row groups
                    table = stored_file.read_row_group(group, columns=stored)
                    if PARTITION_KEY in names:
                        table = table.append_column(PARTITION_KEY, pa.array([center] * table.num_rows, pa.string()))
                    yield table.select(names)
                    del table  # not held while the next row group is read

    # ---- writing ---------------------------------------------------------------------------
    def write_center(self, center: str, rows: Rows, sources: list[dict] | None = None,
                     label_names: tuple[str, str] | None = None) -> None:
        """Replace center `center`'s real partition with `rows` and record it in the manifest.

        `rows`: a table, or an iterable of its pieces (tables or record batches, in order), which is
        consumed under the dataset's lock while the new file is written, so that a center larger than
        memory can be written; each piece becomes one row group or more (pieces of about a row group,
        `starts_row_group`, keep the file's layout what one table would give). The pieces may come from
        the center's current files (`iter_center`): they stay in place until the new manifest is committed. `label_names`: the outcome names the rows' 0/1
        labels stand for; they must match the dataset's (a new dataset takes them; None: the dataset's own).
        """
        self._write_partition(validate_center_name(center), rows, synthetic=False, sources=sources or [],
                              label_names=label_names)

    def write_synthetic(self, center: str, table: pa.Table, run_id: str, generator: dict | None = None) -> None:
        """Add one generator run's rows for `center` to the synthetic tree (existing runs are kept).

        `generator` (recorded with the run in the manifest) says which split trained the generator,
        so that training stages can refuse rows of a generator that saw their validation or external
        patients (`diffkd.data.splits.check_synthetic_split`).
        """
        self._write_partition(validate_center_name(center), table, synthetic=True, run_id=run_id,
                              generator=generator)

    def _write_partition(self, center: str, rows: Rows, synthetic: bool, sources: list[dict] | None = None,
                         run_id: str | None = None, generator: dict | None = None,
                         label_names: tuple[str, str] | None = None) -> None:
        if isinstance(rows, pa.Table):  # checked whole before the lock, as it is at hand
            stored = [_stored_piece(center, rows)]
            if stored[0].num_rows == 0:
                raise DatasetError(f"refusing to write an empty partition for center {center!r}")
        else:
            stored = _stored_pieces(center, rows)
        with self.lock():
            names = self.claim_label_names(label_names)
            self._claim_single_writer()
            self._migrate_legacy()
            self.recover()
            manifest = self.manifest
            manifest["label_vocabulary"] = {"0": names[0], "1": names[1]}
            section = manifest["synthetic" if synthetic else "centers"]
            part_dir = self._partition_dir(center, synthetic)
            if synthetic:
                self._add_synthetic_run(section, center, part_dir, stored, run_id, generator)
            else:
                # the new file goes beside the old ones under a new name; the manifest switch below is
                # the commit point, and `recover` then deletes the files the old manifest named
                name = f"part-{uuid.uuid4().hex[:12]}.parquet"
                written = self._put_rows(posixpath.join(part_dir, name), stored, center)
                previous = section.get(center, {})
                section[center] = {
                    "files": [name],
                    "rows": written.rows,
                    "patients": len(written.patients),
                    "labels": _sorted_counts(written.labels),
                    "modalities": _sorted_counts(written.modalities),
                    "sources": previous.get("sources", []) + sources,
                    "created": previous.get("created", _now()),
                    "updated": _now(),
                }
            self._write_manifest(manifest)
            self._tidy_after_commit()

    def _tidy_after_commit(self) -> None:
        """Delete what the new manifest no longer names; the change is committed whatever happens here."""
        try:
            self.recover()
        except OSError as err:
            log.warning("dataset %s: the change is saved, but removing the files it replaced failed (%s); "
                        "the next write removes them", self.uri, err)

    def _add_synthetic_run(self, section: dict, center: str, part_dir: str, stored: Iterable[pa.Table],
                           run_id: str, generator: dict | None) -> None:
        name = f"part-{run_id}.parquet"
        entry = section.setdefault(center, {"files": [], "rows": 0, "runs": []})
        if name in entry["files"]:
            raise DatasetError(f"synthetic run {run_id!r} already written for center {center!r}")
        written = self._put_rows(posixpath.join(part_dir, name), stored, center)
        entry["files"].append(name)
        entry["runs"].append({"run_id": run_id, "rows": written.rows, "written": _now(),
                              **({"generator": generator} if generator else {})})
        entry["rows"] += written.rows
        entry["labels"] = _merge_counts(entry.get("labels", {}), _sorted_counts(written.labels))

    def recover(self) -> list[str]:
        """Finish or roll back what an interrupted write left (call under `lock()`); returns what was removed.

        The manifest is the commit point: a data file it does not name is either a new file whose
        write never reached the manifest switch (rolled back) or an old file the switch replaced
        (its deletion finished), so both are deleted, as are temporary files and partitions the
        manifest does not list. A partition folder an earlier diffkd had renamed away
        (`.retired-*`) is moved back first when the manifest still names its files.
        """
        if self._manifest_file() is None:
            return []
        manifest = self.manifest
        removed = self._restore_retired(manifest)
        for synthetic in (False, True):
            section = manifest["synthetic" if synthetic else "centers"]
            base = self.partition_base(synthetic)
            for info in self._listing(base):
                rel = posixpath.relpath(info.path, base)
                parts = rel.split("/")
                if synthetic is False and parts[0] in (SYNTHETIC_DIR, LEGACY_SYNTHETIC_DIR):
                    continue
                if len(parts) == 1:  # the dataset root: stray temporary files of the manifest writer
                    if not synthetic and parts[0].startswith(f".{MANIFEST}.tmp-"):
                        removed.append(info.path)
                        self._delete(info.path, folder=False)
                    continue
                if not parts[0].startswith(f"{PARTITION_KEY}="):
                    continue
                center = parts[0].split("=", 1)[1]
                named = set(section.get(center, {}).get("files", ()))
                if len(parts) == 2 and parts[1] not in named and info.type == pa.fs.FileType.File:
                    removed.append(info.path)
                    self._delete(info.path, folder=False)
            for info in self._listing(base, recursive=False):
                leaf = posixpath.basename(info.path)
                if (info.type == pa.fs.FileType.Directory and leaf.startswith(f"{PARTITION_KEY}=")
                        and leaf.split("=", 1)[1] not in section):
                    removed.append(info.path)
                    self._delete(info.path, folder=True)
        if removed:
            log.info("dataset %s: removed %d file(s) an interrupted write had left", self.uri, len(removed))
        return removed

    def _restore_retired(self, manifest: dict) -> list[str]:
        removed = []
        for info in self._listing(self.root, recursive=False):
            leaf = posixpath.basename(info.path)
            if not (leaf.startswith(".retired-") or leaf.startswith(".staging-")):
                continue
            for center, entry in manifest["centers"].items():
                part = self._path(self._partition_dir(center, False))
                missing = [n for n in entry["files"]
                           if self.fs.get_file_info(posixpath.join(part, n)).type != pa.fs.FileType.File]
                if missing and leaf.startswith(".retired-") and all(
                        self.fs.get_file_info(posixpath.join(info.path, n)).type == pa.fs.FileType.File
                        for n in missing):
                    self.fs.create_dir(part, recursive=True)
                    for n in missing:
                        self.fs.move(posixpath.join(info.path, n), posixpath.join(part, n))
                    log.warning("dataset %s: center %s restored from %s, left by an interrupted write",
                                self.uri, center, leaf)
            removed.append(info.path)
            self._delete(info.path, folder=True)
        return removed

    def _listing(self, base: str, recursive: bool = True) -> list:
        selector = pa.fs.FileSelector(base, recursive=recursive, allow_not_found=True)
        return self.fs.get_file_info(selector)

    def delete_synthetic(self, center: str | None = None) -> None:
        """Drop generated rows (all centers, or one) — real partitions are untouched."""
        with self.lock():
            self._claim_single_writer()
            self._migrate_legacy()
            manifest = self.manifest
            self.recover()
            for c in [center] if center else list(manifest["synthetic"]):
                manifest["synthetic"].pop(c, None)
            self._write_manifest(manifest)  # the commit point; then the unnamed files are deleted
            self._tidy_after_commit()

    def _migrate_legacy(self) -> None:
        """Bring a dataset written before the current layout up to it (under the lock, before a write).

        Each step is atomic and safe to repeat, so a crash part-way leaves a readable dataset that the
        next write finishes: files lose their `center` column (rewritten beside, then renamed over),
        `synthetic/` is renamed to `_synthetic/`, and the caller's manifest write replaces
        `manifest.json` by `_manifest.json`.
        """
        if self._manifest_file() != LEGACY_MANIFEST:
            return
        log.info("converting dataset %s to the current layout (center in the partition path only, "
                 "_manifest.json, _synthetic/)", self.uri)
        for synthetic in (False, True):
            for path in self.files(synthetic=synthetic):
                if PARTITION_KEY in pq.read_schema(path, filesystem=self.fs).names:
                    table = pq.read_table(path, filesystem=self.fs, schema=stored_schema())
                    directory, name = posixpath.split(path)
                    self._atomic_write_table(posixpath.relpath(directory, self.root), name, table)
        if self._synthetic_root() == LEGACY_SYNTHETIC_DIR:
            if self.fs.get_file_info(self._path(SYNTHETIC_DIR)).type != pa.fs.FileType.NotFound:
                raise DatasetError(f"dataset {self.uri} holds both {LEGACY_SYNTHETIC_DIR}/ and {SYNTHETIC_DIR}/; "
                                   f"keep the one its manifest describes ({LEGACY_SYNTHETIC_DIR}/) and remove the other")
            self.fs.move(self._path(LEGACY_SYNTHETIC_DIR), self._path(SYNTHETIC_DIR))

    # ---- low level -------------------------------------------------------------------------
    def _partition_dir(self, center: str, synthetic: bool) -> str:
        leaf = f"{PARTITION_KEY}={center}"
        return posixpath.join(self._synthetic_root(), leaf) if synthetic else leaf

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    @property
    def _local(self) -> bool:
        return self.fs.type_name == "local"

    def _put(self, path: str, write) -> None:
        """A new file at `path`, whole or not at all: locally through a fsynced temporary file and a
        rename (`diffkd.runtime.files.atomic_write`); on an object store one upload (objects appear whole)."""
        if self._local:
            atomic_write(path, write)
        else:
            self.fs.create_dir(posixpath.dirname(path), recursive=True)  # a no-op where folders are prefixes
            with self.fs.open_output_stream(path) as f:
                write(f)

    def _put_rows(self, rel: str, stored: Iterable[pa.Table], center: str) -> "_Written":
        """Write `stored` (pieces in the stored schema) as one file, streaming: each piece is cut into
        row groups (`row_groups`), never joined to the next, so memory holds about one piece, however
        many rows pass. Refuses to write no rows."""
        path = self._path(rel)
        groups = _row_groups_of(stored)
        first = next(groups, None)
        if first is None:
            raise DatasetError(f"refusing to write an empty partition for center {center!r}")
        if self._local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
        written = _Written()
        schema, groups = first.schema, _prepended(first, groups)
        del first  # each group is freed once written

        def write(f) -> None:
            with pq.ParquetWriter(f, schema, **_encoding(schema)) as writer:
                for group in groups:
                    writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
                    written.add(group)
                    del group  # not held while the next piece is made

        self._put(path, write)
        return written

    def _atomic_write_table(self, directory: str, name: str, table: pa.Table) -> None:
        self._put_rows(posixpath.join(directory, name), [table], posixpath.basename(directory))

    def _delete(self, path: str, folder: bool) -> None:
        if not self._local:
            self.fs.delete_dir(path) if folder else self.fs.delete_file(path)
        elif folder:
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def _atomic_write_bytes(self, rel: str, data: bytes) -> None:
        if self._local:
            atomic_write_bytes(self._path(rel), data)
        else:
            self._put(self._path(rel), lambda f: f.write(data))

    # ---- object stores: one writing machine ---------------------------------------------------
    def _claim_single_writer(self) -> None:
        """Refuse a write to an object-store dataset from a machine other than the one that writes it.

        Object stores have no file locks, and pyarrow offers no conditional writes, so `lock()` orders
        the writers of one machine only. The first write records this machine in `_writer.json`;
        later writes from another machine are refused until the user moves the role explicitly
        (``DIFFKD_DATASET_WRITER=take-over``, after making sure the old writer has stopped).
        """
        if self._local:
            return  # local writers are ordered by the file lock
        me = {"host": socket.gethostname()}
        path = self._path(WRITER_FILE)
        try:
            with self.fs.open_input_stream(path) as f:
                current = json.loads(f.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            current = None
        if current and current.get("host") != me["host"]:
            if os.environ.get("DIFFKD_DATASET_WRITER") != "take-over":
                raise DatasetError(
                    f"dataset {self.uri} is written from {current.get('host')!r} only (object stores have no "
                    f"locks, so one machine writes a dataset); run this write there, or, once that machine has "
                    f"stopped writing, set DIFFKD_DATASET_WRITER=take-over to make this machine the writer")
            log.warning("dataset %s: taking over the writer role from %s", self.uri, current.get("host"))
        if current != me:
            self._put(path, lambda f: f.write(json.dumps(me).encode()))


def conform(table: pa.Table) -> pa.Table:
    """Order and cast columns to the dataset schema; name what is missing or cannot be cast."""
    schema = arrow_schema()
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise DatasetError(f"rows lack required column(s): {', '.join(missing)}")
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise DatasetError(f"rows carry column(s) the schema does not know: {', '.join(extra)}; "
                           "declare clinical columns in diffkd/data/schema.py CLINICAL_SCHEMA")
    columns = []
    for f in schema:
        try:
            columns.append(table.column(f.name).cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise DatasetError(f"column {f.name!r} cannot be stored as {f.type}: {err}") from err
    return pa.Table.from_arrays(columns, schema=schema)


def _stored_piece(center: str, rows: pa.Table | pa.RecordBatch) -> pa.Table:
    """Rows of `center` in the stored schema: conformed, checked to be that center's, without the
    `center` column (the partition path says it)."""
    table = conform(pa.Table.from_batches([rows]) if isinstance(rows, pa.RecordBatch) else rows)
    wrong = set(table.column(PARTITION_KEY).to_pylist()) - {center}
    if wrong:
        raise DatasetError(f"rows for center(s) {sorted(wrong)} passed to the partition of {center!r}")
    return table.drop_columns([PARTITION_KEY])


def _stored_pieces(center: str, rows: Iterable[pa.Table | pa.RecordBatch]) -> Iterator[pa.Table]:
    for piece in rows:
        yield _stored_piece(center, piece)
        del piece  # not held while the next piece is made (a generator expression would)


def _row_groups_of(pieces: Iterable[pa.Table]) -> Iterator[pa.Table]:
    for piece in pieces:
        yield from row_groups(piece)
        del piece


def starts_row_group(rows: int, size: int, row_size: int) -> bool:
    """Whether a row of `row_size` image and mask bytes begins a new row group after `rows` rows of
    `size` bytes: ROW_GROUP_ROWS rows a group, fewer where they would pass ROW_GROUP_BYTES (a row
    over the bound by itself is a group of its own)."""
    return rows > 0 and (rows == ROW_GROUP_ROWS or size + row_size > ROW_GROUP_BYTES)


def row_group_bounds(row_sizes: Iterable[int]) -> Iterator[tuple[int, int]]:
    """(start, stop) of each row group of rows with these image and mask byte sizes (`starts_row_group`)."""
    start = rows = size = 0
    for i, row_size in enumerate(row_sizes):
        if starts_row_group(rows, size, row_size):
            yield start, i
            start, rows, size = i, 0, 0
        rows += 1
        size += row_size
    if rows:
        yield start, start + rows


def row_groups(table: pa.Table) -> Iterator[pa.Table]:
    """`table` cut into row groups (`row_group_bounds`), as slices."""
    for start, stop in row_group_bounds(_row_bytes(table)):
        yield table.slice(start, stop - start)


def _prepended(first, rest: Iterator) -> Iterator:
    """`first`, then `rest`, holding `first` no longer than that (itertools.chain keeps it to the end)."""
    yield first
    del first
    yield from rest


def _row_bytes(table: pa.Table) -> list[int]:
    """Each row's image plus mask bytes (0 for a missing mask)."""
    total = np.zeros(table.num_rows, dtype=np.int64)
    for name in ("image", "mask"):
        if name in table.column_names:
            total += pc.fill_null(pc.binary_length(table.column(name)), 0).to_numpy().astype(np.int64)
    return total.tolist()


@dataclass
class _Written:
    """What a partition writer passed: the counts its manifest entry records."""
    rows: int = 0
    patients: set = field(default_factory=set)
    labels: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)

    def add(self, table: pa.Table) -> None:
        self.rows += table.num_rows
        self.patients.update(table.column("patient_id").to_pylist())
        self.labels.update(table.column("label").to_pylist())
        self.modalities.update(table.column("modality").to_pylist())


def _sorted_counts(counts: Counter) -> dict[str, int]:
    return {str(k): v for k, v in sorted(counts.items())}


def _merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = Counter(a)
    out.update(b)
    return dict(sorted(out.items()))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
