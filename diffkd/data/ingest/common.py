"""What every importer shares: records, CSV reading, clinical validation, image conversion, pseudonyms.

Policies (the user's guide repeats them):

- **Images** are stored as PNG, gray, at their original size: 8-bit gray as is; 16-bit gray stays
  16-bit; 1-bit becomes 0/255; palette images are expanded first; RGB (and CMYK/YCbCr) become gray by
  ITU-R 601-2 luminance (L = 0.299 R + 0.587 G + 0.114 B, Pillow's conversion); RGBA/LA/PA are accepted
  only when fully opaque (the alpha channel is dropped) and refused otherwise, because flattening onto
  a background is a choice the user must make; 32-bit integer images are accepted when their values
  fit 0..65535, float images and multi-page files are refused. Unreadable or truncated files are errors.
- **Masks** are binarised (values > 0 when the mask holds only 0/1, else > half its maximum, which
  survives JPEG noise) and stored as 0/255 PNG; several masks for one image are OR-merged; a mask whose
  size differs from its image's is an error.
- **Clinical values**: an empty cell, NaN, NA, N/A or None is stored as null (missing); a number
  outside the range CLINICAL_SCHEMA declares, an unparseable number or an unknown category is an error
  naming the CSV line and column (or, with a quarantine folder, that row is set aside with the reason).
  BI-RADS spellings (4A, 4a, BI-RADS 4c, 4) are normalised by `schema.normalize_birads`. CSV columns the
  schema does not know are ignored (and named in a warning), so free-text or identifying columns
  never reach the dataset.
- **Pseudonyms**: patient ids are HMAC-SHA256(salt, raw id), the same at every center so that one
  person ingested under two centers is caught; an image without a patient id (BUSI, a folder without a
  CSV) is its own patient within its center, HMAC-SHA256(salt, center + file). Case ids are
  HMAC-SHA256(salt, center + the CSV case id, or center + the source file); the stored `source` is a
  hash of the file's path, since file names often carry names or record numbers. The salt is a random
  32-byte secret in a file outside the dataset (default `~/.config/diffkd/salts/<dsname>-<digest>.salt`,
  private to the user, created once with mode 0600; a salt file other users can read is refused); only
  its fingerprint is recorded in the manifest, so the same salt must be used for every ingest into one
  dataset.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import logging
import math
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from diffkd.data.ingest.spool import Blob, FileBytes, Spool
from diffkd.data.schema import (CLINICAL_SCHEMA, DEFAULT_LABEL_NAMES, MODALITIES, ClinicalColumn, label_aliases,
                                normalize_birads, parse_label)

log = logging.getLogger("diffkd.ingest")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
MASK_NAME = re.compile(r"^(?P<stem>.+)_mask(_\d+)?$", re.IGNORECASE)
MISSING_TEXT = {"", "nan", "na", "n/a", "none", "null", "missing", "?", "-"}
TRUE_TEXT = {"1", "true", "t", "yes", "y", "present", "positive", "+"}
FALSE_TEXT = {"0", "false", "f", "no", "n", "absent", "negative"}
MODALITY_ALIASES = {"us": "us", "ultrasound": "us", "b-mode": "us", "bmode": "us", "us_doppler": "us_doppler",
                    "doppler": "us_doppler", "mammo": "mammo", "mg": "mammo", "mammography": "mammo"}
SPACING_RANGE_MM = (0.001, 5.0)

# CSV headers for the non-clinical fields, after `_header_key` normalisation.
BASE_ALIASES: dict[str, tuple[str, ...]] = {
    "file": ("file", "filename", "file_name", "image", "image_file", "image_filename", "image_path", "path"),
    "patient_id": ("patient_id", "patient", "patientid", "mrn", "subject_id", "subject"),
    "case_id": ("case_id", "caseid", "image_id", "lesion_id"),
    "label": ("label", "class", "outcome", "upgrade", "pathology", "classification", "diagnosis"),
    "mask": ("mask", "mask_file", "mask_filename", "mask_path", "mask_tumor_filename", "segmentation"),
    "modality": ("modality",),
    "spacing_mm": ("spacing_mm", "spacing", "pixel_spacing", "pixel_spacing_mm", "pixel_size", "pixel_size_mm"),
}


class IngestError(ValueError):
    """Bad input the user can fix; the message names the file, line or field and what to do."""


class ImageProblem(ValueError):
    """One source file cannot be turned into a stored image (message says why and what to do)."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one source file may hold, checked from its header before any pixel is decoded.

    A decoder's memory is a few times `max_pixels` bytes (16-bit pixels, a copy or two), and at most
    `workers` files decode at once, so an ingest's decoding memory is bounded by about
    workers x max_pixels x 8 bytes (4 x 100 MP: ~3 GiB). Raise the limits for very large mammograms.
    """
    max_pixels: int = 100_000_000  # per frame (rows x columns); a 5000 x 6000 mammogram is 30 MP
    max_frames: int = 1_000  # per DICOM file (cine loops)
    max_file_bytes: int = 2 << 30

    def check(self, name: str, width: int, height: int, frames: int = 1) -> None:
        if width <= 0 or height <= 0:
            raise ImageProblem(f"{name}: the header gives an empty image ({width}x{height})")
        if width * height > self.max_pixels:
            raise ImageProblem(f"{name}: {width}x{height} pixels ({width * height / 1e6:.0f} MP) exceed the limit of "
                               f"{self.max_pixels / 1e6:g} MP (a decompression bomb, or a very large image): "
                               "check the file, or raise --max-pixels")
        if frames > self.max_frames:
            raise ImageProblem(f"{name}: {frames} frames exceed the limit of {self.max_frames}; "
                               "check the file, or raise --max-frames")


DEFAULT_LIMITS = DecodeLimits()
DEFAULT_WORKERS = 4  # decodes at once: bounds the memory decoding takes (see DecodeLimits)


@dataclass(frozen=True)
class Problem:
    """Why one source row or file is rejected."""
    message: str
    file: str | None = None
    line: int | None = None  # CSV line number, the header being line 1 (as a spreadsheet shows it)
    column: str | None = None
    hint: str | None = None  # what to do; shown once however many rows share it

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.file:
            where.append(self.file if not where else f"({self.file})")
        if self.column:
            where.append(f"column {self.column!r}")
        return f"{' '.join(where)}: {self.message}" if where else self.message


@dataclass
class Record:
    """One source image file as a layout found it, before decoding; raw ids are hashed later."""
    file: str  # posix path relative to SRC
    label: int | None = None
    patient: str | None = None  # raw patient id (never stored)
    own_patient: bool = False  # no patient id known: the image stands for its own patient
    case: str | None = None  # raw case id (never stored)
    masks: tuple[str, ...] = ()
    modality: str | None = None
    spacing_mm: float | None = None
    clinical: dict = field(default_factory=dict)
    line: int | None = None
    raw: dict | None = None  # the CSV row as read, for the quarantine file
    note: str | None = None  # what the layout keeps of the source besides the file, e.g. the scanner

    def problem(self, message: str, column: str | None = None, hint: str | None = None) -> Problem:
        return Problem(message, file=self.file, line=self.line, column=column, hint=hint)


def pixel_digest(arr: np.ndarray) -> str:
    """sha256 of the pixels themselves (dtype, shape, values): equal for equal images however encoded."""
    digest = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    digest.update(np.ascontiguousarray(arr).data)  # hashed in place: no copy of the pixels
    return digest.hexdigest()


def png_pixel_digest(png: bytes) -> str:
    return pixel_digest(np.asarray(Image.open(io.BytesIO(png))))


@dataclass
class Decoded:
    """One image to store, made from a record (a multi-frame DICOM gives several).

    A loader gives the PNG and mask bytes; `load_all` moves them to its spool and leaves their `Blob`s."""
    png: bytes | FileBytes | Blob
    height: int
    width: int
    pixels: str  # pixel_digest of the stored image: duplicates are found by pixels, not by encoding
    mask: bytes | FileBytes | Blob | None = None
    spacing_mm: float | None = None
    frame: int | None = None  # frame index when the file held several
    patient: str | None = None  # raw id read from the file itself (DICOM PatientID)
    case: str | None = None  # raw per-image id read from the file (DICOM SOPInstanceUID)
    modality: str | None = None


@dataclass
class Loaded:
    images: list[Decoded]
    digest: str  # sha256 of the source file bytes, for the source fingerprint
    burned_in_allowed: bool = False  # a DICOM stored whole, without a region to crop, under --allow-burned-in


@dataclass
class Discovery:
    """What a layout found in SRC."""
    records: list[Record]
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    csv_path: Path | None = None
    csv_header: list[str] = field(default_factory=list)
    csv_rows: dict[int, dict[str, str]] = field(default_factory=dict)  # line -> row, for the quarantine file
    csv_digest: str | None = None
    csv_file_column: str | None = None  # the CSV's header for the file path
    skipped: int = 0  # rows the label map says to skip


# ---- pseudonyms -------------------------------------------------------------------------------

def salt_fingerprint(salt: bytes) -> str:
    """A short public identifier of a salt: tells whether two ingests used the same one, reveals nothing."""
    return hashlib.sha256(b"diffkd-salt-fingerprint\0" + salt).hexdigest()[:16]


class Pseudonymizer:
    """Salted, keyed hashes of raw identifiers (HMAC-SHA256); stable for a given salt."""

    def __init__(self, salt: bytes):
        if len(salt) < 16:
            raise IngestError("the pseudonymisation salt is shorter than 16 bytes; use the file diffkd creates")
        self._salt = salt

    def _digest(self, kind: str, text: str) -> str:
        # surrogateescape: a file name that is not valid UTF-8 hashes as its raw bytes
        data = f"{kind}\0{text}".encode("utf-8", "surrogateescape")
        return hmac.new(self._salt, data, hashlib.sha256).hexdigest()[:24]

    def patient(self, raw: str) -> str:
        # Not keyed by center: the same person at two hospitals gets the same pseudonym, so it can be caught.
        return "p" + self._digest("patient", raw.strip())

    def own_patient(self, center: str, raw: str) -> str:
        # An image that stands for its own patient (the source has no patient ids) is one within its
        # center: two hospitals' exports that reuse a file name ("benign (1).png") are different people.
        return "p" + self._digest("own-patient", f"{center}\0{raw.strip()}")

    def case(self, center: str, raw: str) -> str:
        return "c" + self._digest("case", f"{center}\0{raw.strip()}")

    def text(self, raw: str) -> str:
        return "h" + self._digest("text", raw)


@dataclass
class SaltFile:
    """The salt of one dataset, kept in a file outside it."""
    path: Path
    salt: bytes
    is_new: bool

    @property
    def fingerprint(self) -> str:
        return salt_fingerprint(self.salt)

    @classmethod
    def open(cls, path: Path) -> "SaltFile":
        """Read `path` or prepare a fresh salt for it (written by `persist`, only once ingest succeeds)."""
        if path.exists():
            text = path.read_text().strip()
            try:
                salt = bytes.fromhex(text)
            except ValueError:
                raise IngestError(f"salt file {path} is not hex text; restore the file diffkd created") from None
            if len(salt) < 16:
                raise IngestError(f"salt file {path} holds {len(salt)} bytes; at least 16 are needed")
            if path.stat().st_mode & 0o077:
                raise IngestError(f"salt file {path} is open to other users (mode {path.stat().st_mode & 0o777:o}); "
                                  f"anyone holding it and the dataset can test guesses of patient ids: "
                                  f"chmod 600 {path} and re-run")
            return cls(path, salt, is_new=False)
        return cls(path, secrets.token_bytes(32), is_new=True)

    def persist(self) -> None:
        if not self.is_new:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.salt.hex() + "\n")
        self.is_new = False
        log.info("created salt file %s (keep it, outside the dataset: re-ingests and new centers need it)", self.path)


# ---- CSV --------------------------------------------------------------------------------------

def _header_key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _field_aliases() -> dict[str, str]:
    """Normalised header -> canonical field name, for base fields and clinical columns."""
    out: dict[str, str] = {}
    for name, aliases in BASE_ALIASES.items():
        for alias in aliases:
            out[_header_key(alias)] = name
    for col in CLINICAL_SCHEMA:
        for alias in (col.name, *col.aliases):
            out[_header_key(alias)] = col.name
    return out


@dataclass
class CsvTable:
    path: Path
    header: list[str]
    columns: dict[str, str]  # canonical field -> header as written in the file
    rows: list[tuple[int, dict[str, str]]]  # (line number, {header: cell})
    ignored: list[str]
    digest: str

    def cell(self, row: dict[str, str], name: str) -> str | None:
        header = self.columns.get(name)
        return None if header is None else row.get(header)


def read_csv(path: Path, required: Sequence[str]) -> CsvTable:
    """Read a clinical CSV (comma, semicolon or tab separated); headers matched case-insensitively with aliases."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise IngestError(f"cannot read the clinical CSV {path}: {err.strerror}") from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise IngestError(f"{path} is empty; it needs a header line with at least: {', '.join(required)}")
    delimiter = max(",;\t", key=lines[0].count)
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    header = next(reader)
    aliases = _field_aliases()
    columns: dict[str, str] = {}
    ignored = []
    for name in header:
        canonical = aliases.get(_header_key(name))
        if canonical is None:
            if name.strip():
                ignored.append(name)
            continue
        if canonical in columns:
            raise IngestError(f"{path}: columns {columns[canonical]!r} and {name!r} both mean {canonical!r}; "
                              "keep one of them")
        columns[canonical] = name
    missing = [name for name in required if name not in columns]
    if missing:
        accepted = "; ".join(f"{m}: {', '.join(BASE_ALIASES.get(m, (m,)))}" for m in missing)
        raise IngestError(f"{path}: missing required column(s) {', '.join(missing)} "
                          f"(accepted header spellings, any case: {accepted}); add the column and re-run")
    rows = []
    for values in reader:
        if not any(v.strip() for v in values):
            continue
        if len(values) > len(header):
            raise IngestError(f"{path} line {reader.line_num}: {len(values)} cells but {len(header)} headers; "
                              f"check quoting and the separator {delimiter!r}")
        rows.append((reader.line_num, dict(zip(header, [v.strip() for v in values]))))
    return CsvTable(path, header, columns, rows, ignored, hashlib.sha256(data).hexdigest())


