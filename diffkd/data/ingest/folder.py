"""The `folder` layout: `SRC/<label>/<images>`, or any tree of images described by a clinical CSV.

With a CSV (``--clinical``, or ``SRC/clinical.csv`` when present) the CSV is the authority: one row per
image, ``file`` relative to SRC, ``patient_id`` required, ``label`` from the CSV or else from the
file's first folder. Masks come from a ``mask`` column (several joined by ``;`` are OR-merged) or,
without that column, from ``<stem>_mask*.<ext>`` files beside the image. Images on disk that the CSV
does not list are reported in a warning and not ingested.

Without a CSV every image needs a label folder, and each image counts as its own patient (there is
no patient id to group them by; a warning says so).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from diffkd.data.ingest.common import (DEFAULT_LIMITS, DecodeLimits, IMAGE_SUFFIXES, SKIP, Discovery, IngestError, Loaded, Record,
                                       find_clinical_csv, is_mask_name, list_files, load_image_record, MaskIndex,
                                       read_csv, record_from_csv, resolve_label)
from diffkd.data.schema import DEFAULT_LABEL_NAMES

NAME = "folder"
UNLISTED_SHOWN = 5


def folder_label(rel: str, label_map, names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> int | object | None:
    """The label a file's first folder names (0, 1 or SKIP), or None when it names none."""
    parts = PurePosixPath(rel).parts
    if len(parts) < 2:
        return None
    try:
        return resolve_label(parts[0], label_map, names)
    except ValueError:
        return None


def discover(src: Path, clinical_csv=None, label_map=None, label_names: tuple[str, str] = DEFAULT_LABEL_NAMES,
             **_) -> Discovery:
    """Records of SRC; label folders and cells are read as the dataset's `label_names` (or 0/1)."""
    csv_path = find_clinical_csv(src, clinical_csv)
    files = list_files(src, IMAGE_SUFFIXES)
    images = [f for f in files if not is_mask_name(f)]
    if csv_path is None:
        return from_label_folders(images, MaskIndex(files), label_map, names=label_names)
    return from_csv(csv_path, images, MaskIndex(files), label_map, required=("file", "patient_id"),
                    names=label_names)


def from_label_folders(images: list[str], masks: MaskIndex, label_map, own_patient: bool = True,
                       names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> Discovery:
    """Labels from each file's first folder; with `own_patient` every image is its own patient."""
    found = Discovery(records=[])
    for rel in images:
        parts = PurePosixPath(rel).parts
        rec = Record(file=rel, patient=rel if own_patient else None, own_patient=own_patient,
                     masks=masks.beside(rel))
        if len(parts) < 2:
            found.problems.append(rec.problem("not in a label folder and there is no clinical CSV; put images "
                                              "under SRC/<label>/ or describe them with --clinical CSV"))
            continue
        try:
            label = resolve_label(parts[0], label_map, names)
        except ValueError as err:
            found.problems.append(rec.problem(f"label folder {parts[0]!r}: {err}"))
            continue
        if label is SKIP:
            found.skipped += 1
            continue
        rec.label = label
        found.records.append(rec)
    if found.records and own_patient:
        found.warnings.append("no clinical CSV: each image is treated as its own patient, so patient-level "
                              "splits cannot keep one patient's images together; give a CSV with patient_id")
    return found


def from_csv(csv_path: Path, images: list[str], masks: MaskIndex, label_map,
             required: tuple[str, ...], names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> Discovery:
    table = read_csv(csv_path, required=required)
    found = Discovery(records=[], csv_path=csv_path, csv_header=table.header, csv_rows=dict(table.rows),
                      csv_digest=table.digest, csv_file_column=table.columns["file"])
    if table.ignored:
        found.warnings.append(f"{csv_path.name}: column(s) not in the clinical schema, not stored: "
                              f"{', '.join(table.ignored)}")
    listed: set[str] = set()
    for line, row in table.rows:
        file_cell = table.cell(row, "file") or ""
        rec, problems, skipped = record_from_csv(table, line, row, label_map,
                                                 folder_label=folder_label(file_cell.strip(), label_map, names),
                                                 names=names)
        if rec is not None:
            listed.add(rec.file)
            listed.update(rec.masks)
            if "mask" not in table.columns:
                rec.masks = masks.beside(rec.file)
                listed.update(rec.masks)
        if skipped:
            found.skipped += 1
        elif problems:
            found.problems += problems
        else:
            found.records.append(rec)
    if warning := unlisted_warning([f for f in images if f not in listed and f != csv_path.name], csv_path.name):
        found.warnings.append(warning)
    if not table.rows:
        raise IngestError(f"{csv_path} has a header but no rows; list one image per row")
    return found


def unlisted_warning(unlisted: list[str], csv_name: str) -> str | None:
    """The warning for image files in SRC that the CSV does not list (None when there are none)."""
    if not unlisted:
        return None
    shown = ", ".join(unlisted[:UNLISTED_SHOWN]) + (f", ... ({len(unlisted) - UNLISTED_SHOWN} more)"
                                                    if len(unlisted) > UNLISTED_SHOWN else "")
    return (f"{len(unlisted)} image file(s) in SRC are not listed in {csv_name} and were not ingested: {shown}; "
            "add rows for them or move them out of SRC")


def load(src: Path, rec: Record, limits: DecodeLimits = DEFAULT_LIMITS, **_) -> Loaded:
    return load_image_record(src, rec, limits)


