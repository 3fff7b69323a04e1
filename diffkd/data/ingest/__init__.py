"""`diffkd ingest`: bring one center's images (+ clinical CSV) into the Parquet dataset.

    report = ingest("exports/hospital_a", center="A", dataset="data/ds", layout="folder")
    reports = ingest_centers("BUSBRA", dataset="data/busbra", layout="busbra", center_by="device")

Steps: the layout finds records (``folder``, ``busi``, ``busbra``, ``dicom``); every image is decoded, converted
(common.py states the image, mask and clinical-value policies) and hashed; raw ids become salted
pseudonyms; then the whole batch is checked before anything is written:

- within the source: a file listed twice; one case id on images that disagree on patient, label or
  clinical values (a case may have several images, e.g. views or DICOM frames, but they describe one
  lesion); the same image (sha256) twice — an identical repeat is kept once (warning), copies with
  different labels or patients are an error (with a quarantine folder *every* copy is set aside,
  since nothing says which one is right);
- against the center already in the dataset: identical images are "already present" and skipped, so
  re-running an ingest changes nothing (not even the manifest); a stored case id on a new image that
  disagrees with it, or a stored image with a different label, is an error (``replace=True`` rebuilds
  the center from this source instead, and still writes nothing if the result is identical);
- against the other centers: a patient (same salted id) or an image already in another center is an
  error, because it would leak between internal and external splits.

Labels are read in the dataset's outcome names (``label_names``, e.g. ``("benign", "malignant")``;
DCIS/upgrade by default), stored in its manifest by the first ingest; an ingest naming other outcomes
is refused. The checks against the stored centers and the write run under the dataset's write lock,
so concurrent ingests into one dataset (of different centers) wait for each other instead of losing
a manifest entry or missing each other's patients; decoding, the slow part, runs before the lock.

Any problem stops the run with a message naming each file / CSV line / column, and the dataset is
left byte-for-byte as it was. Every per-file failure (unreadable, truncated, empty, over the pixel,
frame or size limits, a link out of SRC, a DICOM without a region to crop) is such a problem. With
``quarantine=DIR`` the rejected rows go to ``DIR/rejected-<center>.PHI.csv`` (the original CSV columns
plus ``rejected_reason``, raw ids included, so readable by the user only and refused inside the
dataset; fix them and ingest that file again) and the rest is ingested. Only the center's own partition and the manifest are
written (atomically); other centers' files are never touched. The manifest's source entry records
the source fingerprint, ingest time, row and label counts, and the salt fingerprint (never the salt).

`ingest_centers` splits one source by a CSV column (a site, a scanner) into one center per value: the
source is decoded once, every center goes through the checks above (and a patient whose rows fall in
two centers is a problem of its own), and only when all pass is each written as `ingest` writes one.

Memory does not grow with the source: each decoded image's bytes go to a spool file at once (spool.py)
and the checks work on the rows' metadata and digests; the partition is then written one row group at
a time, from the stored center's file (when adding to it) and from the spool.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from diffkd.data.dataset import DatasetError, ImageDataset, row_group_bounds, validate_center_name
from diffkd.data.ingest import busbra, busi, dicom, folder
from diffkd.data.ingest.common import (DEFAULT_LIMITS, DecodeLimits, Discovery, IngestError, Loaded, Problem,
                                       Pseudonymizer, Record, SaltFile, center_slug, load_all, parse_label_map,
                                       png_pixel_digest, salt_fingerprint)
from diffkd.data.ingest.spool import Blob, Spool
from diffkd.data.schema import CLINICAL_COLUMNS, CLINICAL_SCHEMA, arrow_schema, check_label_names
from diffkd.runtime.files import atomic_write_bytes

__all__ = ["ingest", "ingest_centers", "IngestReport", "CentersReport", "IngestError", "LAYOUTS",
           "DecodeLimits", "default_salt_path", "pseudonymizer_for", "quarantine_path", "salt_fingerprint"]

log = logging.getLogger("diffkd.ingest")

LAYOUTS = {folder.NAME: folder, busi.NAME: busi, busbra.NAME: busbra, dicom.NAME: dicom}
PROBLEMS_SHOWN = 20
WARNINGS_SHOWN = 10


@dataclass
class IngestReport:
    center: str
    layout: str
    source: str
    dataset: str
    found: int  # images the source yielded (after --label-map skips)
    added: int
    already_present: int  # identical images already in the center
    duplicates: int  # repeats within the source (kept once) or known under another case id
    quarantined: int  # rows/files set aside with reasons
    conflicting: int  # of those, copies of one image that disagree on label or patient (all copies set aside)
    skipped: int  # rows or images the label map leaves out
    labels_added: dict[str, int]
    center_rows: int
    written: bool
    fingerprint: str
    quarantine_file: str | None = None
    burned_in_allowed: int = 0  # DICOM files stored whole (no region to crop) because of --allow-burned-in
    warnings: list[str] = field(default_factory=list)
    seconds: float | None = None  # None when the center was one of several written by one run

    def summary(self) -> str:
        labels = ", ".join(f"{k} {v}" for k, v in self.labels_added.items()) or "none"
        lines = [
            f"center {self.center}: {self.added} image(s) added ({labels}); {self.center_rows} in the center now",
            f"  source {self.source} ({self.layout}), {self.found} image(s) found, fingerprint {self.fingerprint[:16]}",
        ]
        extra = [(self.already_present, "already present"), (self.duplicates, "duplicate(s) skipped"),
                 (self.skipped, "left out by --label-map"), (self.quarantined, "quarantined")]
        if self.conflicting:
            extra.append((self.conflicting, "of them copies of one image with different labels or patients "
                                            "(every copy set aside: nothing says which is right)"))
        if any(n for n, _ in extra):
            lines.append("  " + ", ".join(f"{n} {what}" for n, what in extra if n))
        if self.burned_in_allowed:
            lines.append(f"  {self.burned_in_allowed} DICOM file(s) stored uncropped under --allow-burned-in "
                         "(no ultrasound region): any text burned into their pixels is in the dataset")
        if self.quarantined:
            lines.append(f"  rejected rows and reasons: {self.quarantine_file} (holds raw patient ids and file names: "
                         "keep it where the source is)")
        took = f" in {self.seconds:.1f}s" if self.seconds is not None else ""
        lines.append(f"  {'written to' if self.written else 'nothing changed in'} {self.dataset}{took}")
        for w in self.warnings[:WARNINGS_SHOWN]:
            lines.append(f"  warning: {w}")
        if len(self.warnings) > WARNINGS_SHOWN:
            lines.append(f"  ... {len(self.warnings) - WARNINGS_SHOWN} more warning(s)")
        return "\n".join(lines)


# ---- salt ---------------------------------------------------------------------------------------

SALT_HOME = "diffkd/salts"  # under $XDG_CONFIG_HOME (default ~/.config): private to the user


def default_salt_path(dataset: ImageDataset) -> Path:
    """`~/.config/diffkd/salts/<dsname>-<digest of the dataset's location>.salt`: the user's own,
    never on the dataset's volume, which a cluster may share with every pod. A salt an earlier
    diffkd kept beside a local dataset (`<DS>/../.<dsname>.salt`) is still used where it is."""
    if dataset.fs.type_name == "local":
        legacy = Path(dataset.root).parent / f".{Path(dataset.root).name}.salt"
        if legacy.exists():
            log.warning("using the salt file %s beside the dataset; a shared dataset volume exposes it to "
                        "everyone who mounts it: move it to a private place and pass --salt-file", legacy)
            return legacy
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    where = hashlib.sha256(str(dataset.uri).encode()).hexdigest()[:12]
    name = Path(str(dataset.uri).rstrip("/")).name or "dataset"
    return config / SALT_HOME / f"{name}-{where}.salt"


def _open_salt(dataset: ImageDataset, salt) -> SaltFile:
    if isinstance(salt, (bytes, bytearray)):
        return SaltFile(None, bytes(salt), is_new=False)
    path = Path(salt).expanduser().absolute() if salt is not None else default_salt_path(dataset)
    if dataset.fs.type_name == "local" and path.is_relative_to(Path(dataset.root)):
        raise IngestError(f"salt file {path} is inside the dataset {dataset.root}; keep it outside "
                          "(anyone with the dataset and the salt could test guesses of patient ids)")
    salt_file = SaltFile.open(path)
    recorded = {s["salt_fingerprint"] for c in dataset.manifest["centers"].values()
                for s in c.get("sources", []) if s.get("salt_fingerprint")}
    if recorded and salt_file.fingerprint not in recorded:
        known = ", ".join(sorted(recorded))
        if salt_file.is_new:
            raise IngestError(f"dataset {dataset.uri} was pseudonymised with salt {known}, but the salt file {path} "
                              "does not exist; restore it or pass --salt-file pointing at it (a new salt would "
                              "give every patient new ids)")
        raise IngestError(f"salt file {path} (fingerprint {salt_file.fingerprint}) is not the salt dataset "
                          f"{dataset.uri} was built with ({known}); pass the right --salt-file")
    return salt_file


def pseudonymizer_for(dataset, salt=None) -> Pseudonymizer:
    """The pseudonymizer an existing dataset was built with (to map raw ids, e.g. of a readers CSV)."""
    ds = ImageDataset.open(dataset)
    salt_file = _open_salt(ds, salt)
    if salt_file.is_new:
        raise IngestError(f"no salt file at {salt_file.path}; pass the one the dataset was ingested with")
    return Pseudonymizer(salt_file.salt)


# ---- the batch ----------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One row to store, with the record it came from (rejections remove whole records)."""
    index: int  # record index
    row: dict  # `image` and `mask` are `Blob`s in the batch's spool
    pixels: str  # pixel digest (not stored)


