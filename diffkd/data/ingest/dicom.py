"""The `dicom` layout: ultrasound (and mammography) DICOM files, de-identified on the way in.

Files are found below SRC by suffix (.dcm, .dicom) or, without a suffix, by the 'DICM' marker. Labels
come from a CSV (``file`` column, the path relative to SRC) or from label folders (``SRC/<label>/``);
patient ids from the CSV or else the PatientID tag, salted-hashed like every raw id.

What is kept from a file: the pixels (cropped to the ultrasound tissue region), the pixel spacing,
the modality, and — only as salted hashes — PatientID and SOPInstanceUID. No other tag is read into
the dataset, so names, birth dates, accession numbers, institutions and dates never reach it; the
stored `source` is a salted hash of the file's path, like every layout's.

Pixels: YBR is converted to RGB by pydicom, palette colour through its LUT, RGB to gray by ITU-R
601-2 luminance; MONOCHROME1 is inverted; up to 8 stored bits give an 8-bit PNG, more give 16-bit;
signed pixels with negative values are refused. Spacing and crop come from SequenceOfUltrasoundRegions:
the largest region with RegionSpatialFormat 1 (2D) and RegionDataType 1 (tissue); PhysicalDeltaX/Y in
cm (unit code 3) become mm (the mean of X and Y when they differ). Without such a region the whole
frame is kept and spacing comes from PixelSpacing when present. Burned-in text outside the tissue
region is removed by the crop. A file without such a region (all mammography, secondary captures)
may show names or ids burned into its pixels, so it is refused unless the user vouches for the
images with ``allow_burned_in`` (``--allow-burned-in``); one whose BurnedInAnnotation is YES is
refused even then. Both are quarantinable problems, and the ingest report counts the files stored
whole under the flag.

Before any pixel is decoded, Rows x Columns and NumberOfFrames are checked against the ingest's
`DecodeLimits`.

Frames (`frames=`): "all" stores every frame of a multi-frame file as its own row (source
``dicom:<file>#frame=K``), "middle" stores only the middle frame, "first" only the first.
"""
from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffkd.data.ingest.common import (DEFAULT_LIMITS, IMAGE_SUFFIXES, DecodeLimits, Decoded, Discovery,
                                       ImageProblem, Loaded, MaskIndex, Record, binarize_mask, encode_mask, encode_png,
                                       find_clinical_csv, list_files, open_image, pixel_digest, read_listed_file,
                                       rgb_to_gray)
from diffkd.data.ingest.folder import from_csv, from_label_folders
from diffkd.data.schema import DEFAULT_LABEL_NAMES

NAME = "dicom"
FRAME_CHOICES = ("all", "middle", "first")
SUFFIXES = (".dcm", ".dicom")
MODALITY_TAGS = {"US": "us", "MG": "mammo"}
CM_UNIT = 3  # PhysicalUnitsX/YDirection code for centimetres


def is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in SUFFIXES:
        return True
    if path.suffix:
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def discover(src: Path, clinical_csv=None, label_map=None, frames: str = "all",
             label_names: tuple[str, str] = DEFAULT_LABEL_NAMES, **_) -> Discovery:
    if frames not in FRAME_CHOICES:
        raise ValueError(f"frames={frames!r}: choose one of {', '.join(FRAME_CHOICES)}")
    everything = list_files(src)
    files = [f for f in everything if is_dicom_file(src / f)]
    masks = MaskIndex(f for f in everything if f.lower().endswith(IMAGE_SUFFIXES))
    csv_path = find_clinical_csv(src, clinical_csv)
    if csv_path is None:
        return from_label_folders(files, masks, label_map, own_patient=False, names=label_names)
    return from_csv(csv_path, files, masks, label_map, required=("file",), names=label_names)


@dataclass(frozen=True)
class TissueRegion:
    x0: int
    y0: int
    x1: int  # inclusive, as DICOM gives them
    y1: int
    spacing_mm: float | None