def center_slug(value: str) -> str:
    """A center name from a CSV cell (--center-column): lower-cased, each run of other characters than
    letters and digits becomes '_' ('Hospital A' -> 'hospital_a'); '' when nothing is left."""
    return re.sub(r"[^a-z0-9]+", "_", value.strip().lower()).strip("_")


def is_missing(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return str(value).strip().lower() in MISSING_TEXT


def parse_clinical(col: ClinicalColumn, value: object):
    """A CSV cell -> the typed value CLINICAL_SCHEMA declares; None when missing; ValueError naming the rule."""
    if is_missing(value):
        return None
    text = str(value).strip()
    if col.kind in ("float", "int"):
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if math.isnan(number):
            return None
        if col.kind == "int" and number != int(number):
            raise ValueError(f"{text!r} is not a whole number")
        if (col.low is not None and number < col.low) or (col.high is not None and number > col.high):
            raise ValueError(f"{text} is outside the accepted range {col.low:g}-{col.high:g}; "
                             "fix the value or leave the cell empty (stored as missing)")
        return int(number) if col.kind == "int" else number
    if col.kind == "bool":
        key = text.lower()
        if key.endswith(".0"):
            key = key[:-2]
        if key in TRUE_TEXT:
            return True
        if key in FALSE_TEXT:
            return False
        raise ValueError(f"{text!r} is not yes/no (accepted: {', '.join(sorted(TRUE_TEXT | FALSE_TEXT))})")
    if col.name == "birads":
        return normalize_birads(text)
    key = _header_key(text).replace("-", "_")
    if key not in col.levels:
        raise ValueError(f"{text!r} is not one of {', '.join(col.levels)}")
    return key


def parse_label_map(spec: str | dict | None, names: tuple[str, str] = DEFAULT_LABEL_NAMES
                    ) -> dict[str, int | None] | None:
    """'benign=0,malignant=1,normal=skip' -> {'benign': 0, 'malignant': 1, 'normal': None} (keys lower-cased);
    a target is 0, 1, one of the dataset's outcome `names`, or skip."""
    if spec is None or isinstance(spec, dict):
        return None if spec is None else {str(k).strip().lower(): _label_target(v, k, names) for k, v in spec.items()}
    out: dict[str, int | None] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise IngestError(f"--label-map entry {part!r} is not NAME=VALUE (e.g. benign=0,malignant=1,normal=skip)")
        name, value = part.split("=", 1)
        out[name.strip().lower()] = _label_target(value, name, names)
    if not out:
        raise IngestError("--label-map is empty; give NAME=VALUE pairs, e.g. benign=0,malignant=1")
    return out


def _label_target(value: object, name: object, names: tuple[str, str]) -> int | None:
    text = str(value).strip().lower()
    if text in ("skip", "none", "-"):
        return None
    try:
        return parse_label(text, names)
    except ValueError:
        raise IngestError(f"--label-map {name}={value}: the target must be 0, 1, {names[0]}, {names[1]} "
                          "or skip") from None


SKIP = object()  # a label the label map says to leave out


def resolve_label(value: str, label_map: dict[str, int | None] | None, names: tuple[str, str] = DEFAULT_LABEL_NAMES):
    """The 0/1 label of a CSV cell or folder name, or SKIP; ValueError listing what is accepted."""
    key = str(value).strip().lower()
    if label_map is not None and key in label_map:
        return SKIP if label_map[key] is None else label_map[key]
    try:
        return parse_label(value, names)
    except ValueError:
        accepted = sorted(label_aliases(names)) + sorted(label_map or {})
        raise ValueError(f"label {value!r} is not recognised; accepted values: {', '.join(accepted)} "
                         "(or map it with --label-map VALUE=0|1|skip)") from None


def parse_modality(value: object) -> str:
    key = str(value).strip().lower()
    if key in MODALITY_ALIASES:
        return MODALITY_ALIASES[key]
    raise ValueError(f"modality {value!r} is not one of {', '.join(MODALITIES)} (or US/ultrasound/MG/mammography)")


def parse_spacing(value: object) -> float | None:
    if is_missing(value):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"{value!r} is not a number (pixel spacing in mm)") from None
    lo, hi = SPACING_RANGE_MM
    if not lo <= number <= hi:
        raise ValueError(f"{number:g} mm is outside {lo:g}-{hi:g} mm; give the pixel spacing in millimetres")
    return number


