"""The Parquet dataset on disk: hive partitions by center plus an atomically updated manifest.

Layout (DESIGN.md)::

    DS/manifest.json
    DS/center=<C>/part-<digest>.parquet               real rows, one partition per center
    DS/synthetic/center=<C>/part-<run_id>.parquet      generated rows, their own partition tree

Adding or replacing a center writes only that center's partition directory and then the manifest;
no other center's files are touched. Writes go to a temporary name first and are renamed into
place, so a crash leaves either the old or the new partition, never half of one.
"""
from __future__ import annotations

import json
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import asdict
from typing import Iterable

import pyarrow as pa
import pyarrow.fs  # noqa: F401  (pa.fs)
import pyarrow.parquet as pq

from diffkd.data.schema import CLINICAL_SCHEMA, LABEL_NAMES, SCHEMA_VERSION, arrow_schema

MANIFEST = "manifest.json"
SYNTHETIC_DIR = "synthetic"


def resolve(root, filesystem: pa.fs.FileSystem | None = None) -> tuple[pa.fs.FileSystem, str]:
    """(filesystem, path) for a local path, a URI pyarrow understands (file://, s3://, gs://), or a given filesystem."""
    import os

    if filesystem is not None:
        return filesystem, str(root)
    root = os.fspath(root)
    if "://" in root:
        return pa.fs.FileSystem.from_uri(root)
    return pa.fs.LocalFileSystem(), os.path.abspath(root)


class DatasetError(ValueError):
    """The dataset on disk is missing, malformed, or does not match the schema."""


def _partition_dir(center: str, synthetic: bool) -> str:
    return posixpath.join(SYNTHETIC_DIR, f"center={center}") if synthetic else f"center={center}"


def validate_center_name(center: str) -> str:
    if not center or any(ch in center for ch in "/\\=\0") or center.startswith(".") or center == SYNTHETIC_DIR:
        raise DatasetError(f"center name {center!r} is not usable as a partition name: "
                           "use letters, digits, '-' or '_' (no '/', '=' or leading '.')")
    return center


