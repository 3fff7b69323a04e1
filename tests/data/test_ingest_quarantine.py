"""One bad file costs one quarantined row: damaged, empty, oversized and bomb images, odd names and
links out of the source are each set aside with a reason naming the file, and the rest is ingested."""
from __future__ import annotations

import csv
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import DecodeLimits, IngestError, ingest

SALT = bytes(range(32))


def _png(seed: int, shape=(48, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height gray pixels, with a few bytes of (short) data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"\0" * 4096))
            + _chunk(b"IEND", b""))


def _idat_end(png: bytes) -> int:
    pos = 8
    while pos < len(png):
        length = struct.unpack(">I", png[pos:pos + 4])[0]
        if png[pos + 4:pos + 8] == b"IEND":
            return pos
        pos += 12 + length
    raise AssertionError("no IEND")


TRUNCATION_POINTS = 24  # cuts that lose pixel data (a cut in the last checksum or IEND loses none)


def bad_source(root: Path, outside: Path) -> tuple[Path, dict[str, str], list[str]]:
    """SRC with good images and bad ones; returns (SRC, {bad file: expected reason}, good files)."""
    good = {"DCIS/good0.png": _png(0), "upgrade/good1.png": _png(1), "DCIS/MRN123 Smith ü $x;名前.png": _png(2),
            "upgrade/-rf --all.png": _png(3),
            "upgrade/not-utf8-\udcff.png": _png(4)}  # a name whose bytes are not UTF-8
    whole = _png(9)
    bad: dict[str, str] = {}
    files: dict[str, bytes] = dict(good)
    for offset in np.linspace(1, _idat_end(whole) - 16, TRUNCATION_POINTS).astype(int):
        name = f"DCIS/cut{offset:05d}.png"
        files[name], bad[name] = whole[:offset], "unreadable or truncated"
    files["upgrade/empty.png"], bad["upgrade/empty.png"] = b"", "is empty (0 bytes)"
    files["upgrade/bomb.png"], bad["upgrade/bomb.png"] = _bomb(30_000, 30_000), "decompression bomb"
    files["upgrade/big.png"], bad["upgrade/big.png"] = _bomb(11_000, 10_000), "exceed the limit"
    files["DCIS/not-an-image.png"], bad["DCIS/not-an-image.png"] = b"MRN123,Smith\n", "unreadable"
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(_png(5))
    os.symlink(outside / "secret.png", root / "DCIS" / "link-out.png")
    bad["DCIS/link-out.png"] = "link to a place outside the source"
    os.symlink(root / "DCIS" / "good0.png", root / "DCIS" / "link-in.png")  # inside SRC: a plain file
    return root, bad, [*good, "DCIS/link-in.png"]


def test_every_bad_file_is_quarantined_with_its_reason_and_the_rest_ingested(tmp_path, rows_by_file):
    src, bad, good = bad_source(tmp_path / "src", tmp_path / "elsewhere")
    with pytest.raises(IngestError, match=f"{len(bad)} problem"):
        ingest(src, "A", tmp_path / "ds", salt=SALT)
    assert not (tmp_path / "ds").exists()
    report = ingest(src, "A", tmp_path / "ds", salt=SALT, quarantine=tmp_path / "q")
    rejected = {row["file"]: row["rejected_reason"]
                for row in csv.DictReader(open(tmp_path / "q" / "rejected-A.PHI.csv", encoding="utf-8"))}
    assert set(rejected) == set(bad)
    for name, reason in bad.items():
        assert reason in rejected[name], (name, rejected[name])
    # the link inside SRC is a copy of good0 (stored once); every good image is in the dataset
    assert report.quarantined == len(bad) and report.added == len(good) - 1 and report.duplicates == 1
    stored = rows_by_file(tmp_path / "ds", src, "folder", SALT)
    assert set(stored) == set(good) - {"DCIS/link-in.png"}
    assert ImageDataset(tmp_path / "ds").read_table().num_rows == len(good) - 1
    print(f"QUARANTINE truncated={TRUNCATION_POINTS} bad={len(bad)} good={len(good)} stored={len(stored)}")


def test_the_limits_are_configurable(tmp_path):
    src = tmp_path / "src"
    (src / "DCIS").mkdir(parents=True)
    (src / "DCIS" / "a.png").write_bytes(_png(0, shape=(48, 64)))
    (src / "DCIS" / "b.png").write_bytes(_png(1, shape=(8, 8)))
    report = ingest(src, "A", tmp_path / "ds", salt=SALT, quarantine=tmp_path / "q",
                    limits=DecodeLimits(max_pixels=1000))
    assert report.added == 1 and report.quarantined == 1
    assert "a.png" in (tmp_path / "q" / "rejected-A.PHI.csv").read_text()


def test_the_quarantine_file_is_private_and_never_inside_the_dataset(tmp_path):
    src, _, _ = bad_source(tmp_path / "src", tmp_path / "elsewhere")
    with pytest.raises(IngestError, match="inside the dataset"):
        ingest(src, "A", tmp_path / "ds", salt=SALT, quarantine=tmp_path / "ds" / "q")
    report = ingest(src, "A", tmp_path / "ds", salt=SALT, quarantine=tmp_path / "q")
    path = Path(report.quarantine_file)
    assert path.name == "rejected-A.PHI.csv" and (path.stat().st_mode & 0o777) == 0o600
    assert "raw patient ids" in report.summary()
