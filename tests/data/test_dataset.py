"""The dataset contract: schema conformance, atomic per-center writes, manifest bookkeeping."""
import hashlib
import itertools
import math
import os

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

import diffkd.data.dataset as dataset_module
from diffkd.data.dataset import DatasetError, ImageDataset, conform
from diffkd.data.schema import ClinicalEncoding, arrow_schema, birads_rank, normalize_birads, parse_label


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


def test_open_returns_a_dataset_itself_and_opens_a_path(tmp_path, monkeypatch):
    ds = ImageDataset(tmp_path / "ds")
    assert ImageDataset.open(ds) is ds
    assert ImageDataset.open(tmp_path / "ds").root == ds.root
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ImageDataset.open("~/ds").root == ds.root  # the one resolver every location goes through


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
    assert all("/_synthetic/center=A/" in p for p in ds.files(synthetic=True))
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
    (tmp_path / "ds" / "_manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="_manifest.json"):
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
    with pytest.raises(ValueError, match="DCIS/upgrade or 0/1"):
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


def _with_synthetic(tmp_path) -> ImageDataset:
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 3))
    ds.write_center("B", rows("B", 2))
    synth = rows("A", 4, start=100)
    ds.write_synthetic("A", synth.set_column(synth.column_names.index("synthetic"), "synthetic",
                                             pa.array([True] * 4)), run_id="run1")
    return ds


ECOSYSTEM_READS = """
import json, sys
import pandas as pd, pyarrow.dataset as pds
ds = sys.argv[1]
frame = pd.read_parquet(ds)
table = pds.dataset(ds, partitioning="hive").to_table()
out = {"pandas": [list(frame.columns).count("center"), sorted(frame["center"].astype(str)),
                  bool(frame["synthetic"].any())],
       "pyarrow": [table.column_names.count("center"), sorted(table.column("center").to_pylist()),
                   any(table.column("synthetic").to_pylist())]}
try:
    import duckdb
except ImportError:
    duckdb = None
if duckdb is not None:
    rel = duckdb.sql(f"select center, synthetic from read_parquet('{ds}/**/*.parquet', hive_partitioning=true)")
    got = rel.fetchall()
    out["duckdb"] = [rel.columns.count("center"), sorted(c for c, s in got if not s), sum(s for _, s in got)]
print(json.dumps(out))
"""


def test_the_ecosystems_readers_open_the_dataset_with_no_options(tmp_path):
    """pandas, pyarrow (and DuckDB when installed) read the real rows, one string `center` column,
    in a fresh interpreter (no diffkd import); synthetic rows stay out of a plain read."""
    import json
    import subprocess
    import sys

    ds = _with_synthetic(tmp_path)
    assert sorted(os.listdir(ds.root)) == ["_manifest.json", "_synthetic", "center=A", "center=B"]
    result = subprocess.run([sys.executable, "-c", ECOSYSTEM_READS, ds.root], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout)
    real = ["A", "A", "A", "B", "B"]
    assert got["pandas"] == [1, real, False]
    assert got["pyarrow"] == [1, real, False]
    if "duckdb" in got:  # its glob descends into _synthetic/: those rows say so in their `synthetic` column
        assert got["duckdb"] == [1, real, 4]


def test_the_files_hold_the_center_only_in_their_path(tmp_path):
    import pyarrow.parquet as pq

    ds = _with_synthetic(tmp_path)
    for path in ds.files() + ds.files(synthetic=True):
        assert "center" not in pq.read_schema(path).names
    assert ds.read_table(["B"]).column("center").to_pylist() == ["B", "B"]
    assert ds.read_table(synthetic=True).column("center").to_pylist() == ["A"] * 4
    assert ds.read_table().schema == arrow_schema()


def test_the_png_columns_are_stored_plain_and_the_table_columns_compressed(tmp_path):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 3))
    [path] = ds.files(["A"])
    group = pq.ParquetFile(path).metadata.row_group(0)
    chunks = {group.column(i).path_in_schema: group.column(i) for i in range(group.num_columns)}
    for png in ("image", "mask"):  # already compressed: zstd and a dictionary would cost CPU for nothing
        assert chunks[png].compression == "UNCOMPRESSED"
        assert not chunks[png].has_dictionary_page
    assert chunks["patient_id"].compression == "ZSTD" and chunks["patient_id"].has_dictionary_page
    assert ds.read_table(["A"]).column("image").to_pylist() == rows("A", 3).column("image").to_pylist()


def _make_legacy(ds: ImageDataset) -> None:
    """Turn a dataset into what diffkd wrote before the layout change: manifest.json, synthetic/,
    files that carry their center."""
    import pyarrow.parquet as pq

    root = ds.root
    for center in ds.centers():
        for path in ds.files([center]) + ds.files([center], synthetic=True):
            table = pq.read_table(path)
            pq.write_table(table.append_column("center", pa.array([center] * table.num_rows)), path)
    os.rename(os.path.join(root, "_synthetic"), os.path.join(root, "synthetic"))
    os.rename(os.path.join(root, "_manifest.json"), os.path.join(root, "manifest.json"))