def _candidates(center: str, layout: str, records: list[Record], loaded: list[Loaded | None],
                pseudo: Pseudonymizer) -> tuple[list[Candidate], list[Problem], list[str]]:
    out, problems, warnings = [], [], []
    for index, (rec, item) in enumerate(zip(records, loaded)):
        if item is None:
            continue
        for image in item.images:
            patient = rec.patient or image.patient
            if not patient:
                problems.append(rec.problem("no patient id: add a patient_id column to the CSV "
                                            "(the file's PatientID is empty)"))
                break
            suffix = f"#frame={image.frame}" if image.frame is not None else ""
            case_raw = rec.case or image.case or f"file:{rec.file}"  # frames of one file are one case
            spacing = rec.spacing_mm if rec.spacing_mm is not None else image.spacing_mm
            if rec.spacing_mm is not None and image.spacing_mm and abs(rec.spacing_mm / image.spacing_mm - 1) > 0.05:
                warnings.append(f"{rec.file}: CSV spacing {rec.spacing_mm:g} mm differs from the file's "
                                f"{image.spacing_mm:g} mm; the CSV value is stored")
            # file names often carry names or record numbers: only a salted hash of the path is stored
            path = pseudo.text(rec.file)
            note = f"|{rec.note}" if rec.note else ""
            patient_id = pseudo.own_patient(center, patient) if rec.own_patient else pseudo.patient(patient)
            row = dict(case_id=pseudo.case(center, case_raw), patient_id=patient_id,
                       center=center, modality=rec.modality or image.modality or "us", label=rec.label,
                       image=image.png, mask=image.mask, height=image.height, width=image.width,
                       spacing_mm=spacing, synthetic=False, source=f"{layout}:{path}{suffix}{note}",
                       sha256=image.png.sha256)
            row.update({name: rec.clinical.get(name) for name in CLINICAL_COLUMNS})
            for name in FLOAT_COLUMNS:  # as stored (float32), so that comparisons with stored rows hold
                row[name] = None if row[name] is None else float(np.float32(row[name]))
            out.append(Candidate(index, row, image.pixels))
    return out, problems, warnings