def record_from_csv(table: CsvTable, line: int, row: dict[str, str], label_map, folder_label=None,
                    names: tuple[str, str] = DEFAULT_LABEL_NAMES) -> tuple[Record | None, list[Problem], bool]:
    """One CSV row -> (record or None, problems, skipped-by-label-map)."""
    file = normalize_relpath(table.cell(row, "file") or "")
    rec = Record(file=file, line=line, raw=row)
    problems: list[Problem] = []
    if not file or check_relpath(file):
        why = check_relpath(file) if file else "the file cell is empty; give the image path relative to SRC"
        return None, [Problem(why, line=line, column=table.columns["file"])], False
    label_cell = table.cell(row, "label")
    if label_cell is not None and not is_missing(label_cell):
        try:
            label = resolve_label(label_cell, label_map, names)
        except ValueError as err:
            problems.append(rec.problem(str(err), table.columns["label"]))
            label = None
    elif folder_label is not None:
        label = folder_label
    else:
        label = None
        problems.append(rec.problem(f"no label: fill the label cell ({names[0]}/{names[1]} or 0/1)"
                                    if label_cell is not None
                                    else "no label column and the file is not under a label folder",
                                    table.columns.get("label")))
    if label is SKIP:
        return None, [], True
    rec.label = label
    patient = table.cell(row, "patient_id")
    if patient is not None:
        if is_missing(patient):
            problems.append(rec.problem("empty patient id; every image needs its patient's id",
                                        table.columns["patient_id"]))
        else:
            rec.patient = patient
    case = table.cell(row, "case_id")
    rec.case = None if is_missing(case) else case
    mask = table.cell(row, "mask")
    if mask is not None and not is_missing(mask):
        rec.masks = tuple(normalize_relpath(m) for m in mask.split(";") if m.strip())
        problems += [rec.problem(why, table.columns["mask"]) for m in rec.masks if (why := check_relpath(m))]
    for name, parse in (("modality", parse_modality), ("spacing_mm", parse_spacing)):
        cell = table.cell(row, name)
        if cell is not None and not is_missing(cell):
            try:
                setattr(rec, name, parse(cell))
            except ValueError as err:
                problems.append(rec.problem(str(err), table.columns[name]))
    for col in CLINICAL_SCHEMA:
        cell = table.cell(row, col.name)
        if cell is None:
            continue
        try:
            rec.clinical[col.name] = parse_clinical(col, cell)
        except ValueError as err:
            problems.append(rec.problem(str(err), table.columns[col.name]))
    return rec, problems, False


