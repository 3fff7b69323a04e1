"""The `busi` layout (BUSI, Al-Dhabyani et al. 2020): `SRC/<class>/<name> (N).png` with `<name> (N)_mask.png`
and, for some images, extra `_mask_1.png`, `_mask_2.png` files that are OR-merged into one mask.

BUSI's classes (benign / malignant / normal) are not a binary outcome, so the user must say what
each class folder means: ``--label-map benign=0,malignant=1,normal=skip`` (with, say,
``--label-names benign,malignant`` so that every output names the outcomes as the data does). A class folder missing from
the map is an error. BUSI has no patient ids: each image is its own patient (a warning says so), and
its known duplicate images are caught by sha256 like any other source's.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

from diffkd.data.ingest.common import (DEFAULT_LIMITS, DecodeLimits, IMAGE_SUFFIXES, Discovery, IngestError, Loaded, Record, is_mask_name,
                                       list_files, load_image_record, MaskIndex)

NAME = "busi"


def discover(src: Path, clinical_csv=None, label_map=None, **_) -> Discovery:
    if clinical_csv is not None:
        raise IngestError("the busi layout takes no clinical CSV (BUSI has none); to add clinical data use "
                          "--layout folder with a CSV that lists the files")
    files = list_files(src, IMAGE_SUFFIXES)
    classes = sorted({PurePosixPath(f).parts[0] for f in files if len(PurePosixPath(f).parts) > 1})
    if label_map is None:
        raise IngestError(f"the busi layout needs --label-map saying which label each class folder gets "
                          f"(found: {', '.join(classes) or 'no class folders'}), e.g. "
                          "--label-map benign=0,malignant=1,normal=skip")
    unmapped = [c for c in classes if c.lower() not in label_map]
    if unmapped:
        raise IngestError(f"--label-map does not map class folder(s) {', '.join(unmapped)}; add e.g. "
                          f"{unmapped[0].lower()}=0, =1 or =skip")
    masks = MaskIndex(files)
    found = Discovery(records=[])
    for rel in files:
        parts = PurePosixPath(rel).parts
        if is_mask_name(rel):
            continue
        if len(parts) < 2:
            found.warnings.append(f"{rel}: not inside a class folder, ignored")
            continue
        target = label_map[parts[0].lower()]
        if target is None:
            found.skipped += 1
            continue
        found.records.append(Record(file=rel, label=target, patient=rel, own_patient=True, masks=masks.beside(rel)))
    if found.records:
        found.warnings.append("busi: no patient ids; each image is treated as its own patient")
    return found


def load(src: Path, rec: Record, limits: DecodeLimits = DEFAULT_LIMITS, **_) -> Loaded:
    return load_image_record(src, rec, limits)