class ImageDataset:
    """A diffkd dataset directory (local path, `file://`/`s3://`/`gs://` URI, or (filesystem, path))."""

    def __init__(self, root, filesystem: pa.fs.FileSystem | None = None):
        self.fs, self.root = resolve(root, filesystem)
        # a URI as given; a local path made absolute (Tune trials and Ray workers run in other directories)
        self.uri = root if isinstance(root, str) and "://" in root else self.root

    # ---- manifest -------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.get_file_info(self._path(MANIFEST)).type == pa.fs.FileType.File

    @property
    def manifest(self) -> dict:
        if not self.exists():
            return self._empty_manifest()
        with self.fs.open_input_stream(self._path(MANIFEST)) as f:
            try:
                manifest = json.loads(f.read())
            except json.JSONDecodeError as err:
                raise DatasetError(f"{self._path(MANIFEST)} is not valid JSON ({err}); restore it from backup "
                                   "or re-run ingest into a new dataset") from err
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DatasetError(f"{self._path(MANIFEST)} has schema_version {manifest.get('schema_version')}, "
                               f"this diffkd reads version {SCHEMA_VERSION}")
        return manifest

    def _empty_manifest(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "created": _now(),
            "updated": _now(),
            "label_vocabulary": {str(k): v for k, v in LABEL_NAMES.items()},
            "clinical_schema": [asdict(c) for c in CLINICAL_SCHEMA],
            "centers": {},
            "synthetic": {},
        }

    def _write_manifest(self, manifest: dict) -> None:
        manifest["updated"] = _now()
        self._atomic_write_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())

    def centers(self, synthetic: bool = False) -> list[str]:
        return sorted(self.manifest["synthetic" if synthetic else "centers"])

    # ---- reading ---------------------------------------------------------------------------
    def files(self, centers: Iterable[str] | None = None, synthetic: bool = False) -> list[str]:
        """Parquet file paths (filesystem-relative) of the chosen centers, for Ray Data or pyarrow."""
        manifest = self.manifest
        section = manifest["synthetic" if synthetic else "centers"]
        wanted = sorted(section) if centers is None else list(centers)
        unknown = [c for c in wanted if c not in section and not synthetic]
        if unknown:
            raise DatasetError(f"center(s) {', '.join(unknown)} not in dataset {self.uri}; "
                               f"it has: {', '.join(sorted(section)) or 'none'}")
        return [self._path(_partition_dir(c, synthetic), name)
                for c in wanted if c in section for name in section[c]["files"]]

    def read_table(self, centers: Iterable[str] | None = None, synthetic: bool = False,
                   columns: list[str] | None = None) -> pa.Table:
        """Read rows of the chosen centers into memory (for small tables: metadata, splits, tests)."""
        paths = self.files(centers, synthetic)
        if not paths:
            return arrow_schema().empty_table() if columns is None else arrow_schema().empty_table().select(columns)
        tables = [pq.read_table(p, filesystem=self.fs, columns=columns, schema=arrow_schema()) for p in paths]
        return pa.concat_tables(tables)

    def metadata(self, centers: Iterable[str] | None = None, synthetic: bool = False) -> pa.Table:
        """Every column except the pixel and mask bytes."""
        names = [f.name for f in arrow_schema() if f.name not in ("image", "mask")]
        return self.read_table(centers, synthetic, columns=names)

    # ---- writing ---------------------------------------------------------------------------
    def write_center(self, center: str, table: pa.Table, sources: list[dict] | None = None) -> None:
        """Replace center `center`'s real partition with `table` and record it in the manifest."""
        self._write_partition(validate_center_name(center), table, synthetic=False, sources=sources or [])

    def write_synthetic(self, center: str, table: pa.Table, run_id: str, generator: dict | None = None) -> None:
        """Add one generator run's rows for `center` to the synthetic tree (existing runs are kept).

        `generator` (recorded with the run in the manifest) says which split trained the generator,
        so that training stages can refuse rows of a generator that saw their validation or external
        patients (`diffkd.data.splits.check_synthetic_split`).
        """
        self._write_partition(validate_center_name(center), table, synthetic=True, run_id=run_id,
                              generator=generator)

    def _write_partition(self, center: str, table: pa.Table, synthetic: bool, sources: list[dict] | None = None,
                         run_id: str | None = None, generator: dict | None = None) -> None:
        table = conform(table)
        if table.num_rows == 0:
            raise DatasetError(f"refusing to write an empty partition for center {center!r}")
        wrong = set(table.column("center").to_pylist()) - {center}
        if wrong:
            raise DatasetError(f"rows for center(s) {sorted(wrong)} passed to the partition of {center!r}")
        manifest = self.manifest
        section = manifest["synthetic" if synthetic else "centers"]
        part_dir = _partition_dir(center, synthetic)
        if synthetic:
            name = f"part-{run_id}.parquet"
            entry = section.setdefault(center, {"files": [], "rows": 0, "runs": []})
            if name in entry["files"]:
                raise DatasetError(f"synthetic run {run_id!r} already written for center {center!r}")
            self.fs.create_dir(self._path(part_dir), recursive=True)
            self._atomic_write_table(posixpath.join(part_dir, name), table)
            entry["files"].append(name)
            entry["runs"].append({"run_id": run_id, "rows": table.num_rows, "written": _now(),
                                  **({"generator": generator} if generator else {})})
            entry["rows"] += table.num_rows
            entry["labels"] = _merge_counts(entry.get("labels", {}), _counts(table, "label"))
        else:
            # A new directory, renamed over the old one: readers never see a mix of old and new files.
            name = f"part-{uuid.uuid4().hex[:12]}.parquet"
            staging = f".staging-{uuid.uuid4().hex[:8]}"
            self.fs.create_dir(self._path(staging), recursive=True)
            self._write_table(posixpath.join(staging, name), table)
            old = self._path(part_dir)
            retired = self._path(f".retired-{uuid.uuid4().hex[:8]}")
            had_old = self.fs.get_file_info(old).type == pa.fs.FileType.Directory
            if had_old:
                self.fs.move(old, retired)
            self.fs.move(self._path(staging), old)
            previous = section.get(center, {})
            section[center] = {
                "files": [name],
                "rows": table.num_rows,
                "patients": len(set(table.column("patient_id").to_pylist())),
                "labels": _counts(table, "label"),
                "modalities": _counts(table, "modality"),
                "sources": previous.get("sources", []) + sources,
                "created": previous.get("created", _now()),
                "updated": _now(),
            }
            self._write_manifest(manifest)
            if had_old:
                self.fs.delete_dir(retired)
            return
        self._write_manifest(manifest)

    def delete_synthetic(self, center: str | None = None) -> None:
        """Drop generated rows (all centers, or one) — real partitions are untouched."""
        manifest = self.manifest
        for c in [center] if center else list(manifest["synthetic"]):
            if c in manifest["synthetic"]:
                self.fs.delete_dir(self._path(_partition_dir(c, True)))
                del manifest["synthetic"][c]
        self._write_manifest(manifest)

    # ---- low level -------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _write_table(self, rel: str, table: pa.Table) -> None:
        pq.write_table(table, self._path(rel), filesystem=self.fs, compression="zstd",
                       row_group_size=256)  # small row groups: Ray Data reads them as blocks and streams

    def _atomic_write_table(self, rel: str, table: pa.Table) -> None:
        tmp = f"{rel}.tmp-{uuid.uuid4().hex[:8]}"
        self._write_table(tmp, table)
        self.fs.move(self._path(tmp), self._path(rel))

    def _atomic_write_bytes(self, rel: str, data: bytes) -> None:
        self.fs.create_dir(self.root, recursive=True)
        tmp = self._path(f"{rel}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self._path(rel))


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


def _counts(table: pa.Table, column: str) -> dict[str, int]:
    return {str(k): v for k, v in sorted(Counter(table.column(column).to_pylist()).items())}


def _merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = Counter(a)
    out.update(b)
    return dict(sorted(out.items()))


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
