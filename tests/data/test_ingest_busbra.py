"""`diffkd ingest --layout busbra`, and one center per value of a CSV column (--center-by, --center-column)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffkd.cli import main as cli_main
from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import IngestError, ingest, ingest_centers, pseudonymizer_for
from diffkd.data.ingest.busbra import scanner_center_name
from diffkd.testing.busbra import BusbraCase, write_busbra_tree

DEVICES = {"logiq7": "GE Logiq 7 @10-14MHz", "logiq5": "GE Logiq 5 @10-12MHz",
           "aplio300": "Toshiba Aplio 300 @12-14 MHz"}


def test_scanner_names_are_short_and_deterministic():
    assert scanner_center_name("GE Logiq 7 @10-14MHz") == "logiq7"
    assert scanner_center_name("GE Logiq 5 @10-12MHz") == "logiq5"
    assert scanner_center_name("Toshiba Aplio 300 @12-14 MHz") == "aplio300"
    assert scanner_center_name("U-Systems @10-14MHz") == "usystems"


def test_one_center_per_scanner_with_patients_birads_and_masks(tmp_path):
    src = write_busbra_tree(tmp_path / "BUSBRA")
    report = ingest_centers(src, tmp_path / "ds", layout="busbra", center_by="device")
    ds = ImageDataset(tmp_path / "ds")
    assert ds.centers() == sorted(DEVICES) and ds.label_names == ("benign", "malignant")
    assert {r.center: r.added for r in report.reports} == {"aplio300": 2, "logiq5": 3, "logiq7": 5}
    assert report.values == {c: {d: n} for c, d, n in (("aplio300", DEVICES["aplio300"], 2),
                                                      ("logiq5", DEVICES["logiq5"], 3),
                                                      ("logiq7", DEVICES["logiq7"], 5))}
    table = ds.read_table()
    assert not {"histology", "Histology", "device", "Device"} & set(table.column_names)
    rows = {r["source"].split("|")[0]: r for r in table.to_pylist()}
    assert not any("carcinoma" in str(v) or "fibroadenoma" in str(v) for r in rows.values() for v in r.values())
    pseudo = pseudonymizer_for(tmp_path / "ds")

    def row(image: str) -> dict:  # the stored source names the file by a salted hash of its path only
        return rows[f"busbra:{pseudo.text(f'Images/{image}.png')}"]

    left, right = row("bus_0001-l"), row("bus_0001-r")
    assert left["patient_id"] == right["patient_id"] and left["case_id"] != right["case_id"]  # two views, one patient
    assert left["center"] == "logiq7" and left["label"] == 1 and left["birads"] == "4b"
    assert left["source"].endswith("|device=GE Logiq 7 @10-14MHz") and "bus_0001" not in left["source"]
    assert row("bus_0004-l")["birads"] == "5" and row("bus_0003-s")["label"] == 0
    mask = np.asarray(Image.open(io.BytesIO(left["mask"])))
    source_mask = np.asarray(Image.open(src / "Masks" / "mask_0001-l.png"))
    assert set(np.unique(mask)) == {0, 255} and np.array_equal(mask > 0, source_mask)
    assert len({r["patient_id"] for r in rows.values()}) == 6
    entry = ds.manifest["centers"]["logiq5"]["sources"][0]
    assert entry["center_column"] == "Device" and entry["center_values"] == {DEVICES["logiq5"]: 3}
    assert any("Histology" in w for w in report.warnings)
    assert "logiq7: 'GE Logiq 7 @10-14MHz' (5)" in report.summary()

    again = ingest_centers(src, tmp_path / "ds", layout="busbra", center_by="device")
    assert [r.added for r in again.reports] == [0, 0, 0] and not any(r.written for r in again.reports)


def test_busbra_into_one_center_keeps_the_scanner_in_the_source(tmp_path):
    src = write_busbra_tree(tmp_path / "BUSBRA")
    report = ingest(src, "rio", tmp_path / "ds", layout="busbra")
    assert report.added == 10 and report.labels_added == {"benign": 6, "malignant": 4}
    sources = {r["source"] for r in ImageDataset(tmp_path / "ds").read_table(columns=["source"]).to_pylist()}
    assert {s.split("|device=")[1] for s in sources} == set(DEVICES.values())


def _rewrite_csv(src: Path, change) -> None:
    path = src / "bus_data.csv"
    rows = list(csv.DictReader(path.open()))
    rows = [change(dict(r)) for r in rows]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_a_patient_on_two_scanners_is_refused_and_nothing_is_written(tmp_path):
    src = write_busbra_tree(tmp_path / "BUSBRA")
    _rewrite_csv(src, lambda r: {**r, "Device": DEVICES["logiq5"]} if r["ID"] == "bus_0001-r" else r)
    with pytest.raises(IngestError, match=r"(?s)center logiq5 refused.*line 3 .*bus_0001-r.png.*also has images "
                                          r"in center\(s\) logiq7"):
        ingest_centers(src, tmp_path / "ds", layout="busbra", center_by="device")
    assert not (tmp_path / "ds").exists()
    report = ingest_centers(src, tmp_path / "ds", layout="busbra", center_by="device", quarantine=tmp_path / "q")
    assert {r.center: r.quarantined for r in report.reports} == {"aplio300": 0, "logiq5": 1, "logiq7": 1}
    assert "bus_0001-r" in (tmp_path / "q" / "rejected-logiq5.PHI.csv").read_text()


def test_id_case_and_device_problems_name_the_row(tmp_path):
    src = write_busbra_tree(tmp_path / "BUSBRA")
    _rewrite_csv(src, lambda r: {**r, "Case": "7"} if r["ID"] == "bus_0002-l" else
                 {**r, "Device": ""} if r["ID"] == "bus_0003-s" else r)
    with pytest.raises(IngestError, match=r"line 6 .*Device.* cell is empty"):
        ingest_centers(src, tmp_path / "ds", layout="busbra", center_by="device")
    with pytest.raises(IngestError, match=r"line 4 column 'Case': Case '7' is not the number in ID 'bus_0002-l'"):
        ingest(src, "rio", tmp_path / "ds", layout="busbra")
    report = ingest_centers(src, tmp_path / "ds", layout="busbra", center_by="device", quarantine=tmp_path / "q")
    assert "bus_0003-s" in (tmp_path / "q" / "rejected-without-center.PHI.csv").read_text()
    assert "bus_0002-l" in (tmp_path / "q" / "rejected-logiq7.PHI.csv").read_text()
    assert sum(r.added for r in report.reports) == 8


def test_a_missing_mask_is_a_warning(tmp_path):
    src = write_busbra_tree(tmp_path / "BUSBRA", cases=[BusbraCase(9, "lr", "benign", "3", DEVICES["logiq7"])])
    (src / "Masks" / "mask_0009-r.png").unlink()
    report = ingest(src, "rio", tmp_path / "ds", layout="busbra")
    assert report.added == 2 and any("no mask file" in w and "bus_0009-r" in w for w in report.warnings)


def test_center_by_is_the_layouts_and_center_column_needs_a_csv(tmp_path):
    src = write_busbra_tree(tmp_path / "BUSBRA")
    with pytest.raises(IngestError, match="folder layout has no such grouping"):
        ingest_centers(src, tmp_path / "ds", layout="folder", center_by="device")
    with pytest.raises(IngestError, match="no column 'site'.*ID, Case, Histology"):
        ingest_centers(src, tmp_path / "ds", layout="busbra", center_column="site")
    plain = tmp_path / "plain" / "benign"
    plain.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(plain / "a.png")
    with pytest.raises(IngestError, match="has no CSV to read it from"):
        ingest_centers(tmp_path / "plain", tmp_path / "ds", center_column="site")


def _sites_source(root: Path) -> Path:
    """A folder export of two hospitals in one CSV (a `Site` column), one row without a site."""
    rng = np.random.default_rng(3)
    rows = []
    for i, (site, patient) in enumerate([("Hospital A", "a1"), ("Hospital A", "a1"), ("Hospital A", "a2"),
                                         ("St. Mary's", "m1"), ("St. Mary's", "m2"), ("", "x1")]):
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 20), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        rows.append({"file": f"img/{i}.png", "patient_id": patient, "label": i % 2, "Site": site, "birads": "4a"})
    with (root / "clinical.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_center_column_writes_one_center_per_site(tmp_path, capsys):
    src = _sites_source(tmp_path / "export")
    with pytest.raises(IngestError, match=r"line 7 column 'Site': the Site cell is empty"):
        ingest_centers(src, tmp_path / "ds", center_column="site")
    assert not (tmp_path / "ds").exists()
    args = ["ingest", str(src), "--center-column", "site", "--dataset", str(tmp_path / "ds"),
            "--quarantine", str(tmp_path / "q")]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "center hospital_a: 3 image(s) added" in out and "center st_mary_s: 2 image(s) added" in out
    ds = ImageDataset(tmp_path / "ds")
    assert ds.centers() == ["hospital_a", "st_mary_s"]
    by_center = {c: ds.read_table([c]).num_rows for c in ds.centers()}
    assert by_center == {"hospital_a": 3, "st_mary_s": 2}
    assert "img/5.png" in (tmp_path / "q" / "rejected-without-center.PHI.csv").read_text()
    assert ds.manifest["centers"]["st_mary_s"]["sources"][0]["center_values"] == {"St. Mary's": 2}


def test_cli_takes_one_way_of_naming_centers(tmp_path, capsys):
    src = write_busbra_tree(tmp_path / "BUSBRA")
    ds = str(tmp_path / "ds")
    with pytest.raises(SystemExit):
        cli_main(["ingest", str(src), "--layout", "busbra", "--center", "x", "--center-by", "device", "--dataset", ds])
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli_main(["ingest", str(src), "--layout", "busbra", "--center-by", "device", "--dataset", ds]) == 0
    assert "3 center(s), one per Device" in capsys.readouterr().out