def normalize_relpath(path: str) -> str:
    """A CSV path cell -> posix path relative to SRC ('' when empty); '..' and absolute paths are kept
    as written so that `check_relpath` can refuse them."""
    text = path.strip().replace("\\", "/")
    if not text:
        return ""
    parts = [p for p in PurePosixPath(text).parts if p != "."]
    return PurePosixPath(*parts).as_posix() if parts else ""


def check_relpath(rel: str) -> str | None:
    """Why `rel` cannot name a file inside SRC, or None."""
    path = PurePosixPath(rel)
    if path.is_absolute() or ".." in path.parts:
        return f"path {rel!r} leaves SRC; give paths relative to the source folder"
    return None


def find_clinical_csv(src: Path, clinical_csv) -> Path | None:
    """The CSV the user named, else SRC/clinical.csv when present."""
    if clinical_csv is not None:
        path = Path(clinical_csv)
        if not path.is_file():
            raise IngestError(f"clinical CSV {path} does not exist")
        return path
    default = src / "clinical.csv"
    if default.is_file():
        log.info("using %s as the clinical CSV", default)
        return default
    return None


def list_files(src: Path, suffixes: Iterable[str] | None = None) -> list[str]:
    """Posix paths relative to SRC of the visible files below it, sorted."""
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or (wanted is not None and not name.lower().endswith(wanted)):
                continue
            out.append(Path(dirpath, name).relative_to(src).as_posix())
    return sorted(out)