def _where(rec: Record) -> str:
    return f"line {rec.line} ({rec.file})" if rec.line is not None else rec.file


CASE_FIELDS = ("patient_id", "label", *CLINICAL_COLUMNS)  # what every image of one case must agree on
FLOAT_COLUMNS = ("spacing_mm", *(c.name for c in CLINICAL_SCHEMA if c.kind == "float"))


CONFLICT_HINT = ("copies of one image must agree on label and patient: keep the right copy (or fix its row) "
                 "and remove the other")


def _check_source(cands: list[Candidate], records: list[Record]
                  ) -> tuple[list[Problem], set[int], list[str], set[int]]:
    """File listed twice, one case id with disagreeing images, an image repeated.

    Several images may share a case id (one case, several views or frames); they must then agree on
    patient, label and clinical values. Returns problems, duplicate rows to drop, warnings, and the
    records that are copies of one image with different labels or patients.
    """
    problems, drop, warnings, conflicting = [], set(), [], set()
    first_line: dict[str, Record] = {}
    for rec in records:
        if rec.file in first_line:
            problems.append(rec.problem(f"{rec.file} is already listed on line {first_line[rec.file].line}; "
                                        "list each image once"))
        else:
            first_line[rec.file] = rec
    by_case: dict[str, int] = {}
    for i, c in enumerate(cands):
        first = by_case.setdefault(c.row["case_id"], i)
        a = cands[first]
        if first == i or a.index == c.index:
            continue
        differ = [f for f in CASE_FIELDS if a.row[f] != c.row[f]]
        if differ:
            ra, rb = records[a.index], records[c.index]
            what = "patient" if "patient_id" in differ else ", ".join(differ)
            for rec, other in ((ra, rb), (rb, ra)):
                problems.append(rec.problem(f"case id {rec.case!r} is also used by {_where(other)} with a different "
                                            f"{what}", "case_id", hint="images sharing a case id must agree on "
                                            "patient, label and clinical values: give distinct case ids or fix them"))
    by_pixels: dict[str, int] = {}
    for i, c in enumerate(cands):
        first = by_pixels.setdefault(c.pixels, i)
        if first == i:
            continue
        a, b = cands[first], c
        ra, rb = records[a.index], records[b.index]
        same_patient = a.row["patient_id"] == b.row["patient_id"] or ra.own_patient or rb.own_patient
        if a.row["label"] != b.row["label"] or not same_patient:
            what = "label" if a.row["label"] != b.row["label"] else "patient"
            for rec, other in ((ra, rb), (rb, ra)):  # nothing says which copy is right: both are rejected
                problems.append(rec.problem(f"the same image as {_where(other)} but with a different {what}",
                                            hint=CONFLICT_HINT))
            conflicting |= {a.index, b.index}
        else:
            drop.add(i)
            warnings.append(f"{_where(rb)}: the same image as {_where(ra)}; stored once")
    return problems, drop, warnings, conflicting