REGION_BOX = ("RegionLocationMinX0", "RegionLocationMinY0", "RegionLocationMaxX1", "RegionLocationMaxY1")


def tissue_region(ds, name: str) -> TissueRegion | None:
    """The largest 2D tissue region of SequenceOfUltrasoundRegions, or None."""
    regions = [r for r in ds.get("SequenceOfUltrasoundRegions", None) or []
               if r.get("RegionSpatialFormat") == 1 and r.get("RegionDataType") == 1]
    if not regions:
        return None
    for r in regions:
        missing = [k for k in REGION_BOX if r.get(k, None) is None]
        if missing:
            raise ImageProblem(f"{name}: an ultrasound tissue region lacks {', '.join(missing)}; the region "
                               "cannot be cropped: fix the region tags or re-export the file")

    def box(r):
        return tuple(int(r.get(k)) for k in REGION_BOX)

    best = max(regions, key=lambda r: (box(r)[2] - box(r)[0]) * (box(r)[3] - box(r)[1]))
    spacing = None
    if best.get("PhysicalUnitsXDirection") == CM_UNIT and best.get("PhysicalUnitsYDirection") == CM_UNIT:
        try:
            dx, dy = abs(float(best.PhysicalDeltaX)) * 10.0, abs(float(best.PhysicalDeltaY)) * 10.0
        except (AttributeError, TypeError, ValueError):
            raise ImageProblem(f"{name}: the tissue region's PhysicalDeltaX/Y are missing or not numbers; "
                               "fix the region tags or give spacing_mm in the CSV") from None
        spacing = (dx + dy) / 2 if dx > 0 and dy > 0 else None
    return TissueRegion(*box(best), spacing)


def _read(path: Path, name: str, limits: DecodeLimits):
    """(dataset, file bytes)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    data = read_listed_file(path, name, limits)
    try:
        return pydicom.dcmread(io.BytesIO(data)), data
    except InvalidDicomError as err:
        raise ImageProblem(f"{name}: not a DICOM file ({err}); remove it or use another layout") from None
    except Exception as err:  # pydicom raises many types for damaged files
        raise ImageProblem(f"{name}: unreadable or truncated DICOM ({type(err).__name__}: {err}); "
                           "re-export it from the PACS or remove it") from None


def _check_header(ds, name: str, limits: DecodeLimits) -> None:
    """Pixel data present, and its size within `limits`, before anything is decoded."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageProblem(f"{name}: has no pixel data (a structured report, presentation state or DICOMDIR?); "
                           "remove it from SRC or leave it out of the CSV")
    if "PixelData" not in ds:
        raise ImageProblem(f"{name}: float pixel data is not supported; export integer pixels")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageProblem(f"{name}: Rows, Columns or NumberOfFrames is missing or not a number") from None
    limits.check(name, columns, rows, frames)


def _pixels(ds, name: str) -> np.ndarray:
    """(frames, rows, cols) uint8/uint16 gray, before cropping."""
    try:
        arr = ds.pixel_array
    except Exception as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        raise ImageProblem(f"{name}: pixel data cannot be decoded ({err}); for the compressed transfer syntax "
                           f"{getattr(syntax, 'name', syntax)} install pylibjpeg[all] or python-gdcm, or export "
                           "uncompressed DICOM") from None
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    color = int(ds.get("SamplesPerPixel", 1)) > 1
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if n_frames == 1:
        arr = arr[None]
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr, color = apply_color_lut(arr, ds), True
    if color:
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ImageProblem(f"{name}: unexpected colour pixel array shape {arr.shape}")
        arr = rgb_to_gray(arr)
    bits = int(ds.get("BitsStored", 8 * arr.dtype.itemsize))
    if photometric == "MONOCHROME1":  # 0 is white: invert so that bright means echogenic
        arr = (2 ** bits - 1) - arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ImageProblem(f"{name}: signed pixel values below 0 are not supported for ultrasound; "
                           "export unsigned pixels")
    return arr.astype(np.uint8 if bits <= 8 else np.uint16)


