"""`diffkd ingest`, folder layout: conversion, pseudonyms, the bad-input contract, idempotence, add-a-center."""
from __future__ import annotations

import csv
import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from diffkd.cli import main as cli_main
from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import IngestError, default_salt_path, ingest, pseudonymizer_for

RNG = np.random.default_rng(0)


def speckle(h: int = 32, w: int = 40, seed: int | None = None) -> np.ndarray:
    rng = RNG if seed is None else np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def save(path: Path, arr_or_img) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    img.save(path)
    return path


def write_csv(path: Path, rows: list[dict], header: list[str] | None = None) -> Path:
    header = header or list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def make_source(root: Path, patients=("MRN-0001", "MRN-0002", "MRN-0003"), per_patient: int = 2, prefix="p",
                seed: int = 0) -> Path:
    """A flat folder described by clinical.csv (headers in other spellings), masks beside the images."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, patient in enumerate(patients):
        for k in range(per_patient):
            name = f"images/{prefix}{p}_{k}.png"
            save(root / name, rng.integers(0, 256, (32, 40), dtype=np.uint8))
            mask = np.zeros((32, 40), np.uint8)
            mask[8:16, 10:20] = 1  # a 0/1 mask: must come out 0/255
            save(root / f"masks/{prefix}{p}_{k}_mask.png", mask)
            rows.append({"Image": name, "Mask": f"masks/{prefix}{p}_{k}_mask.png", "MRN": patient,
                         "Case_ID": f"case-{prefix}{p}", "Outcome": "upgrade" if p == 0 else "DCIS",
                         "Age": str(40 + p), "BI-RADS": ["4A", "4c", "BI-RADS 5"][p % 3], "Palpable": "yes",
                         "lesion size": "", "Patient Name": f"Secret Person {p}"})
    write_csv(root / "clinical.csv", rows)
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under `root` (the dataset and its salt beside it): bytes, mtime, inode."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            st = path.stat()
            out[str(path.relative_to(root))] = (path.read_bytes(), st.st_mtime_ns, st.st_ino)
    return out


@pytest.fixture
def ds_path(tmp_path) -> Path:
    return tmp_path / "work" / "ds"


def test_folder_csv_ingest_stores_converted_images_and_pseudonyms(tmp_path, ds_path, rows_by_file):
    src = make_source(tmp_path / "src")
    report = ingest(src, "A", ds_path)
    assert report.written and report.added == 6 and report.labels_added == {"DCIS": 4, "upgrade": 2}
    assert any("Patient Name" in w for w in report.warnings)  # unknown columns are named, not stored
    ds = ImageDataset(ds_path)
    rows = ds.read_table().to_pylist()
    assert len(rows) == 6
    first = rows_by_file(ds_path, src, "folder")["images/p0_0.png"]
    assert first["label"] == 1 and first["synthetic"] is False
    assert first["birads"] == "4a" and first["age"] == 40 and first["palpable"] is True
    assert first["lesion_size_mm"] is None  # empty cell -> null
    assert (first["height"], first["width"]) == (32, 40)
    assert first["sha256"] == hashlib.sha256(first["image"]).hexdigest()
    stored = np.asarray(Image.open(io.BytesIO(first["image"])))
    assert np.array_equal(stored, np.asarray(Image.open(src / "images/p0_0.png")))
    mask = np.asarray(Image.open(io.BytesIO(first["mask"])))
    assert set(np.unique(mask)) == {0, 255} and mask[10, 12] == 255
    # ids: salted, stable, grouped: 3 patients, 3 cases; raw ids nowhere in the dataset
    assert len({r["patient_id"] for r in rows}) == 3 and len({r["case_id"] for r in rows}) == 3
    pseudo = pseudonymizer_for(ds_path)
    assert first["patient_id"] == pseudo.patient("MRN-0001") and first["case_id"] == pseudo.case("A", "case-p0")
    blob = b"".join(data for data, _, _ in snapshot(ds_path).values())
    blob += str(ds.read_table(columns=[c for c in ds.read_table().column_names
                                       if c not in ("image", "mask")]).to_pylist()).encode()
    for secret in (b"MRN-0001", b"Secret Person", b"case-p0", b"p0_0", str(src).encode()):
        assert secret not in blob  # nor file names, nor the source's absolute path
    # the salt: in the user's private config folder, not beside the dataset; only its fingerprint in the manifest
    salt_file = default_salt_path(ds)
    assert salt_file.is_relative_to(os.environ["XDG_CONFIG_HOME"]) and not (ds_path.parent / ".ds.salt").exists()
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt_hex = salt_file.read_text().strip()
    assert salt_hex.encode() not in blob
    source = ds.manifest["centers"]["A"]["sources"][0]
    assert source["fingerprint"] == report.fingerprint and source["rows_added"] == 6
    assert source["labels_added"] == {"DCIS": 4, "upgrade": 2} and source["ingested"]
    assert len(source["salt_fingerprint"]) == 16


def test_label_folders_without_csv(tmp_path, ds_path):
    for label in ("DCIS", "upgrade", "1"):
        for i in range(2):
            save(tmp_path / "src" / label / f"{label}{i}.png", speckle())
    save(tmp_path / "src" / "DCIS" / "DCIS0_mask.png", np.full((32, 40), 255, np.uint8))
    report = ingest(tmp_path / "src", "A", ds_path)
    assert report.labels_added == {"DCIS": 2, "upgrade": 4}
    assert any("own patient" in w for w in report.warnings)
    rows = ImageDataset(ds_path).read_table().to_pylist()
    assert sum(r["mask"] is not None for r in rows) == 1
    assert len({r["patient_id"] for r in rows}) == 6


def test_image_mode_policy(tmp_path, ds_path, rows_by_file):
    """RGB -> luminance, 16-bit kept, palette expanded, opaque RGBA accepted; the stored pixels prove it."""
    src = tmp_path / "src"
    rgb = np.stack([speckle(seed=1), speckle(seed=2), speckle(seed=3)], axis=-1)
    save(src / "DCIS/rgb.png", rgb)
    deep = (np.arange(32 * 40).reshape(32, 40) * 37 % 65536).astype(np.uint16)
    save(src / "DCIS/deep.png", deep)
    save(src / "DCIS/palette.png", Image.fromarray(rgb).quantize(16))
    rolled = np.roll(rgb, 5, axis=0)
    save(src / "upgrade/opaque.png", np.dstack([rolled, np.full((32, 40), 255, np.uint8)]))
    save(src / "upgrade/bilevel.png", Image.fromarray(speckle(seed=4) > 128))
    save(src / "upgrade/photo.jpg", rgb)
    ingest(src, "A", ds_path)
    rows = {k.split("/")[-1]: r for k, r in rows_by_file(ds_path, src, "folder").items()}
    decoded = {k: Image.open(io.BytesIO(r["image"])) for k, r in rows.items()}
    assert all(img.mode in ("L", "I;16") for img in decoded.values())
    assert np.array_equal(np.asarray(decoded["rgb.png"]), np.asarray(Image.fromarray(rgb).convert("L")))
    assert decoded["deep.png"].mode == "I;16" and np.array_equal(np.asarray(decoded["deep.png"]), deep)
    assert np.array_equal(np.asarray(decoded["opaque.png"]), np.asarray(Image.fromarray(rolled).convert("L")))
    palette = np.asarray(Image.fromarray(rgb).quantize(16).convert("RGB").convert("L"))
    assert np.array_equal(np.asarray(decoded["palette.png"]), palette)
    assert set(np.unique(np.asarray(decoded["bilevel.png"]))) <= {0, 255}


def test_png_metadata_is_not_carried_into_the_dataset(tmp_path, ds_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Comment", "patient Jane Roe")
    src = tmp_path / "src"
    (src / "DCIS").mkdir(parents=True)
    Image.fromarray(speckle()).save(src / "DCIS/a.png", pnginfo=info)
    ingest(src, "A", ds_path)
    row = ImageDataset(ds_path).read_table().to_pylist()[0]
    assert b"Jane Roe" not in row["image"] and Image.open(io.BytesIO(row["image"])).info.get("Comment") is None
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["image"]))), np.asarray(Image.open(src / "DCIS/a.png")))


# ---- bad input: a clear message, the dataset untouched ------------------------------------------------

@pytest.fixture
def existing(tmp_path, ds_path):
    """A dataset with center A ingested, and a snapshot of every file in its folder."""
    ingest(make_source(tmp_path / "src_a"), "A", ds_path)
    return snapshot(ds_path.parent)


def _csv_source(root: Path, rows: list[dict], images: dict[str, np.ndarray | Image.Image] | None = None) -> Path:
    for name, arr in (images or {}).items():
        save(root / name, arr)
    write_csv(root / "clinical.csv", rows)
    return root


def _row(file: str, patient: str = "B-1", label="DCIS", **extra) -> dict:
    return {"file": file, "patient_id": patient, "label": label, **extra}


def _truncated(root: Path) -> Path:
    path = save(root / "a.png", speckle(64, 64))
    path.write_bytes(path.read_bytes()[:-200])
    return root


BAD_INPUTS = {
    "truncated image": (
        lambda r: _csv_source(_truncated(r), [_row("a.png")]), ["a.png", "truncated"]),
    "not an image": (
        lambda r: (r.mkdir(parents=True), (r / "a.png").write_text("hello"),
                   _csv_source(r, [_row("a.png")]))[-1], ["a.png", "unreadable"]),
    "transparent RGBA": (
        lambda r: _csv_source(r, [_row("a.png")], {"a.png": np.dstack([speckle()] * 3 + [speckle()])}),
        ["a.png", "transparent", "Flatten"]),
    "float image": (
        lambda r: _csv_source(r, [_row("a.tif")], {"a.tif": Image.fromarray(speckle().astype(np.float32))}),
        ["a.tif", "'F'", "not supported"]),
    "missing required column": (
        lambda r: _csv_source(r, [{"file": "a.png", "label": "DCIS"}], {"a.png": speckle()}),
        ["missing required column", "patient_id", "mrn"]),
    "unknown label": (
        lambda r: _csv_source(r, [_row("a.png"), _row("b.png", label="maybe")],
                              {"a.png": speckle(), "b.png": speckle()}),
        ["line 3", "'maybe'", "accepted values", "upgrade", "--label-map"]),
    "listed but missing": (
        lambda r: _csv_source(r, [_row("a.png"), _row("gone.png")], {"a.png": speckle()}),
        ["line 3", "gone.png", "listed but not found"]),
    "out-of-range clinical value": (
        lambda r: _csv_source(r, [_row("a.png", age="140")], {"a.png": speckle()}),
        ["line 2", "'age'", "140", "18-100"]),
    "unparseable clinical value": (
        lambda r: _csv_source(r, [_row("a.png", palpable="sometimes", birads="7")], {"a.png": speckle()}),
        ["'palpable'", "'sometimes'", "'birads'"]),
    "case id on two patients": (
        lambda r: _csv_source(r, [_row("a.png", case_id="K1"), _row("b.png", patient="B-2", case_id="K1")],
                              {"a.png": speckle(), "b.png": speckle()}),
        ["case id 'K1'", "line 2", "line 3", "different patient"]),
    "file listed twice": (
        lambda r: _csv_source(r, [_row("a.png"), _row("a.png")], {"a.png": speckle()}),
        ["line 3", "already listed on line 2"]),
    "same image, different labels": (
        lambda r: _csv_source(r, [_row("a.png"), _row("b.png", label="upgrade")],
                              {"a.png": speckle(seed=9), "b.png": speckle(seed=9)}),
        ["b.png", "same image as line 2", "different label"]),
    "patient in another center": (
        lambda r: _csv_source(r, [_row("a.png", patient="MRN-0002")], {"a.png": speckle()}),
        ["already in center A", "one center"]),
    "path outside the source": (
        lambda r: _csv_source(r, [_row("../a.png")], {"a.png": speckle()}), ["leaves SRC"]),
    "mask of another size": (
        lambda r: _csv_source(r, [_row("a.png", mask="m.png")], {"a.png": speckle(), "m.png": speckle(10, 10)}),
        ["m.png", "10x10", "40x32"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(case, tmp_path, ds_path, existing):
    build, expected = BAD_INPUTS[case]
    src = build(tmp_path / "bad")
    with pytest.raises(IngestError) as err:
        ingest(src, "B", ds_path)
    message = str(err.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert snapshot(ds_path.parent) == existing


def test_empty_source_is_an_error(tmp_path, ds_path, existing):
    (tmp_path / "empty" / "DCIS").mkdir(parents=True)
    with pytest.raises(IngestError, match="no images found"):
        ingest(tmp_path / "empty", "B", ds_path)
    with pytest.raises(IngestError, match="does not exist"):
        ingest(tmp_path / "nowhere", "B", ds_path)
    assert snapshot(ds_path.parent) == existing


def test_unlisted_images_warn_and_nan_becomes_null(tmp_path, ds_path):
    src = _csv_source(tmp_path / "src", [_row("a.png", age="NaN", birads="n/a")],
                      {"a.png": speckle(), "extra.png": speckle(seed=5)})
    report = ingest(src, "A", ds_path)
    assert report.added == 1
    assert any("not listed" in w and "extra.png" in w for w in report.warnings)
    row = ImageDataset(ds_path).read_table().to_pylist()[0]
    assert row["age"] is None and row["birads"] is None


def test_quarantine_sets_rejected_rows_aside_and_ingests_the_rest(tmp_path, ds_path):
    src = _csv_source(tmp_path / "src", [_row("a.png"), _row("b.png", age="300"), _row("c.png", label="??"),
                                         _row("gone.png"), _row("d.png", patient="B-2")],
                      {"a.png": speckle(seed=1), "b.png": speckle(seed=2), "c.png": speckle(seed=3),
                       "d.png": speckle(seed=4)})
    report = ingest(src, "B", ds_path, quarantine=tmp_path / "q")
    assert report.added == 2 and report.quarantined == 3
    with open(report.quarantine_file, newline="") as f:
        rejected = list(csv.DictReader(f))
    assert [r["file"] for r in rejected] == ["b.png", "c.png", "gone.png"]
    assert "age" in rejected[0]["rejected_reason"] and "300" in rejected[0]["rejected_reason"]
    assert rejected[0]["patient_id"] == "B-1"  # the row as it was, to fix and ingest again
    assert "not found" in rejected[2]["rejected_reason"]
    assert ImageDataset(ds_path).read_table().num_rows == 2


def test_reingest_changes_nothing_and_new_images_are_added(tmp_path, ds_path):
    src = make_source(tmp_path / "src")
    ingest(src, "A", ds_path)
    before = snapshot(ds_path.parent)
    again = ingest(src, "A", ds_path)
    assert not again.written and again.already_present == 6 and again.added == 0
    assert snapshot(ds_path.parent) == before  # bytes, mtimes and inodes, manifest included
    same = ingest(src, "A", ds_path, replace=True)
    assert not same.written and snapshot(ds_path.parent) == before
    # a second export with the old images plus new ones: only the new ones are added
    more = make_source(tmp_path / "src2", patients=("MRN-0004",), prefix="q", seed=1)
    for name in ("images", "masks"):
        for f in (src / name).iterdir():
            (more / name / f.name).write_bytes(f.read_bytes())
    rows = list(csv.DictReader(open(src / "clinical.csv"))) + list(csv.DictReader(open(more / "clinical.csv")))
    write_csv(more / "clinical.csv", rows)
    report = ingest(more, "A", ds_path)
    assert report.added == 2 and report.already_present == 6 and report.center_rows == 8
    assert len(ImageDataset(ds_path).manifest["centers"]["A"]["sources"]) == 2


def test_adding_a_center_rewrites_no_other_center(tmp_path, ds_path):
    ingest(make_source(tmp_path / "a"), "A", ds_path)
    a_files = {p: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in ImageDataset(ds_path).files(["A"])}
    ingest(make_source(tmp_path / "b", patients=("B-1", "B-2"), prefix="b", seed=7), "B", ds_path)
    assert {p: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in a_files} == a_files
    ds = ImageDataset(ds_path)
    assert ds.centers() == ["A", "B"] and ds.read_table().num_rows == 10


def test_duplicate_images_within_a_source_are_stored_once(tmp_path, ds_path):
    src = _csv_source(tmp_path / "src", [_row("a.png", case_id="K"), _row("copy.png", case_id="K")],
                      {"a.png": speckle(seed=3), "copy.png": speckle(seed=3)})
    report = ingest(src, "A", ds_path)
    assert report.added == 1 and report.duplicates == 1
    assert any("same image" in w for w in report.warnings)


def test_salt_must_stay_the_same_and_outside_the_dataset(tmp_path, ds_path):
    ingest(make_source(tmp_path / "a"), "A", ds_path)
    default_salt_path(ImageDataset(ds_path)).rename(tmp_path / "moved.salt")
    src_b = make_source(tmp_path / "b", patients=("B-1",), prefix="b", seed=3)
    with pytest.raises(IngestError, match="does not exist"):
        ingest(src_b, "B", ds_path)
    (tmp_path / "other.salt").write_text("ab" * 32)
    (tmp_path / "other.salt").chmod(0o600)
    with pytest.raises(IngestError, match="not the salt"):
        ingest(src_b, "B", ds_path, salt=tmp_path / "other.salt")
    with pytest.raises(IngestError, match="inside the dataset"):
        ingest(src_b, "B", ds_path, salt=ds_path / "x.salt")
    assert ingest(src_b, "B", ds_path, salt=tmp_path / "moved.salt").added == 2


def test_a_salt_other_users_can_read_is_refused(tmp_path, ds_path):
    salt = tmp_path / "shared.salt"
    salt.write_text("ab" * 32)
    salt.chmod(0o644)
    with pytest.raises(IngestError, match="open to other users.*chmod 600"):
        ingest(make_source(tmp_path / "a"), "A", ds_path, salt=salt)
    assert not ds_path.exists()


def test_cli_ingest_and_errors(tmp_path, ds_path, capsys):
    src = make_source(tmp_path / "src")
    assert cli_main(["ingest", str(src), "--center", "A", "--dataset", str(ds_path)]) == 0
    assert "6 image(s) added" in capsys.readouterr().out
    bad = _csv_source(tmp_path / "bad", [_row("a.png", label="maybe")], {"a.png": speckle()})
    assert cli_main(["ingest", str(bad), "--center", "B", "--dataset", str(ds_path)]) == 2
    err = capsys.readouterr().err
    assert "diffkd ingest: error:" in err and "'maybe'" in err and "Traceback" not in err


def test_label_map_and_skip(tmp_path, ds_path):
    src = _csv_source(tmp_path / "src", [_row("a.png", label="benign"), _row("b.png", label="malignant"),
                                         _row("c.png", label="normal")],
                      {"a.png": speckle(seed=1), "b.png": speckle(seed=2), "c.png": speckle(seed=3)})
    report = ingest(src, "A", ds_path, label_map="benign=0,malignant=1,normal=skip")
    assert report.labels_added == {"DCIS": 1, "upgrade": 1} and report.skipped == 1
    with pytest.raises(IngestError, match="NAME=VALUE"):
        ingest(src, "A", ds_path, label_map="benign")


def test_new_images_may_join_a_stored_case_only_with_the_same_values(tmp_path, ds_path):
    first = _csv_source(tmp_path / "one", [_row("a.png", case_id="K", lesion_size_mm="13.1")], {"a.png": speckle(seed=1)})
    ingest(first, "A", ds_path)
    second = _csv_source(tmp_path / "two", [_row("b.png", case_id="K", lesion_size_mm="13.1")], {"b.png": speckle(seed=2)})
    assert ingest(second, "A", ds_path).added == 1  # 13.1 stored as float32 still compares equal
    third = _csv_source(tmp_path / "three", [_row("c.png", case_id="K", lesion_size_mm="13.2")],
                        {"c.png": speckle(seed=3)})
    with pytest.raises(IngestError, match="case id 'K' is already in the center with a different lesion_size_mm"):
        ingest(third, "A", ds_path)


def test_duplicates_are_found_by_pixels_not_by_encoding(tmp_path, ds_path):
    pixels = speckle(seed=11)
    src = tmp_path / "src"
    save(src / "DCIS" / "a.png", pixels)
    Image.fromarray(pixels).convert("RGB").save(src / "DCIS" / "a_copy.png", compress_level=1)
    report = ingest(src, "A", ds_path)
    assert report.added == 1 and report.duplicates == 1
    # a center written by an older encoder: same pixels, other bytes -> re-ingest still finds them
    ds = ImageDataset(ds_path)
    table = ds.read_table(["A"])
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=9)
    recoded = table.set_column(table.column_names.index("image"), "image", pa.array([buf.getvalue()]))
    recoded = recoded.set_column(recoded.column_names.index("sha256"), "sha256",
                                 pa.array([hashlib.sha256(buf.getvalue()).hexdigest()]))
    ds.write_center("A", recoded)
    before = snapshot(ds_path.parent)
    again = ingest(src, "A", ds_path)
    assert again.already_present == 1 and not again.written and snapshot(ds_path.parent) == before


def test_a_dataset_names_its_own_outcomes(tmp_path, ds_path, capsys):
    """--label-names is stored in the manifest, read from label folders and cells, used by the summary
    and `data info`; another ingest naming other outcomes is refused with both pairs named."""
    src = tmp_path / "src"
    for label, seed in (("benign", 1), ("Malignant", 2), ("0", 3), ("1", 4)):
        save(src / label / f"img{seed}.png", speckle(seed=seed))
    assert cli_main(["ingest", str(src), "--center", "A", "--dataset", str(ds_path),
                     "--label-names", "benign,malignant"]) == 0
    out = capsys.readouterr().out
    assert "(benign 2, malignant 2)" in out and "DCIS" not in out and "upgrade" not in out
    ds = ImageDataset(ds_path)
    assert ds.label_names == ("benign", "malignant")
    assert ds.manifest["label_vocabulary"] == {"0": "benign", "1": "malignant"}

    other = tmp_path / "other"
    save(other / "DCIS" / "x.png", speckle(seed=5))
    before = snapshot(ds_path.parent)
    with pytest.raises(IngestError, match=r"names its outcomes benign,malignant .* says DCIS,upgrade"):
        ingest(other, "B", ds_path, label_names="DCIS,upgrade")
    with pytest.raises(IngestError, match=r"label folder 'DCIS'.*accepted values: 0, 1, benign, malignant"):
        ingest(other, "B", ds_path)  # the dataset's names apply; DCIS means nothing here
    assert snapshot(ds_path.parent) == before
    save(other / "malignant" / "y.png", speckle(seed=6))
    (other / "DCIS" / "x.png").unlink()
    assert ingest(other, "B", ds_path).labels_added == {"malignant": 1}  # no --label-names: the dataset's

    assert cli_main(["data", "info", str(ds_path)]) == 0
    info = capsys.readouterr().out
    assert "benign (n=2)" in info and "malignant (n=3)" in info and "malignant %" in info and "DCIS" not in info
    with pytest.raises(IngestError, match="two different names"):
        ingest(other, "C", tmp_path / "ds2", label_names="same,Same")


def test_a_dataset_without_names_reads_as_dcis_upgrade(tmp_path, ds_path):
    import json

    src = make_source(tmp_path / "src")
    ingest(src, "A", ds_path)
    manifest_path = ds_path / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["label_vocabulary"]  # as written before datasets named their outcomes
    manifest_path.write_text(json.dumps(manifest))
    assert ImageDataset(ds_path).label_names == ("DCIS", "upgrade")
    with pytest.raises(IngestError, match="names its outcomes DCIS,upgrade"):
        ingest(make_source(tmp_path / "src2", patients=("MRN-9",), prefix="q", seed=9), "B", ds_path,
               label_names="no,yes")


CONCURRENT_INGEST = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s")
from diffkd.data.ingest import ingest
print(ingest(sys.argv[1], sys.argv[2], sys.argv[3], workers=1).summary(), flush=True)
"""