def _check_existing(cands: list[Candidate], records: list[Record], ds: ImageDataset, center: str,
                    existing: pa.Table | None, keep: list[int], names: tuple[str, str]
                    ) -> tuple[list[Problem], set[int], set[int], list[str]]:
    """Against the center already stored: (problems, already present, duplicates under another id, warnings).

    A stored image is recognised by its bytes, or — when an earlier diffkd encoded it differently —
    by its pixels (only the stored images of the same case ids are decoded for that). A new image
    may join a stored case only if it agrees with it on patient, label and clinical values.
    `existing`: the stored center's metadata (`ImageDataset.metadata`).
    """
    problems, present, dups, warnings = [], set(), set(), []
    if existing is None or existing.num_rows == 0:
        return problems, present, dups, warnings
    old = existing.select(["case_id", "sha256", *CASE_FIELDS]).to_pylist()
    by_sha = {r["sha256"]: r for r in old}
    rows_of_case: dict[str, list[int]] = defaultdict(list)
    for j, r in enumerate(old):
        rows_of_case[r["case_id"]].append(j)
    unmatched = {cands[i].row["case_id"] for i in keep if cands[i].row["sha256"] not in by_sha}
    by_pixels = _stored_pixels(ds, center, unmatched & rows_of_case.keys())
    changed = 0
    for i in keep:
        row, rec = cands[i].row, records[cands[i].index]
        known = by_sha.get(row["sha256"]) or by_pixels.get(cands[i].pixels)
        if known is not None:
            if known["label"] != row["label"]:
                problems.append(rec.problem(f"this image is already in the center with label "
                                            f"{names[known['label']]}; to change labels re-ingest with --replace",
                                            "label"))
            elif known["case_id"] == row["case_id"]:
                present.add(i)
                changed += any(known[f] != row[f] for f in CASE_FIELDS)
            else:
                dups.add(i)
                warnings.append(f"{_where(rec)}: the same image is already in the center under another case id; "
                                "skipped")
            continue
        case = old[rows_of_case[row["case_id"]][0]] if row["case_id"] in rows_of_case else None
        differ = [f for f in CASE_FIELDS if case is not None and case[f] != row[f]]
        if differ:
            what = "patient" if "patient_id" in differ else ", ".join(differ)
            problems.append(rec.problem(f"case id {rec.case!r} is already in the center with a different {what}",
                                        "case_id", hint="give new images of a stored case the stored values, "
                                        "give a new case id, or rebuild the center with --replace"))
    if changed:
        warnings.append(f"{changed} image(s) already in the center carry other patient or clinical values in this "
                        "source; the stored values were kept (rebuild the center with --replace to apply them)")
    return problems, present, dups, warnings


def _stored_pixels(ds: ImageDataset, center: str, cases: set[str]) -> dict[str, dict]:
    """Pixel digest -> stored row (case id, sha256, CASE_FIELDS) of the stored images of `cases`,
    read one row group at a time."""
    by_pixels: dict[str, dict] = {}
    if not cases:
        return by_pixels
    columns = ["case_id", "sha256", *CASE_FIELDS]
    wanted = pa.array(sorted(cases), pa.string())
    for table in ds.iter_center(center, [*columns, "image"]):
        table = table.filter(pc.is_in(table.column("case_id"), value_set=wanted))
        for row, png in zip(table.select(columns).to_pylist(), table.column("image").to_pylist()):
            by_pixels[png_pixel_digest(png)] = row
    return by_pixels


def _check_other_centers(cands: list[Candidate], records: list[Record], dataset: ImageDataset, center: str,
                         keep: list[int]) -> list[Problem]:
    others = [c for c in dataset.centers() if c != center]
    if not others or not keep:
        return []
    table = dataset.read_table(others, columns=["patient_id", "center", "sha256"]).to_pylist()
    patient_center = {r["patient_id"]: r["center"] for r in table}
    image_center = {r["sha256"]: r["center"] for r in table}
    problems = []
    for i in keep:
        row, rec = cands[i].row, records[cands[i].index]
        if row["patient_id"] in patient_center:
            problems.append(rec.problem(
                f"this patient (pseudonym {row['patient_id']}) is already in center {patient_center[row['patient_id']]}",
                "patient_id", hint="a patient must belong to one center, or internal/external splits would leak: "
                "ingest each patient under one center only (check that the right salt and patient ids are used)"))
        elif row["sha256"] in image_center:
            problems.append(rec.problem(f"the same image is already in center {image_center[row['sha256']]}",
                                        hint="an image may belong to one center only: remove the copies"))
    return problems


def _format_problems(problems: list[Problem], src: Path, center: str, n_bad: int) -> str:
    shown = "\n".join(f"  - {p}" for p in problems[:PROBLEMS_SHOWN])
    more = f"\n  ... and {len(problems) - PROBLEMS_SHOWN} more" if len(problems) > PROBLEMS_SHOWN else ""
    hints = "".join(f"\n  * {h}" for h in dict.fromkeys(p.hint for p in problems if p.hint))
    return (f"ingest of {src} into center {center} refused: {len(problems)} problem(s) in {n_bad} row(s)/file(s); "
            f"nothing was written.\n{shown}{more}" + (f"\nWhat to do:{hints}" if hints else "")
            + "\nFix them, or pass --quarantine DIR to set these rows aside (with reasons) and ingest the rest.")


QUARANTINE_NOTE = ("holds raw patient identifiers and file names from the source (not pseudonymised); "
                   "keep it with the source data, never with the dataset or results")


def quarantine_path(directory: Path, center: str) -> Path:
    """`DIR/rejected-<center>.PHI.csv`: the name says the file holds identifiers."""
    return directory / f"rejected-{center}.PHI.csv"


def _write_quarantine(directory: Path, center: str, problems: list[Problem], found: Discovery) -> Path:
    """DIR/rejected-<center>.PHI.csv: the rejected rows as they were (CSV columns) plus the reasons.

    Readable by the user only (0600): it holds the raw ids and file names the dataset never stores."""
    header = list(found.csv_header) or ["file"]
    file_column = found.csv_file_column or "file"
    if file_column not in header:
        header.insert(0, file_column)
    grouped: dict[tuple, list[str]] = defaultdict(list)
    for p in problems:
        grouped[(p.line, p.file)].append(f"{p.column}: {p.message}" if p.column else p.message)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*header, "rejected_reason"], extrasaction="ignore")
    writer.writeheader()
    for (line, file), reasons in sorted(grouped.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or "")):
        row = dict(found.csv_rows.get(line, {})) if line is not None else {}
        row.setdefault(file_column, file or "")
        writer.writerow({**row, "rejected_reason": " | ".join(reasons)})
    path = quarantine_path(directory, center)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8", "surrogateescape"), mode=0o600)  # names as on disk
    log.warning("%s %s", path, QUARANTINE_NOTE)
    return path


