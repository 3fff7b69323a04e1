"""Ingest's memory: decoded images wait in a spool file (or, stored as they are, in their source
files), the center is written one row group at a time, and what is stored is what one table would
have given."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import diffkd.data.dataset as dataset_module
import diffkd.data.ingest as ingest_module
from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import ingest
from diffkd.data.ingest.spool import FileBytes, SourceChanged, Spool

SALT = bytes(range(32))


def _source(root: Path, n: int, size: int = 48, seed: int = 0) -> Path:
    """`n` distinct noise images in label folders, every third with a mask beside it."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("DCIS" if i % 2 else "upgrade")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"s{seed}_{i}.png")
        if i % 3 == 0:
            mask = np.zeros((size, size), np.uint8)
            mask[: size // 2, : size // 3] = 255
            Image.fromarray(mask).save(folder / f"s{seed}_{i}_mask.png")
    return root


def _row_groups(ds: ImageDataset) -> list[int]:
    [path] = ds.files(["A"])
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def test_the_spool_returns_what_was_put_from_many_threads_and_leaves_no_file(tmp_path):
    data = [os.urandom(n) for n in (0, 1, 5_000, 70_000)] * 8
    with Spool(tmp_path) as spool:
        with ThreadPoolExecutor(4) as pool:
            blobs = list(pool.map(spool.put, data))
        assert list(tmp_path.iterdir()) == []  # unlinked from the start: nothing to leave behind
        assert [spool.get(b) for b in blobs] == data
        assert [b.sha256 for b in blobs] == [hashlib.sha256(d).hexdigest() for d in data]
        assert spool.size == sum(map(len, data))


def test_an_ingest_in_small_row_groups_stores_what_one_table_would(tmp_path, monkeypatch):
    src, more = _source(tmp_path / "src", 12), _source(tmp_path / "more", 5, seed=1)
    one_group = ImageDataset(tmp_path / "one" / "ds")
    for source in (src, more):  # a new center, then rows added to it
        ingest(source, "A", one_group, salt=SALT)
    assert _row_groups(one_group) == [12, 5]  # the stored row group is kept, the new rows follow

    image_bytes = len((src / "DCIS" / "s0_1.png").read_bytes())
    monkeypatch.setattr(dataset_module, "ROW_GROUP_BYTES", 3 * image_bytes)
    small = ImageDataset(tmp_path / "small" / "ds")
    ingest(src, "A", small, salt=SALT)
    report = ingest(more, "A", small, salt=SALT)  # the stored rows stream into the new file, then the new ones
    assert report.written and report.added == 5 and report.center_rows == 17
    assert len(_row_groups(small)) >= 6 and max(_row_groups(small)) <= 3
    assert small.read_table().equals(one_group.read_table())
    unnamed = {"files": 0, "created": 0, "updated": 0, "sources": 0}
    assert small.manifest["centers"]["A"] | unnamed == one_group.manifest["centers"]["A"] | unnamed
    assert [{k: v for k, v in s.items() if k != "ingested"} for s in small.manifest["centers"]["A"]["sources"]] == \
        [{k: v for k, v in s.items() if k != "ingested"} for s in one_group.manifest["centers"]["A"]["sources"]]

    # --replace compares the stored center with the source row group by row group
    both = tmp_path / "both"
    shutil.copytree(src, both)
    shutil.copytree(more, both, dirs_exist_ok=True)
    assert not ingest(both, "A", small, salt=SALT, replace=True).written
    mask = both / "upgrade" / "s0_0_mask.png"
    Image.fromarray(np.full((48, 48), 255, np.uint8)).save(mask)
    changed = ingest(both, "A", small, salt=SALT, replace=True)
    assert changed.written and changed.center_rows == 17
    masks = [np.asarray(Image.open(io.BytesIO(m))) for m in small.read_table().column("mask").to_pylist() if m]
    assert len(masks) == 6 and sum(bool(m.min() == 255) for m in masks) == 1


def _peak_python_memory(src: Path, dataset: Path) -> int:
    tracemalloc.start()
    try:
        ingest(src, "A", dataset, salt=SALT, workers=2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_ingest_memory_does_not_grow_with_the_source(tmp_path, monkeypatch):
    """A source ten times larger takes far less than ten times the memory: the images' bytes are
    never all held at once (before the spool, the whole source was)."""
    monkeypatch.setattr(dataset_module, "ROW_GROUP_BYTES", 512 << 10)  # about 8 of these images
    peaks = {n: _peak_python_memory(_source(tmp_path / f"src{n}", n, size=256), tmp_path / f"ds{n}" / "ds")
             for n in (8, 80)}
    assert ImageDataset(tmp_path / "ds80" / "ds").manifest["centers"]["A"]["rows"] == 80
    assert peaks[80] < 3 * peaks[8], peaks


def test_a_file_kept_by_name_is_read_again_and_refused_once_changed(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"first content")
    with Spool(tmp_path) as spool:
        blob = spool.put(FileBytes(str(path), path.read_bytes()))
        assert spool.size == 0 and blob.path == str(path)  # nothing copied
        assert spool.get(blob) == b"first content"
        path.write_bytes(b"other content")  # same length, other bytes
        with pytest.raises(SourceChanged, match="a.png: changed while the ingest ran"):
            spool.get(blob)
        path.unlink()
        with pytest.raises(SourceChanged, match="a.png: cannot be read again"):
            spool.get(blob)


def test_gray_pngs_are_not_copied_and_a_file_changed_before_the_write_leaves_the_dataset_as_it_was(
        tmp_path, monkeypatch):
    src = _source(tmp_path / "src", 6)
    ds = ImageDataset(tmp_path / "ds")
    sizes = []
    real_check = ingest_module._check

    def check_then_note_the_spool(batch, *args, **kwargs):
        sizes.append(batch.spool.size)
        return real_check(batch, *args, **kwargs)

    monkeypatch.setattr(ingest_module, "_check", check_then_note_the_spool)
    ingest(src, "A", ds, salt=SALT)
    assert sizes == [0]  # gray PNGs and 0/255 masks are stored as they are: the spool copied none
    stored = {hashlib.sha256(png).hexdigest() for png in ds.read_table().column("image").to_pylist()}
    assert stored == {hashlib.sha256(p.read_bytes()).hexdigest() for p in src.rglob("*.png")
                      if "mask" not in p.name}

    more = _source(tmp_path / "more", 4, seed=1)
    victim = more / "upgrade" / "s1_0.png"

    def check_then_change_a_file(batch, *args, **kwargs):
        plan = real_check(batch, *args, **kwargs)
        Image.fromarray(np.zeros((48, 48), np.uint8)).save(victim)
        return plan

    monkeypatch.setattr(ingest_module, "_check", check_then_change_a_file)
    before = ds.read_table()
    with pytest.raises(SourceChanged, match="s1_0.png: changed while the ingest ran"):
        ingest(more, "A", ds, salt=SALT)
    reopened = ImageDataset(tmp_path / "ds")
    assert reopened.manifest["centers"]["A"]["rows"] == 6 and reopened.read_table().equals(before)
