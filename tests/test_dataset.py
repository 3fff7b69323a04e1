"""The dataset contract: schema conformance, atomic per-center writes, manifest bookkeeping."""
import hashlib
import os

import pyarrow as pa
import pyarrow.fs
import pytest

from diffkd.data.dataset import DatasetError, ImageDataset, conform
from diffkd.data.schema import ClinicalEncoding, arrow_schema, normalize_birads, parse_label


def rows(center: str, n: int, start: int = 0) -> pa.Table:
    out = []
    for i in range(start, start + n):
        image = f"{center}-{i}".encode()
        out.append(dict(case_id=f"{center}-c{i}", patient_id=f"p{i}", center=center, modality="us", label=i % 2,
                        image=image, mask=None, height=4, width=4, spacing_mm=0.1, synthetic=False,
                        source=f"test:{i}", sha256=hashlib.sha256(image).hexdigest(), age=50.0 + i))
    table = pa.Table.from_pylist(out)
    for field in arrow_schema():
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(len(table), field.type))
    return table


def test_adding_a_center_leaves_other_centers_files_untouched(tmp_path):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 5))
    a_files = ds.files(["A"])
    before = {p: os.stat(p).st_mtime_ns for p in a_files}
    ds.write_center("B", rows("B", 3))
    assert {p: os.stat(p).st_mtime_ns for p in a_files} == before
    assert ds.centers() == ["A", "B"]
    assert ds.manifest["centers"]["B"]["rows"] == 3
    assert ds.read_table().num_rows == 8


def test_replacing_a_center_swaps_the_whole_partition(tmp_path):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 5))
    old = ds.files(["A"])
    ds.write_center("A", rows("A", 7))
    assert ds.read_table(["A"]).num_rows == 7
    assert not any(os.path.exists(p) for p in old)
    assert not [p for p in os.listdir(tmp_path / "ds") if p.startswith(".")]  # no staging left behind


def test_synthetic_rows_live_in_their_own_tree(tmp_path):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 2))
    synth = rows("A", 3, start=100)
    synth = synth.set_column(synth.column_names.index("synthetic"), "synthetic", pa.array([True] * 3))
    ds.write_synthetic("A", synth, run_id="run1")
    assert ds.read_table().num_rows == 2
    assert ds.read_table(synthetic=True).num_rows == 3
    assert all("/synthetic/" in p for p in ds.files(synthetic=True))
    with pytest.raises(DatasetError, match="already written"):
        ds.write_synthetic("A", synth, run_id="run1")
    ds.delete_synthetic()
    assert ds.read_table(synthetic=True).num_rows == 0 and ds.read_table().num_rows == 2


def test_bad_tables_are_refused_with_the_field_named(tmp_path):
    ds = ImageDataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="sha256"):
        conform(rows("A", 2).drop(["sha256"]))
    with pytest.raises(DatasetError, match="center"):
        ds.write_center("B", rows("A", 2))
    with pytest.raises(DatasetError, match="partition name"):
        ds.write_center("../evil", rows("../evil", 1))
    with pytest.raises(DatasetError, match="not in dataset"):
        ds.files(["nowhere"])
    assert not ds.exists()  # nothing was written by the refused calls


def test_a_corrupt_manifest_is_reported_with_its_path(tmp_path):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 1))
    (tmp_path / "ds" / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json"):
        ds.centers()


def test_uri_and_filesystem_object_address_the_same_dataset(tmp_path):
    ImageDataset(tmp_path / "ds").write_center("A", rows("A", 3))
    assert ImageDataset(f"file://{tmp_path}/ds").read_table().num_rows == 3
    sub = pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem())
    assert ImageDataset("ds", filesystem=sub).centers() == ["A"]


@pytest.mark.parametrize("raw,expected", [("4A", "4a"), ("BI-RADS 4c", "4c"), (5, "5"), ("5.0", "5"), ("", None),
                                          ("4", "4b")])
def test_birads_spellings_normalise(raw, expected):
    assert normalize_birads(raw) == expected


def test_unknown_birads_and_labels_are_errors_that_list_the_accepted_values():
    with pytest.raises(ValueError, match="4a"):
        normalize_birads("7")
    assert parse_label("Upgrade") == 1 and parse_label("DCIS") == 0 and parse_label(0.0) == 0
    with pytest.raises(ValueError, match="DCIS/upgrade"):
        parse_label("maybe")


def test_clinical_encoding_flags_missing_values_and_one_hots_categories():
    enc = ClinicalEncoding()
    full = enc.encode_row({"age": 55.0, "birads": "4c", "palpable": True})
    empty = enc.encode_row({})
    assert len(full) == len(empty) == enc.width == len(enc.names)
    named = dict(zip(enc.names, full))
    assert named["age"] == 0.0 and named["age_missing"] == 0.0
    assert named["birads=4c"] == 1.0 and named["birads=5"] == 0.0
    assert dict(zip(enc.names, empty))["age_missing"] == 1.0


def test_a_local_dataset_is_named_by_its_absolute_path(tmp_path, monkeypatch):
    # Ray workers and Tune trials run in other working directories: a relative name would point elsewhere there
    monkeypatch.chdir(tmp_path)
    assert ImageDataset("ds").uri == str(tmp_path / "ds")
    assert ImageDataset("file:///data/ds").uri == "file:///data/ds"  # URIs stay as given