def _check_quarantine_place(quarantine, ds: ImageDataset) -> Path | None:
    if quarantine is None:
        return None
    directory = Path(quarantine).expanduser().absolute()
    if ds.fs.type_name == "local" and directory.is_relative_to(Path(ds.root)):
        raise IngestError(f"quarantine folder {directory} is inside the dataset {ds.root}; the quarantine file "
                          f"{QUARANTINE_NOTE}: put it beside the source instead")
    return directory


def _fingerprint(layout: str, records: list[Record], loaded: list[Loaded | None], found: Discovery,
                 frames: str) -> str:
    h = hashlib.sha256(f"{layout}\0{frames}\0{found.csv_digest or ''}\n".encode())
    for rec, item in sorted(zip(records, loaded), key=lambda pair: pair[0].file):
        h.update(f"{rec.file}\t{item.digest if item else 'unreadable'}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


METADATA_SCHEMA = pa.schema([f for f in arrow_schema() if f.name not in ("image", "mask")])


def _same_rows(ds: ImageDataset, center: str, stored_rows: int, new_rows: list[dict]) -> bool:
    """Whether the stored center holds exactly `new_rows`, in the same order within each case id
    (a --replace that would change nothing). Rows are compared by their stored values, the image and
    mask by sha256; the stored side is read one row group at a time."""
    if stored_rows != len(new_rows):
        return False
    metadata = pa.Table.from_pylist([{k: r[k] for k in METADATA_SCHEMA.names} for r in new_rows],
                                    schema=METADATA_SCHEMA).to_pylist()
    new = [_row_key(m, r["image"].sha256, r["mask"].sha256 if r["mask"] is not None else None)
           for m, r in zip(metadata, new_rows)]
    stored = []
    for table in ds.iter_center(center):
        images, masks = table.column("image").to_pylist(), table.column("mask").to_pylist()
        for m, image, mask in zip(table.select(METADATA_SCHEMA.names).to_pylist(), images, masks):
            stored.append(_row_key(m, _sha256(image), _sha256(mask)))
    by_case = partial(sorted, key=lambda key: key[0])  # stable: the order within a case counts
    return by_case(stored) == by_case(new)


def _row_key(metadata: dict, image_sha256: str, mask_sha256: str | None) -> tuple:
    return (metadata["case_id"], tuple(metadata[k] for k in METADATA_SCHEMA.names), image_sha256, mask_sha256)


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


@dataclass
class Options:
    """What an ingest was asked to do besides the source and the center(s)."""
    layout: str = "folder"
    clinical_csv: object = None
    quarantine: object = None
    label_map: object = None
    salt: object = None
    replace: bool = False
    frames: str = "all"
    workers: int | None = None
    label_names: tuple[str, str] | str | None = None
    allow_burned_in: bool = False
    limits: DecodeLimits = DEFAULT_LIMITS


def ingest(src, center: str, dataset, layout: str = "folder", clinical_csv=None, quarantine=None,
           label_map=None, salt=None, *, replace: bool = False, frames: str = "all",
           workers: int | None = None, label_names: tuple[str, str] | str | None = None,
           allow_burned_in: bool = False, limits: DecodeLimits = DEFAULT_LIMITS) -> IngestReport:
    """Ingest SRC as center `center` of `dataset` (path, URI or ImageDataset); see the module docstring.

    label_map: "benign=0,malignant=1,normal=skip" or a dict; salt: the salt file path (default
    `<DS>/../.<dsname>.salt`) or the salt bytes; quarantine: a folder for rejected rows; replace: rebuild
    the center from this source instead of adding to it; frames: DICOM multi-frame policy (all|middle|first);
    label_names: the outcomes' names, label 0 then label 1 ("benign,malignant"; default: the dataset's,
    else the layout's (busbra: benign,malignant), else DCIS,upgrade for a new dataset); allow_burned_in: store
    DICOM files that have no ultrasound region to crop (their burned-in text too); limits: the pixel, frame and
    file-size limits checked before decoding.
    """
    start = time.monotonic()
    validate_center_name(center)
    opts = Options(layout, clinical_csv, quarantine, label_map, salt, replace, frames, workers, label_names,
                   allow_burned_in, limits)
    batch = _read_source(src, dataset, opts)
    # from here to the write, no other writer changes what the checks read
    with batch.spool, batch.ds.lock():
        batch.ds.recover()  # finish or roll back what an interrupted write left, even if this ingest writes nothing
        batch.check_label_names()
        salt_file = _open_salt(batch.ds, salt)
        plan = _check(batch, center, batch.found, batch.loaded, batch.problems, salt_file)
        _write(batch.ds, plan, batch.names, batch.spool)
    plan.report.seconds = time.monotonic() - start
    return plan.report


@dataclass
class CentersReport:
    """One ingest that wrote one center per distinct value of a column (`ingest_centers`)."""
    source: str
    layout: str
    column: str
    values: dict[str, dict[str, int]]  # center -> {column value: images}
    reports: list[IngestReport]
    skipped: int
    warnings: list[str]
    quarantine_file: str | None = None  # rows without a center, with reasons
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"source {self.source} ({self.layout}): {len(self.reports)} center(s), one per {self.column}:"]
        for center, values in self.values.items():
            lines.append(f"  {center}: " + ", ".join(f"{v!r} ({n})" for v, n in values.items()))
        lines += [r.summary() for r in self.reports]
        if self.skipped:
            lines.append(f"{self.skipped} row(s) left out by --label-map")
        if self.quarantine_file:
            lines.append(f"rows without a center, with reasons: {self.quarantine_file}")
        lines += [f"warning: {w}" for w in self.warnings[:WARNINGS_SHOWN]]
        if len(self.warnings) > WARNINGS_SHOWN:
            lines.append(f"... {len(self.warnings) - WARNINGS_SHOWN} more warning(s)")
        lines.append(f"{sum(r.added for r in self.reports)} image(s) added in {self.seconds:.1f}s")
        return "\n".join(lines)


