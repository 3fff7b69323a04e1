"""`diffkd ingest --layout dicom`: de-identification, tissue-region crop and spacing, frames, bad files."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import DecodeLimits, IngestError, ingest, pseudonymizer_for

US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
PHI = {"PatientName": "Roe^Jessamine", "PatientID": "MRN-4711-SECRET", "PatientBirthDate": "19610417",
       "AccessionNumber": "ACC93721XQ", "InstitutionName": "Saint Nowhere Infirmary",
       "InstitutionAddress": "12 Hidden Lane", "ReferringPhysicianName": "Quill^Doctor",
       "OperatorsName": "Sonographer^Pat", "StudyID": "STUDY8842", "StudyDate": "20240117"}
# tissue region: x 10..69, y 4..43 of an 80x50 frame; 0.012 cm = 0.12 mm per pixel
REGION = dict(x0=10, y0=4, x1=69, y1=43, delta_cm=0.012)


def us_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2", region: bool = True,
             modality: str = "US", phi: dict | None = None, bits: int | None = None) -> Path:
    """A minimal but valid ultrasound DICOM with PHI tags, regions (tissue + a Doppler strip) and pixels."""
    multi = pixels is not None and pixels.ndim == (4 if photometric == "RGB" else 3)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_MULTIFRAME if multi else US_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    for keyword, value in (PHI if phi is None else phi).items():
        setattr(ds, keyword, value)
    if region:
        tissue = Dataset()
        tissue.RegionSpatialFormat, tissue.RegionDataType, tissue.RegionFlags = 1, 1, 0
        tissue.RegionLocationMinX0, tissue.RegionLocationMinY0 = REGION["x0"], REGION["y0"]
        tissue.RegionLocationMaxX1, tissue.RegionLocationMaxY1 = REGION["x1"], REGION["y1"]
        tissue.PhysicalUnitsXDirection = tissue.PhysicalUnitsYDirection = 3
        tissue.PhysicalDeltaX = tissue.PhysicalDeltaY = REGION["delta_cm"]
        doppler = Dataset()  # a larger spectral strip: must not be chosen
        doppler.RegionSpatialFormat, doppler.RegionDataType, doppler.RegionFlags = 3, 3, 0
        doppler.RegionLocationMinX0, doppler.RegionLocationMinY0 = 0, 0
        doppler.RegionLocationMaxX1, doppler.RegionLocationMaxY1 = 79, 49
        doppler.PhysicalUnitsXDirection, doppler.PhysicalUnitsYDirection = 4, 7
        doppler.PhysicalDeltaX = doppler.PhysicalDeltaY = 0.5
        ds.SequenceOfUltrasoundRegions = [doppler, tissue]
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits or 8 * pixels.dtype.itemsize,
                          generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def frame(seed: int, shape=(50, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def every_stored_text_and_byte(root: Path) -> bytes:
    """All file bytes under `root`, plus every Parquet value decoded (compression would hide strings)."""
    out = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            out.append(path.read_bytes())
            if name.endswith(".parquet"):
                table = pq.read_table(path)
                out.append(str(table.schema.metadata).encode())
                for column in table.columns:
                    for value in column.to_pylist():
                        out.append(value if isinstance(value, bytes) else str(value).encode())
    return b"\n".join(out)


def test_dicom_ingest_stores_no_phi(tmp_path):
    src = tmp_path / "pacs"
    single = us_dicom(src / "upgrade" / "IMG0001.dcm", frame(1))
    cine = us_dicom(src / "DCIS" / "Roe_Jessamine_cine", np.stack([frame(2), frame(3), frame(4)]))  # no suffix
    rgb = np.stack([frame(5), frame(6), frame(7)], axis=-1)
    us_dicom(src / "DCIS" / "IMG0003.dcm", rgb, photometric="RGB", phi={**PHI, "PatientID": "MRN-0002-OTHER"})
    ds_path = tmp_path / "out" / "ds"
    report = ingest(src, "C", ds_path, layout="dicom")
    assert report.added == 5  # 1 + 3 frames + 1

    stored = every_stored_text_and_byte(tmp_path / "out")
    secrets = [*PHI.values(), "MRN-0002-OTHER", "Roe", "Jessamine", "Hidden Lane", "Nowhere"]
    import pydicom

    for path in (single, cine):
        d = pydicom.dcmread(path)
        secrets += [d.SOPInstanceUID, d.StudyInstanceUID, d.SeriesInstanceUID]
    for secret in secrets:
        assert secret.encode() not in stored, f"{secret!r} found in the dataset folder"
        assert secret.lower().encode() not in stored.lower()

    rows = ImageDataset(ds_path).read_table().to_pylist()
    pseudo = pseudonymizer_for(ds_path)
    by_patient = {r["patient_id"] for r in rows}
    assert by_patient == {pseudo.patient("MRN-4711-SECRET"), pseudo.patient("MRN-0002-OTHER")}
    cine_rows = [r for r in rows if "#frame=" in r["source"]]
    assert len(cine_rows) == 3 and len({r["case_id"] for r in cine_rows}) == 1  # frames of one file: one case
    assert all("Roe" not in r["source"] and "IMG0001" not in r["source"] for r in rows)  # paths are hashed


def test_dicom_crop_spacing_and_gray(tmp_path, rows_by_file):
    src = tmp_path / "pacs"
    pixels = frame(1)
    us_dicom(src / "DCIS" / "a.dcm", pixels)
    rgb = np.stack([frame(5), frame(6), frame(7)], axis=-1)
    us_dicom(src / "upgrade" / "b.dcm", rgb, photometric="RGB", phi={"PatientID": "P2"})
    us_dicom(src / "upgrade" / "c.dcm", frame(8), region=False, phi={"PatientID": "P3"})
    report = ingest(src, "C", tmp_path / "ds", layout="dicom", allow_burned_in=True)
    assert report.burned_in_allowed == 1 and "--allow-burned-in" in report.summary()
    rows = rows_by_file(tmp_path / "ds", src, "dicom")
    a = rows["DCIS/a.dcm"]
    h, w = REGION["y1"] - REGION["y0"] + 1, REGION["x1"] - REGION["x0"] + 1
    assert (a["height"], a["width"]) == (h, w)
    assert a["spacing_mm"] == pytest.approx(0.12)
    img = np.asarray(Image.open(io.BytesIO(a["image"])))
    assert np.array_equal(img, pixels[REGION["y0"]:REGION["y1"] + 1, REGION["x0"]:REGION["x1"] + 1])
    b = np.asarray(Image.open(io.BytesIO(rows["upgrade/b.dcm"]["image"])))
    expected = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))[REGION["y0"]:REGION["y1"] + 1, REGION["x0"]:REGION["x1"] + 1]
    assert np.abs(b.astype(int) - expected).max() <= 1
    c = rows["upgrade/c.dcm"]
    assert (c["height"], c["width"]) == (50, 80) and c["spacing_mm"] is None  # no region: whole frame


def test_dicom_frame_choice_and_csv_labels(tmp_path):
    src = tmp_path / "pacs"
    us_dicom(src / "cine.dcm", np.stack([frame(2), frame(3), frame(4)]))
    with open(src / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file", "label", "age"], ["cine.dcm", "upgrade", "51"]])
    report = ingest(src, "C", tmp_path / "ds", layout="dicom", clinical_csv=src / "labels.csv", frames="middle")
    rows = ImageDataset(tmp_path / "ds").read_table().to_pylist()
    assert report.added == 1 and len(rows) == 1 and rows[0]["label"] == 1 and rows[0]["age"] == 51
    middle = np.asarray(Image.open(io.BytesIO(rows[0]["image"])))
    assert np.array_equal(middle, frame(3)[REGION["y0"]:REGION["y1"] + 1, REGION["x0"]:REGION["x1"] + 1])


def test_dicom_without_pixel_data_or_damaged_is_refused(tmp_path):
    src = tmp_path / "pacs"
    us_dicom(src / "DCIS" / "ok.dcm", frame(1))
    us_dicom(src / "DCIS" / "report.dcm", None)
    damaged = us_dicom(src / "DCIS" / "cut.dcm", frame(2), phi={"PatientID": "P9"})
    damaged.write_bytes(damaged.read_bytes()[:-1500])
    us_dicom(src / "DCIS" / "ct.dcm", frame(3), modality="CT", phi={"PatientID": "P8"})
    ds_path = tmp_path / "ds"
    with pytest.raises(IngestError) as err:
        ingest(src, "C", ds_path, layout="dicom")
    message = str(err.value)
    assert "DCIS/report.dcm: has no pixel data" in message
    assert "DCIS/cut.dcm" in message and "ct.dcm" in message and "not US or MG" in message
    assert not ds_path.exists() and not list(Path(os.environ["XDG_CONFIG_HOME"]).rglob("*.salt"))
    report = ingest(src, "C", ds_path, layout="dicom", quarantine=tmp_path / "q")
    assert report.added == 1 and report.quarantined == 3


def test_dicom_12_bit_monochrome1_is_inverted_and_kept_16_bit(tmp_path):
    pixels = np.random.default_rng(3).integers(0, 4096, (50, 80), dtype=np.uint16)
    us_dicom(tmp_path / "pacs" / "upgrade" / "a.dcm", pixels, photometric="MONOCHROME1", region=False, bits=12)
    ingest(tmp_path / "pacs", "C", tmp_path / "ds", layout="dicom", allow_burned_in=True)
    row = ImageDataset(tmp_path / "ds").read_table().to_pylist()[0]
    img = Image.open(io.BytesIO(row["image"]))
    assert img.mode == "I;16" and np.array_equal(np.asarray(img), 4095 - pixels)


def test_dicom_without_a_region_to_crop_is_refused_unless_allowed(tmp_path):
    """Burned-in text cannot be cropped away without an ultrasound region: such files are quarantined
    unless the user vouches for them, and BurnedInAnnotation YES is refused even then."""
    src = tmp_path / "pacs"
    us_dicom(src / "DCIS" / "ok.dcm", frame(1))
    us_dicom(src / "DCIS" / "mammo.dcm", frame(2), region=False, modality="MG", phi={"PatientID": "P2"})
    us_dicom(src / "upgrade" / "burned.dcm", frame(3), region=False,
             phi={"PatientID": "P3", "BurnedInAnnotation": "YES"})
    report = ingest(src, "C", tmp_path / "ds", layout="dicom", quarantine=tmp_path / "q")
    assert (report.added, report.quarantined, report.burned_in_allowed) == (1, 2, 0)
    rejected = (tmp_path / "q" / "rejected-C.PHI.csv").read_text()
    assert "mammo.dcm" in rejected and "pass --allow-burned-in" in rejected
    assert "burned.dcm" in rejected and "BurnedInAnnotation is YES" in rejected
    report = ingest(src, "C", tmp_path / "ds", layout="dicom", quarantine=tmp_path / "q", allow_burned_in=True)
    assert (report.added, report.quarantined, report.burned_in_allowed) == (1, 1, 1)
    assert "burned.dcm" in (tmp_path / "q" / "rejected-C.PHI.csv").read_text()


def _region_without_coordinates(path: Path) -> None:
    import pydicom

    d = pydicom.dcmread(path)
    del d.SequenceOfUltrasoundRegions[1].RegionLocationMaxX1
    d.save_as(path)


def test_damaged_dicom_tags_and_oversized_files_are_quarantined(tmp_path):
    src = tmp_path / "pacs"
    us_dicom(src / "DCIS" / "ok.dcm", frame(1))
    _region_without_coordinates(us_dicom(src / "DCIS" / "noregion.dcm", frame(2), phi={"PatientID": "P2"}))
    bad_spacing = us_dicom(src / "DCIS" / "spacing.dcm", frame(3), region=False, phi={"PatientID": "P3"})
    import pydicom

    d = pydicom.dcmread(bad_spacing)
    d.PixelSpacing = ["0", "0.1"]  # a zero spacing
    d.save_as(bad_spacing)
    us_dicom(src / "upgrade" / "big.dcm", np.zeros((3, 60, 90), np.uint8), phi={"PatientID": "P4"})
    report = ingest(src, "C", tmp_path / "ds", layout="dicom", quarantine=tmp_path / "q", allow_burned_in=True,
                    limits=DecodeLimits(max_pixels=5000, max_frames=2))
    assert (report.added, report.quarantined) == (1, 3)
    rejected = {row["file"]: row["rejected_reason"]
                for row in csv.DictReader(open(tmp_path / "q" / "rejected-C.PHI.csv"))}
    assert "lacks RegionLocationMaxX1" in rejected["DCIS/noregion.dcm"]
    assert "PixelSpacing" in rejected["DCIS/spacing.dcm"]
    assert "exceed the limit" in rejected["upgrade/big.dcm"]