def test_a_dataset_in_the_old_layout_opens_and_is_converted_on_its_next_write(tmp_path):
    import pyarrow.parquet as pq

    ds = _with_synthetic(tmp_path)
    before = ds.read_table().sort_by("case_id")
    _make_legacy(ds)
    old = ImageDataset(tmp_path / "ds")
    assert old.exists() and old.centers() == ["A", "B"] and old.label_names == ("DCIS", "upgrade")
    assert old.read_table().sort_by("case_id").equals(before)
    assert old.read_table(synthetic=True).num_rows == 4
    assert all("/synthetic/center=A/" in p for p in old.files(synthetic=True))

    old.write_center("C", rows("C", 2))
    names = sorted(os.listdir(ds.root))
    assert "manifest.json" not in names and "synthetic" not in names
    assert {"_manifest.json", "_synthetic", "center=C"} <= set(names)
    for path in old.files() + old.files(synthetic=True):
        assert "center" not in pq.read_schema(path).names, path
    assert old.read_table(["A", "B"]).sort_by("case_id").equals(before)
    assert old.read_table(synthetic=True).num_rows == 4
    assert old.manifest["centers"]["A"]["rows"] == 3


def test_writers_of_one_dataset_wait_for_each_other(tmp_path, caplog):
    """A second process holding the lock makes a write wait (with a message) until it lets go."""
    import subprocess
    import sys
    import threading
    import time

    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 1))
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(1.5)"), str(tmp_path / ".ds.lock")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="diffkd.data"):
        ds.write_center("B", rows("B", 1))
    waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited > 0.5, waited
    assert "another process is writing" in caplog.text
    assert ds.centers() == ["A", "B"]
    # re-entrant within a thread, exclusive between threads
    order = []
    with ds.lock():
        with ds.lock():
            worker = threading.Thread(target=lambda: ds.write_center("C", rows("C", 1)) or order.append("C"))
            worker.start()
            time.sleep(0.3)
            order.append("holder")
    worker.join(timeout=30)
    assert order == ["holder", "C"] and ds.centers() == ["A", "B", "C"]


def test_birads_rank_orders_categories_and_keeps_missing():
    ranks = [birads_rank(v) for v in ["2", "4", "4C", "5", None, "BI-RADS 3"]]
    assert ranks[:4] == [0.0, 3.0, 4.0, 5.0]  # an unsubdivided 4 is the middle sub-category
    assert math.isnan(ranks[4]) and ranks[5] == 1.0


def _row_group_rows(path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_row_groups_are_bounded_by_rows_and_by_image_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(dataset_module, "ROW_GROUP_ROWS", 4)
    monkeypatch.setattr(dataset_module, "ROW_GROUP_BYTES", 100)
    table = rows("A", 10)  # images of 3-4 bytes: the row bound cuts
    big = table.set_column(table.schema.get_field_index("image"), "image",
                           pa.array([b"x" * {4: 60, 5: 60, 6: 60, 9: 150}.get(i, 10) for i in range(10)]))
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", table)
    assert _row_group_rows(ds.files(["A"])[0]) == [4, 4, 2]
    ds.write_center("A", big)  # a group ends before the row that would take it past 100 bytes
    assert _row_group_rows(ds.files(["A"])[0]) == [4, 1, 1, 3, 1]
    assert ds.read_table(["A"]).column("image").equals(big.column("image"))


def test_a_center_written_in_pieces_is_the_file_one_table_gives(tmp_path, monkeypatch):
    """Pieces cut where row groups start (as ingest cuts them) give the same file, byte for byte, as
    the whole table; the pieces may be read from the center's own files while it is replaced."""
    monkeypatch.setattr(dataset_module, "ROW_GROUP_ROWS", 3)
    table = rows("A", 8)
    whole, pieced = ImageDataset(tmp_path / "whole"), ImageDataset(tmp_path / "pieces")
    whole.write_center("A", table)
    pieced.write_center("A", iter([table.slice(0, 3), table.slice(3, 3).to_batches()[0], table.slice(6)]))
    [a], [b] = whole.files(["A"]), pieced.files(["A"])
    assert open(a, "rb").read() == open(b, "rb").read() and _row_group_rows(b) == [3, 3, 2]
    unnamed = {"files": 0, "created": 0, "updated": 0}
    assert whole.manifest["centers"]["A"] | unnamed == pieced.manifest["centers"]["A"] | unnamed
    # the stored rows streamed back into a new file, with more after them: one row group at a time
    assert [t.num_rows for t in pieced.iter_center("A")] == [3, 3, 2]
    pieced.write_center("A", itertools.chain(pieced.iter_center("A"), [rows("A", 2, start=8)]))
    assert pieced.read_table(["A"]).equals(pa.concat_tables([table, rows("A", 2, start=8)]).select(
        arrow_schema().names).cast(arrow_schema()))
    assert pieced.manifest["centers"]["A"]["rows"] == 10 and len(pieced.files(["A"])) == 1


def test_an_empty_stream_of_rows_is_refused_and_writes_nothing(tmp_path):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", rows("A", 2))
    before = sorted(p.name for p in (tmp_path / "ds").rglob("*"))
    with pytest.raises(DatasetError, match="empty partition"):
        ds.write_center("A", iter([rows("A", 0)]))
    with pytest.raises(DatasetError, match=r"center\(s\) \['B'\]"):
        ds.write_center("A", iter([rows("A", 2), rows("B", 1)]))
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*")) == before
    assert ds.read_table().num_rows == 2