def ingest_centers(src, dataset, layout: str = "folder", *, center_column: str | None = None,
                   center_by: str | None = None, clinical_csv=None, quarantine=None, label_map=None, salt=None,
                   replace: bool = False, frames: str = "all", workers: int | None = None,
                   label_names: tuple[str, str] | str | None = None, allow_burned_in: bool = False,
                   limits: DecodeLimits = DEFAULT_LIMITS) -> CentersReport:
    """Ingest SRC as one center per distinct value of a CSV column, in one run.

    center_column: a column of the source's CSV (matched case-insensitively); each value becomes a
    center named by `common.center_slug` ('Hospital A' -> hospital_a). center_by: a grouping the layout
    names, with its own naming rule (busbra: ``device`` -> one center per scanner, `busbra.scanner_center_name`).
    Values that give one name share that center. A patient whose images fall in two centers, or a row
    without a value, is a problem like any other (quarantined with `quarantine`). Every center is checked
    before any is written; each is then written as `ingest` writes one (its partition and the manifest).
    Other arguments as for `ingest`.
    """
    start = time.monotonic()
    opts = Options(layout, clinical_csv, quarantine, label_map, salt, replace, frames, workers, label_names,
                   allow_burned_in, limits)
    column, name_rule = _grouping(layout, center_column, center_by)
    batch = _read_source(src, dataset, opts)
    with batch.spool:
        groups, unassigned, notes = _split_by_column(batch, column, name_rule)
        quarantine_file = None
        if unassigned:
            if quarantine is None:
                raise IngestError(_format_problems(unassigned, batch.src, f"one per {column}", len(unassigned)))
            quarantine_file = _write_quarantine(opts.quarantine, "without-center", unassigned, batch.found)
        with batch.ds.lock():
            batch.ds.recover()
            batch.check_label_names()
            salt_file = _open_salt(batch.ds, salt)
            plans = [_check(batch, center, group.found, group.loaded, group.problems, salt_file,
                            entry_extra={"center_column": column, "center_values": group.values})
                     for center, group in groups.items()]  # any problem in any center: nothing is written
            for plan in plans:
                _write(batch.ds, plan, batch.names, batch.spool)
    return CentersReport(source=str(batch.src), layout=layout, column=column,
                         values={c: g.values for c, g in groups.items()}, reports=[p.report for p in plans],
                         skipped=batch.found.skipped, warnings=batch.found.warnings + notes,
                         quarantine_file=str(quarantine_file) if quarantine_file else None,
                         seconds=time.monotonic() - start)


def _grouping(layout: str, center_column: str | None, center_by: str | None):
    """(CSV column, center-name rule) for `ingest_centers`."""
    if (center_column is None) == (center_by is None):
        raise IngestError("give one of center_column (--center-column COL) or center_by (--center-by NAME)")
    if center_column is not None:
        return center_column, center_slug
    choices = getattr(LAYOUTS.get(layout), "CENTER_BY", {})
    if center_by not in choices:
        offered = f"it offers {', '.join(choices)}" if choices else "it offers none"
        raise IngestError(f"--center-by {center_by}: the {layout} layout has no such grouping ({offered}); "
                          "--center-column COL makes one center per value of a CSV column")
    return choices[center_by]


@dataclass
class _Batch:
    """A source read and decoded, before the checks against the dataset."""
    ds: ImageDataset
    src: Path
    opts: Options
    names: tuple[str, str]
    found: Discovery
    loaded: list[Loaded | None]  # images and masks as `Blob`s in `spool`
    problems: list[Problem]  # the layout's and the decoder's
    spool: Spool  # the decoded images' bytes until they are written; close it when done

    def check_label_names(self) -> None:
        """Under the lock: a concurrent ingest may have named the outcomes since the source was read."""
        if _claim_label_names(self.ds, self.opts.label_names) != self.names:
            raise IngestError(f"dataset {self.ds.uri} was given other outcome names by a concurrent ingest "
                              f"({','.join(self.ds.label_names)}); run this ingest again")