def is_mask_name(rel: str) -> bool:
    path = Path(rel)
    return bool(MASK_NAME.match(path.stem)) or path.parent.name.lower() in ("mask", "masks")


class MaskIndex:
    """Finds `x_mask.png`, `x_mask_1.png`, ... beside `x.png` (any image suffix) in one dict look-up."""

    def __init__(self, files: Iterable[str]):
        self._by_image: dict[tuple[str, str], list[str]] = {}
        for rel in files:
            path = PurePosixPath(rel)
            if m := MASK_NAME.match(path.stem):
                self._by_image.setdefault((path.parent.as_posix(), m.group("stem")), []).append(rel)

    def beside(self, rel: str) -> tuple[str, ...]:
        path = PurePosixPath(rel)
        return tuple(sorted(self._by_image.get((path.parent.as_posix(), path.stem), ())))


# ---- images -----------------------------------------------------------------------------------

def to_storable(img: Image.Image, name: str) -> np.ndarray:
    """Any decoded image -> a 2-D uint8 or uint16 array, following the policy in the module docstring."""
    mode = img.mode
    if mode == "L":
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode.startswith("I;16"):
        return np.asarray(img).astype(np.uint16)
    if mode == "I":
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageProblem(f"{name}: 32-bit values outside 0..65535 cannot be stored as 16-bit gray; "
                               "rescale it to 8 or 16 bit first")
        return arr.astype(np.uint16)
    if mode == "P":
        return to_storable(img.convert("RGBA" if "transparency" in img.info else "RGB"), name)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(img.getchannel("A"))
        if alpha.size and alpha.min() < 255:
            raise ImageProblem(f"{name}: has transparent pixels ({mode}); diffkd does not guess a background. "
                               "Flatten it onto the background you intend (or remove the alpha channel) and re-run")
        return to_storable(img.convert("L" if mode.startswith("L") else "RGB"), name)
    if mode == "RGB":
        return np.asarray(img.convert("L"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(img.convert("RGB").convert("L"))
    raise ImageProblem(f"{name}: image mode {mode!r} is not supported (float or unusual pixel format); "
                       "convert it to 8- or 16-bit gray or RGB PNG")


def rgb_to_gray(arr: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luminance of an (..., 3) array, in its own integer type (the same rule as Pillow's)."""
    gray = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return np.rint(gray).astype(arr.dtype)


def binarize_mask(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:
        arr = arr.max(axis=-1)
    top = arr.max() if arr.size else 0
    return arr > 0 if top <= 1 else arr > top / 2


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a 2-D uint8/uint16 array; no metadata chunks, deterministic for given pixels."""
    if arr.dtype not in (np.uint8, np.uint16) or arr.ndim != 2:
        raise ImageProblem(f"cannot store a {arr.ndim}-D {arr.dtype} image; expected 2-D uint8 or uint16")
    buf = io.BytesIO()
    # zlib level 3: ~3x faster than the default 6 for ~8% larger files of speckled images
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=3)  # uint16 -> 16-bit PNG
    return buf.getvalue()


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEPT_CHUNKS = (b"IHDR", b"IDAT", b"IEND")


def png_passthrough(data: bytes) -> bytes | None:
    """The source bytes minus every ancillary chunk, when the file already is an 8/16-bit gray PNG.

    Re-encoding dominates ingest time; a gray PNG needs none. Dropping ancillary chunks (text, EXIF,
    ICC, time, transparency) keeps the pixels exactly and leaves no metadata behind. A file with
    nothing to drop is returned as it is (the same object, not a copy). The file must have been fully
    decoded (CRCs checked) before this is called.
    """
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    bit_depth, color_type = data[24], data[25]
    if color_type != 0 or bit_depth not in (8, 16):
        return None
    out, pos = [PNG_SIGNATURE], len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if kind in PNG_KEPT_CHUNKS:
            out.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            whole = pos == len(data) and sum(map(len, out)) == len(data)
            return data if whole else b"".join(out)
    return None


def encode_mask(mask: np.ndarray) -> bytes:
    return encode_png(np.where(mask, 255, 0).astype(np.uint8))


def read_listed_file(path: Path, name: str, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of a file the source lists (`path` is SRC/`name`); a missing, empty, oversized or
    unreadable file, or a link that leads out of SRC, is an ImageProblem naming it."""
    source = path
    for _ in Path(name).parts:
        source = source.parent
    try:
        real = path.resolve(strict=True)
        if not real.is_relative_to(source.resolve()):
            raise ImageProblem(f"{name}: is a link to a place outside the source folder; copy the file into "
                               "the source or remove the link")
        size = real.stat().st_size
        if size == 0:
            raise ImageProblem(f"{name}: is empty (0 bytes); re-export it or remove it (and its CSV row)")
        if size > limits.max_file_bytes:
            raise ImageProblem(f"{name}: {size / 2**20:.0f} MiB exceeds the {limits.max_file_bytes / 2**20:.0f} "
                               "MiB file limit")
        return real.read_bytes()
    except FileNotFoundError:
        raise ImageProblem(f"{name}: listed but not found; fix the path (relative to SRC) or add the file") from None
    except OSError as err:
        raise ImageProblem(f"{name}: cannot be read ({err.strerror or err})") from None


def open_image(path: Path, name: str, limits: DecodeLimits = DEFAULT_LIMITS) -> tuple[Image.Image, bytes]:
    """Decode a whole image file (truncation shows here, not later); returns the image and the file bytes.

    The size and frame count are checked from the header first, so a decompression bomb is refused
    before it is decoded."""
    data = read_listed_file(path, name, limits)
    try:
        img = Image.open(io.BytesIO(data))
        limits.check(name, *img.size)
        if getattr(img, "n_frames", 1) > 1:
            raise ImageProblem(f"{name}: holds {img.n_frames} frames/pages; save one image per file")
        img.load()
        img = ImageOps.exif_transpose(img) if img.format == "JPEG" else img
    except ImageProblem:
        raise
    except Image.DecompressionBombError as err:
        raise ImageProblem(f"{name}: refused as a decompression bomb ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageProblem(f"{name}: unreadable or truncated image ({err}); re-export it from the source "
                           "or remove it (and its CSV row)") from None
    return img, data


def load_image_record(src: Path, rec: Record, limits: DecodeLimits = DEFAULT_LIMITS) -> Loaded:
    """Folder / BUSI loader: the image file plus its masks (OR-merged)."""
    img, data = open_image(src / rec.file, rec.file, limits)
    digest = hashlib.sha256(data)
    arr = to_storable(img, rec.file)
    mask_png = None
    if rec.masks:
        merged = np.zeros(arr.shape, dtype=bool)
        single_mask_png = None
        for mask_file in rec.masks:
            mask_img, mask_data = open_image(src / mask_file, mask_file, limits)
            digest.update(mask_data)
            raw = np.asarray(mask_img if mask_img.mode in ("L", "1") or mask_img.mode.startswith("I")
                             else mask_img.convert("RGB"))
            mask = binarize_mask(raw)
            if mask.shape != arr.shape:
                raise ImageProblem(f"{mask_file}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {rec.file} "
                                   f"is {arr.shape[1]}x{arr.shape[0]}; masks must match their image's size")
            merged |= mask
            if len(rec.masks) == 1 and raw.dtype == np.uint8 and raw.ndim == 2 and np.isin(raw, (0, 255)).all():
                single_mask_png = _as_file(src / mask_file, png_passthrough(mask_data), mask_data)  # a 0/255 gray PNG
        mask_png = single_mask_png or encode_mask(merged)
    png = (_as_file(src / rec.file, png_passthrough(data), data) if img.mode in ("L", "I;16", "I;16B") else None) \
        or encode_png(arr)
    return Loaded([Decoded(png, arr.shape[0], arr.shape[1], pixel_digest(arr), mask_png)], digest.hexdigest())


def _as_file(path: Path, stored: bytes | None, data: bytes) -> bytes | FileBytes | None:
    """The bytes to store, marked as the file's own when they are the whole file (`png_passthrough`
    dropped nothing and returned the file itself)."""
    return FileBytes(str(path), data) if stored is data else stored


def load_all(loader: Callable[[Path, Record], Loaded], src: Path, records: Sequence[Record], *, spool: Spool,
             workers: int | None = None, what: str = "images") -> tuple[list[Loaded | None], list[Problem]]:
    """Decode every record, in a thread pool (Pillow, zlib and hashlib release the GIL); with progress.

    Each image's bytes go to `spool` as soon as it is decoded (the results hold `Blob`s), so memory
    holds the images being decoded, not the source. Any failure of one file (a damaged file can raise
    almost anything inside a decoder) becomes a Problem naming that file, so that it can be
    quarantined while the rest is ingested.
    """
    results: list[Loaded | None] = [None] * len(records)
    problems: list[Problem] = []

    def one(i: int):
        try:
            loaded = loader(src, records[i])
        except ImageProblem as err:
            return i, None, records[i].problem(str(err).removeprefix(f"{records[i].file}: "))
        except Exception as err:  # noqa: BLE001  (one bad file must not stop the ingest)
            log.debug("decoding %s failed", records[i].file, exc_info=True)
            return i, None, records[i].problem(f"cannot be decoded ({type(err).__name__}: {err}); re-export it "
                                               "from the source or remove it (and its CSV row)")
        return i, spooled(loaded, spool), None  # outside the handlers: a full disk is no fault of the file

    workers = workers or min(DEFAULT_WORKERS, os.cpu_count() or 1)
    progress = Progress(len(records), what)
    if workers <= 1 or len(records) < 16:
        outcomes = map(one, range(len(records)))
        for i, loaded, problem in outcomes:
            results[i] = loaded
            problems += [problem] if problem else []
            progress.step()
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
            for i, loaded, problem in pool.map(one, range(len(records))):
                results[i] = loaded
                problems += [problem] if problem else []
                progress.step()
    progress.done()
    return results, problems


def spooled(loaded: Loaded, spool: Spool) -> Loaded:
    """`loaded` with its images' PNG and mask bytes moved to `spool`."""
    images = [dataclasses.replace(image, png=spool.put(image.png),
                                  mask=None if image.mask is None else spool.put(image.mask))
              for image in loaded.images]
    return dataclasses.replace(loaded, images=images)


class Progress:
    """Logs 'decoded N/M images' every few seconds for sources large enough to take a while."""

    def __init__(self, total: int, what: str, every_s: float = 3.0, min_total: int = 200):
        self.total, self.what, self.every_s = total, what, every_s
        self.enabled = total >= min_total
        self.count = 0
        self.start = self.last = time.monotonic()

    def step(self) -> None:
        self.count += 1
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            log.info("decoded %d/%d %s (%.0f%%, %.0f/s, ~%.0fs left)", self.count, self.total, self.what,
                     100 * self.count / self.total, rate, (self.total - self.count) / max(rate, 1e-9))

    def done(self) -> None:
        if self.enabled:
            log.info("decoded %d %s in %.1fs", self.total, self.what, time.monotonic() - self.start)