def _pixel_spacing(ds, name: str) -> float | None:
    if "PixelSpacing" not in ds:
        return None
    try:
        values = [float(v) for v in ds.PixelSpacing]
    except (TypeError, ValueError):
        values = []
    if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ImageProblem(f"{name}: PixelSpacing {ds.get('PixelSpacing')!r} is not two positive numbers; "
                           "fix the tag or give spacing_mm in the CSV")
    return float(np.mean(values))


def load(src: Path, rec: Record, frames: str = "all", allow_burned_in: bool = False,
         limits: DecodeLimits = DEFAULT_LIMITS, **_) -> Loaded:
    name = rec.file
    ds, data = _read(src / rec.file, name, limits)
    modality = rec.modality or MODALITY_TAGS.get(str(ds.get("Modality", "")))
    if modality is None:
        raise ImageProblem(f"{name}: Modality {ds.get('Modality', '')!r} is not US or MG; give a modality "
                           "column in the CSV if the images really are ultrasound or mammography")
    _check_header(ds, name, limits)
    region = tissue_region(ds, name)
    burned_in = str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
    if region is None and burned_in:
        raise ImageProblem(f"{name}: BurnedInAnnotation is YES and there is no ultrasound region to crop to, so "
                           "text burned into the pixels (names, ids) would be stored; mask it or export without it")
    if region is None and not allow_burned_in:
        raise ImageProblem(f"{name}: no ultrasound tissue region to crop to, so text burned into the pixels "
                           "(names, ids) would be stored with the image; check that these images carry none and "
                           "pass --allow-burned-in")
    arr = _pixels(ds, name)
    full_h, full_w = arr.shape[1:]
    spacing = None
    if region is not None:
        x0, y0 = max(region.x0, 0), max(region.y0, 0)
        x1, y1 = min(region.x1, full_w - 1), min(region.y1, full_h - 1)
        if x1 <= x0 or y1 <= y0:
            raise ImageProblem(f"{name}: the ultrasound tissue region ({region.x0},{region.y0})-({region.x1},"
                               f"{region.y1}) lies outside the {full_w}x{full_h} image; fix the region tags")
        arr = arr[:, y0:y1 + 1, x0:x1 + 1]
        spacing = region.spacing_mm
    else:
        x0 = y0 = 0
        y1, x1 = full_h - 1, full_w - 1
        spacing = _pixel_spacing(ds, name)
    digest = hashlib.sha256(data)
    mask_png = None
    if rec.masks:
        merged = np.zeros((full_h, full_w), dtype=bool)
        for mask_file in rec.masks:
            mask_img, mask_data = open_image(src / mask_file, mask_file, limits)
            digest.update(mask_data)
            mask = binarize_mask(np.asarray(mask_img.convert("L")))
            if mask.shape != (full_h, full_w):
                raise ImageProblem(f"{mask_file}: mask is {mask.shape[1]}x{mask.shape[0]} but the DICOM frame is "
                                   f"{full_w}x{full_h}; draw masks on the full, uncropped frame")
            merged |= mask
        mask_png = encode_mask(merged[y0:y1 + 1, x0:x1 + 1])
    n = arr.shape[0]
    chosen = {"all": range(n), "middle": [n // 2], "first": [0]}[frames]
    patient = str(ds.get("PatientID", "") or "").strip() or None
    case = str(ds.get("SOPInstanceUID", "") or "").strip() or None
    images = [Decoded(encode_png(arr[k]), arr.shape[1], arr.shape[2], pixel_digest(arr[k]), mask_png, spacing,
                      frame=k if n > 1 else None, patient=patient, case=case, modality=modality) for k in chosen]
    return Loaded(images, digest.hexdigest(), burned_in_allowed=region is None)