def _read_source(src, dataset, opts: Options) -> _Batch:
    """Find and decode the source's images (the slow part, before the dataset's lock)."""
    if opts.layout not in LAYOUTS:
        raise IngestError(f"unknown layout {opts.layout!r}; choose one of {', '.join(LAYOUTS)}")
    module = LAYOUTS[opts.layout]
    if opts.label_names is None:  # a layout that knows its outcomes (busbra) names a new dataset's
        opts.label_names = getattr(module, "LABEL_NAMES", None)
    ds = ImageDataset.open(dataset)
    src = Path(src).expanduser()
    if not src.is_dir():
        raise IngestError(f"source folder {src} does not exist or is not a folder")
    opts.quarantine = _check_quarantine_place(opts.quarantine, ds)
    names = _claim_label_names(ds, opts.label_names)  # refused here already, before the slow decoding
    label_map = parse_label_map(opts.label_map, names)
    found = module.discover(src, clinical_csv=opts.clinical_csv, label_map=label_map, frames=opts.frames,
                            label_names=names)
    if not found.records and not found.problems:
        skipped = f" ({found.skipped} left out by --label-map)" if found.skipped else ""
        raise IngestError(f"{src}: no images found for the {opts.layout} layout{skipped}; check the folder and "
                          "--layout (folder: SRC/<label>/*.png or a CSV listing files; busi: class folders; "
                          "busbra: bus_data.csv with Images/ and Masks/; dicom: .dcm files)")
    spool = Spool(_spool_place(ds))
    try:
        loaded, problems = load_all(partial(module.load, frames=opts.frames, allow_burned_in=opts.allow_burned_in,
                                            limits=opts.limits), src, found.records, spool=spool,
                                    workers=opts.workers)
    except BaseException:
        spool.close()
        raise
    return _Batch(ds, src, opts, names, found, loaded, found.problems + problems, spool)


def _spool_place(ds: ImageDataset) -> str | None:
    """Where the decoded images wait: beside a local dataset (the disk that will hold them, where
    the dataset's lock file goes too), else the temporary directory."""
    if ds.fs.type_name == "local":
        parent = os.path.dirname(ds.root.rstrip("/"))
        if os.path.isdir(parent):
            return parent
    return None


@dataclass
class _Group:
    """The part of a source that goes to one center."""
    found: Discovery
    loaded: list[Loaded | None] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    values: dict[str, int] = field(default_factory=dict)  # column value -> images


def _split_by_column(batch: _Batch, column: str, name_rule) -> tuple[dict[str, _Group], list[Problem], list[str]]:
    """The batch's records, problems and CSV rows by center; problems of rows that have no center."""
    found = batch.found
    if found.csv_path is None:
        raise IngestError(f"--center-column {column}: {batch.src} has no CSV to read it from; give --clinical CSV "
                          "(or SRC/clinical.csv) with that column")
    header = {h.strip().lower(): h for h in found.csv_header}.get(column.strip().lower())
    if header is None:
        raise IngestError(f"{found.csv_path}: no column {column!r} to make centers from; its columns are "
                          f"{', '.join(found.csv_header)}")
    center_of_line: dict[int, str] = {}
    unassigned: list[Problem] = []
    notes: list[str] = []
    names_of: dict[str, set[str]] = defaultdict(set)
    for line, row in found.csv_rows.items():
        value = (row.get(header) or "").strip()
        name = name_rule(value) if value else ""
        try:
            validate_center_name(name)
        except DatasetError:
            why = "is empty" if not value else f"{value!r} gives no usable center name"
            unassigned.append(Problem(f"the {header} cell {why}; every row needs the {header} its center is "
                                      "named after", line=line, column=header))
            continue
        center_of_line[line] = name
        names_of[name].add(value)
    notes += [f"{header} values {', '.join(map(repr, sorted(v)))} all go to center {c}"
              for c, v in sorted(names_of.items()) if len(v) > 1]
    groups = {c: _Group(dataclasses.replace(found, records=[], problems=[], warnings=[], skipped=0))
              for c in sorted(names_of)}
    for p in batch.problems:
        if p.line in center_of_line:
            groups[center_of_line[p.line]].problems.append(p)
        elif p.line not in found.csv_rows:
            unassigned.append(p)  # a problem of the source as a whole (rows without a center are already listed)
    patient_centers: dict[str, set[str]] = defaultdict(set)
    for rec in found.records:
        if rec.patient and not rec.own_patient and rec.line in center_of_line:
            patient_centers[rec.patient].add(center_of_line[rec.line])
    for rec, item in zip(found.records, batch.loaded):
        center = center_of_line.get(rec.line)
        if center is None:
            continue
        group = groups[center]
        group.found.records.append(rec)
        group.loaded.append(item)
        value = found.csv_rows[rec.line][header].strip()
        group.values[value] = group.values.get(value, 0) + 1
        elsewhere = sorted(patient_centers.get(rec.patient, set()) - {center})
        if elsewhere:
            group.problems.append(rec.problem(f"this patient also has images in center(s) {', '.join(elsewhere)} "
                                              f"(by {header}); a patient must belong to one center",
                                              hint="a patient in two centers would leak between internal and "
                                              "external splits: give the patient's rows one value"))
    return groups, unassigned, notes


def _claim_label_names(ds: ImageDataset, label_names) -> tuple[str, str]:
    try:
        return ds.claim_label_names(None if label_names is None else check_label_names(label_names))
    except (DatasetError, ValueError) as err:
        raise IngestError(str(err)) from None


@dataclass
class _Plan:
    """What the checks decided for one center: its new rows to write (None: nothing changes)."""
    center: str
    report: IngestReport
    rows: list[dict] | None  # images and masks as `Blob`s in the batch's spool
    entry: dict | None
    salt_file: SaltFile
    keep_stored: bool = False  # adding to the center: its stored rows are written first
    center_rows: int = 0  # rows in the center once written


