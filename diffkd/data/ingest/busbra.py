"""The `busbra` layout (BUS-BRA, Gómez-Flores et al., Medical Physics 2024): `SRC/bus_data.csv`,
`SRC/Images/bus_<case>-<view>.png` and `SRC/Masks/mask_<case>-<view>.png`.

`bus_data.csv` has one row per image: ``ID`` (the image's name, e.g. ``bus_0001-l``), ``Case`` (the
patient; ``-l``/``-r`` are two views of one lesion, ``-s`` a single view), ``Pathology`` (the label,
benign or malignant), ``BIRADS`` (stored as the clinical ``birads`` column), ``Device`` (the scanner)
and ``Histology``, ``Width``, ``Height``, ``Side``, ``BBOX``. Histology is where the outcome comes
from, so it is never stored (nor are the other columns): a model must not see it. The device is kept
in each row's ``source`` after the hashed path (``busbra:<hash>|device=GE Logiq 7 @10-14MHz``), and
``--center-by device`` makes one center per scanner, named by `scanner_center_name`.

Each image is its own case (BUS-BRA gives the BI-RADS category per image, and its two views of one
lesion do not always agree); the patient groups the views, so splits keep them on one side and the
bootstrap resamples them together. A new dataset's outcomes are named benign,malignant.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from diffkd.data.ingest.common import (DEFAULT_LIMITS, DecodeLimits, Discovery, IngestError, Loaded, Problem,
                                       list_files, load_image_record, read_csv, record_from_csv)
from diffkd.data.ingest.folder import unlisted_warning

NAME = "busbra"
CSV_NAME = "bus_data.csv"
LABEL_NAMES = ("benign", "malignant")
ID_PATTERN = re.compile(r"^bus_(?P<view>(?P<case>\d+)-[a-z]+)$", re.IGNORECASE)
RAW_COLUMNS = ("ID", "Case", "Device")  # read as written; the label and BI-RADS go through the clinical reader
# Cells derived from ID and Case, under keys no CSV header can have, so that `record_from_csv` reads them.
DERIVED = {"file": "\0file", "patient_id": "\0patient", "mask": "\0mask"}


def scanner_center_name(device: str) -> str:
    """A short center name for a scanner: the text before '@' (the probe's frequency range), without
    the maker's name when a model name follows it, lower-cased, letters and digits only:
    'GE Logiq 7 @10-14MHz' -> 'logiq7', 'Toshiba Aplio 300 @12-14 MHz' -> 'aplio300',
    'U-Systems @10-14MHz' -> 'usystems'."""
    words = device.split("@", 1)[0].split()
    model = words[1:] if len(words) > 1 else words
    return re.sub(r"[^a-z0-9]", "", "".join(model).lower())


CENTER_BY = {"device": ("Device", scanner_center_name)}  # --center-by NAME: (CSV column, center name rule)


def discover(src: Path, clinical_csv=None, label_map=None, label_names: tuple[str, str] = LABEL_NAMES,
             **_) -> Discovery:
    if clinical_csv is not None:
        raise IngestError(f"the busbra layout reads SRC/{CSV_NAME}; it takes no --clinical CSV")
    csv_path = src / CSV_NAME
    if not csv_path.is_file():
        raise IngestError(f"{csv_path} not found: the busbra layout needs BUS-BRA's {CSV_NAME} in SRC "
                          "(beside the Images/ and Masks/ folders)")
    table = read_csv(csv_path, required=("label", "birads"))
    by_key = {h.strip().lower(): h for h in table.header}
    missing = [c for c in RAW_COLUMNS if c.lower() not in by_key]
    if missing:
        raise IngestError(f"{csv_path}: missing column(s) {', '.join(missing)}; BUS-BRA's {CSV_NAME} has "
                          "ID, Case, Histology, Pathology, BIRADS, Device, ...")
    id_col, case_col, device_col = (by_key[c.lower()] for c in RAW_COLUMNS)
    view = dataclasses.replace(table, columns={**table.columns, **DERIVED})
    found = Discovery(records=[], csv_path=csv_path, csv_header=table.header, csv_rows=dict(table.rows),
                      csv_digest=table.digest, csv_file_column=id_col)
    masks = set(list_files(src / "Masks")) if (src / "Masks").is_dir() else set()
    listed: set[str] = set()
    no_mask = []
    for line, row in table.rows:
        image_id, case = row.get(id_col, ""), row.get(case_col, "")
        match = ID_PATTERN.match(image_id)
        if not match:
            found.problems.append(Problem(f"ID {image_id!r} is not bus_<case>-<view> (e.g. bus_0001-l)",
                                          line=line, column=id_col))
            continue
        if not case.isdigit() or int(case) != int(match["case"]):
            found.problems.append(Problem(f"Case {case!r} is not the number in ID {image_id!r}; the file name "
                                          "carries the patient, so they must agree", line=line, column=case_col))
            continue
        mask = f"mask_{match['view']}.png"
        cells = {"file": f"Images/{image_id}.png", "patient_id": str(int(case)),
                 "mask": f"Masks/{mask}" if mask in masks else ""}
        rec, problems, skipped = record_from_csv(view, line, {**row, **{DERIVED[k]: v for k, v in cells.items()}},
                                                 label_map, names=label_names)
        listed.add(cells["file"])
        if skipped:
            found.skipped += 1
        elif problems:
            found.problems += problems
        else:
            rec.raw = row
            rec.note = f"device={row.get(device_col, '').strip()}"
            found.records.append(rec)
            no_mask += [] if rec.masks else [rec.file]
    if ignored := [c for c in table.ignored if c not in (id_col, case_col, device_col)]:
        found.warnings.append(f"{CSV_NAME}: not stored: {', '.join(ignored)} (histology is where the outcome "
                              "comes from, so a model must never see it)")
    if no_mask:
        found.warnings.append(f"{len(no_mask)} image(s) have no mask file in Masks/ and are stored without a "
                              f"mask: {', '.join(no_mask[:5])}{', ...' if len(no_mask) > 5 else ''}")
    images = [f"Images/{f}" for f in list_files(src / "Images")] if (src / "Images").is_dir() else []
    if warning := unlisted_warning([f for f in images if f not in listed], csv_path.name):
        found.warnings.append(warning)
    if not table.rows:
        raise IngestError(f"{csv_path} has a header but no rows")
    return found


def load(src: Path, rec, limits: DecodeLimits = DEFAULT_LIMITS, **_) -> Loaded:
    return load_image_record(src, rec, limits)