def test_two_ingests_into_one_dataset_at_once_keep_both_centers(tmp_path, ds_path):
    """Two processes ingest different centers into one new dataset at once. The test holds the dataset's
    lock until both have decoded their images and wait for it, then lets go: they race for it, one waits
    for the other, and neither manifest entry (nor the salt they share) is lost."""
    import fcntl
    import subprocess
    import sys
    import time

    sources = {c: make_source(tmp_path / c, patients=[f"{c}-{i}" for i in range(12)], per_patient=3,
                              prefix=c, seed=i) for i, c in enumerate(("A", "B"))}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    ds_path.parent.mkdir(parents=True)
    logs = {c: tmp_path / f"ingest-{c}.log" for c in sources}
    with open(ds_path.parent / f".{ds_path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = {c: subprocess.Popen([sys.executable, "-c", CONCURRENT_INGEST, str(src), c, str(ds_path)], env=env,
                                     stdout=subprocess.PIPE, stderr=logs[c].open("w"), text=True)
                 for c, src in sources.items()}
        deadline = time.monotonic() + 240
        while not all("another process is writing" in logs[c].read_text() for c in sources):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), \
                {c: logs[c].read_text()[-1000:] for c in sources}
            time.sleep(0.2)
        fcntl.flock(lock, fcntl.LOCK_UN)
    for c, p in procs.items():
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, logs[c].read_text()[-2000:]
        assert "36 image(s) added" in out
    ds = ImageDataset(ds_path)
    assert ds.centers() == ["A", "B"]
    assert {c: e["rows"] for c, e in ds.manifest["centers"].items()} == {"A": 36, "B": 36}
    table = ds.read_table(columns=["center", "patient_id"]).to_pylist()
    assert sorted({r["center"] for r in table}) == ["A", "B"] and len(table) == 72
    assert len({r["patient_id"] for r in table}) == 24
    salts = {s["salt_fingerprint"] for e in ds.manifest["centers"].values() for s in e["sources"]}
    assert len(salts) == 1  # the second ingest used the salt the first one created