def _check(batch: _Batch, center: str, found: Discovery, loaded: list[Loaded | None], problems: list[Problem],
           salt_file: SaltFile, entry_extra: dict | None = None) -> _Plan:
    """Pseudonymise, check one center's records against themselves and the stored centers (under the lock)."""
    ds, src, opts, names = batch.ds, batch.src, batch.opts, batch.names
    layout, replace, quarantine = opts.layout, opts.replace, opts.quarantine
    pseudo = Pseudonymizer(salt_file.salt)
    records = found.records
    problems = list(problems)
    warnings = list(found.warnings)
    cands, more, notes = _candidates(center, layout, records, loaded, pseudo)
    problems += more
    warnings += notes
    more, dup_rows, notes, conflicting = _check_source(cands, records)
    problems += more
    warnings += notes

    existing = ds.metadata([center]) if center in ds.centers() else None
    keep = [i for i in range(len(cands)) if i not in dup_rows]
    present: set[int] = set()
    if not replace:
        more, present, dups, notes = _check_existing(cands, records, ds, center, existing, keep, names)
        problems += more
        warnings += notes
        dup_rows |= dups
        keep = [i for i in keep if i not in present and i not in dups]
    problems += _check_other_centers(cands, records, ds, center, keep)

    bad_records = {(p.line, p.file) for p in problems}
    if problems and quarantine is None:
        raise IngestError(_format_problems(problems, src, center, len(bad_records)))
    # written even when empty, so that a stale file from an earlier run cannot mislead
    quarantine_file = _write_quarantine(quarantine, center, problems, found) if quarantine else None
    if problems:
        log.warning("%d row(s)/file(s) rejected; reasons in %s", len(bad_records), quarantine_file)
    rejected = {i for i, rec in enumerate(records) if (rec.line, rec.file) in bad_records}
    new_rows = [cands[i].row for i in keep if cands[i].index not in rejected]
    if not new_rows and not present:
        raise IngestError(f"nothing left to ingest from {src} into center {center}: every image was rejected"
                          + (f" (reasons in {quarantine_file})" if quarantine_file else ""))

    keep_stored = not replace and existing is not None
    unchanged = (_same_rows(ds, center, existing.num_rows, new_rows) if replace and existing is not None
                 else not new_rows)
    labels = Counter(names[r["label"]] for r in new_rows)
    fingerprint = _fingerprint(layout, records, loaded, found, opts.frames)
    report = IngestReport(
        center=center, layout=layout, source=str(src), dataset=str(ds.uri), found=len(cands), added=0,
        already_present=len(present), duplicates=len(dup_rows), quarantined=len(bad_records),
        conflicting=len(conflicting), skipped=found.skipped, labels_added={},
        center_rows=existing.num_rows if existing is not None else 0, written=False, fingerprint=fingerprint,
        quarantine_file=str(quarantine_file) if quarantine_file else None, warnings=warnings,
        burned_in_allowed=sum(1 for i, item in enumerate(loaded) if item is not None and item.burned_in_allowed
                              and i not in rejected))
    if unchanged:
        return _Plan(center, report, None, None, salt_file)
    entry = dict(layout=layout, path=pseudo.text(str(src.absolute())),
                 clinical_csv=pseudo.text(found.csv_path.name) if found.csv_path else None, fingerprint=fingerprint, ingested=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 rows_in_source=len(cands), rows_added=len(new_rows), labels_added=dict(sorted(labels.items())),
                 already_present=len(present), duplicates=len(dup_rows), quarantined=len(bad_records),
                 conflicting=len(conflicting), replace=replace, frames=opts.frames if layout == "dicom" else None,
                 salt_fingerprint=salt_file.fingerprint, **(entry_extra or {}))
    report.added = len(new_rows)
    report.labels_added = dict(sorted(labels.items()))
    center_rows = len(new_rows) + (existing.num_rows if keep_stored else 0)
    return _Plan(center, report, new_rows, entry, salt_file, keep_stored, center_rows)


def _write(ds: ImageDataset, plan: _Plan, names: tuple[str, str], spool: Spool) -> None:
    """Write one checked center: its partition and its manifest entry (`ImageDataset.write_center`)."""
    if plan.rows is None:
        return
    plan.salt_file.persist()
    ds.write_center(plan.center, _center_rows(ds, plan, spool), sources=[plan.entry], label_names=names)
    plan.report.written = True
    plan.report.center_rows = plan.center_rows


def _center_rows(ds: ImageDataset, plan: _Plan, spool: Spool) -> Iterator[pa.Table]:
    """The center's rows as they are written, a piece at a time: the stored ones first when adding to
    the center, then the new ones, their bytes read back from the spool one row group at a time."""
    if plan.keep_stored:
        yield from ds.iter_center(plan.center)
    sizes = (row["image"].length + (row["mask"].length if row["mask"] is not None else 0) for row in plan.rows)
    for start, stop in row_group_bounds(sizes):
        yield _from_spool(plan.rows[start:stop], spool)


def _from_spool(rows: list[dict], spool: Spool) -> pa.Table:
    def read(blob: Blob | None) -> bytes | None:
        return None if blob is None else spool.get(blob)

    return pa.Table.from_pylist([{**r, "image": read(r["image"]), "mask": read(r["mask"])} for r in rows],
                                schema=arrow_schema())
