"""`diffkd data info` tables and `diffkd data grid` images."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from diffkd.cli import main as cli_main
from diffkd.data.dataset import ImageDataset
from diffkd.data.info import dataset_info, format_table
from diffkd.data.ingest import ingest


def center_source(root: Path, center: str, n_patients: int, upgrade_every: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for p in range(n_patients):
        for k in range(2):
            name = f"{p}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (24, 30), dtype=np.uint8)).save(root / name)
            rows.append({"file": name, "patient_id": f"{center}-{p}", "case_id": f"{center}-{p}",
                         "label": int(p % upgrade_every == 0), "age": 40 + p, "birads": "4a" if p % 2 else "5",
                         "palpable": "yes" if p % 3 == 0 else "no"})
    with open(root / "clinical.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("info")
    ds = base / "ds"
    ingest(center_source(base / "a", "A", 10, 2, 0), "A", ds)  # 5 upgrade patients of 10
    ingest(center_source(base / "b", "B", 4, 4, 1), "B", ds)  # 1 of 4
    return ds


def test_counts_per_center_split_label(dataset):
    info = dataset_info(dataset, external=["B"], seed=0, val_fraction=0.2)
    counts = info.counts.set_index(["center", "split"])
    assert counts.loc[("B", "test"), "total"] == 8 and counts.loc[("B", "test"), "upgrade"] == 2
    assert counts.loc[("A", "val"), "patients"] == 2  # one patient per label stratum (5 * 0.2)
    assert counts.loc[("A", "train"), "total"] + counts.loc[("A", "val"), "total"] == 20
    assert counts.loc[("all", "all"), "total"] == 28 and counts.loc[("all", "all"), "patients"] == 14
    assert ("B", "train") not in counts.index
    clinical = info.clinical.set_index("attribute")
    assert clinical.loc["age", "missing_pct"] == 0 and clinical.loc["lesion_size_mm", "missing_pct"] == 100
    assert clinical.loc["palpable", "upgrade"].startswith("yes")


def test_text_report_and_cli(dataset, capsys):
    assert cli_main(["data", "info", str(dataset), "--external", "B"]) == 0
    out = capsys.readouterr().out
    assert "2 center(s), 28 images, 14 patients; external (test): B" in out
    header = next(line for line in out.splitlines() if line.startswith("center  split"))
    test_row = next(line for line in out.splitlines() if line.startswith("B ") and " test " in line)
    # numbers right-aligned under their headers
    assert test_row.index("8") + 1 == header.index("total") + len("total")
    assert "Clinical attributes" in out and "birads" in out
    assert cli_main(["data", "info", str(dataset), "--external", "Z"]) == 2
    assert "Z not in the dataset" in capsys.readouterr().err


def test_format_table_aligns():
    import pandas as pd

    text = format_table(pd.DataFrame({"name": ["a", "long"], "n": [5, 123], "pct": [1.0, float("nan")]}))
    lines = text.splitlines()
    assert lines[0] == "name    n  pct" and lines[2] == "a       5  1.0" and lines[3] == "long  123    -"


def test_grid_png(dataset, tmp_path):
    ds = ImageDataset(dataset)
    real = ds.read_table(["A"])
    synth = real.slice(0, 3)
    synth = synth.set_column(synth.column_names.index("synthetic"), "synthetic", pa.array([True] * 3))
    ds.write_synthetic("A", synth, run_id="t1")
    out = tmp_path / "grid.png"
    assert cli_main(["data", "grid", str(dataset), "--out", str(out), "--per-cell", "2"]) == 0
    img = np.asarray(Image.open(out).convert("L"))
    assert img.shape[1] > img.shape[0] > 300  # 3 rows (A, B, synthetic A) x 4 columns
    assert img.std() > 20  # images were drawn, not an empty canvas
    ds.delete_synthetic()


def test_dataset_splits_reads_the_dataset(dataset):
    from diffkd.data.splits import dataset_splits

    splits = dataset_splits(dataset, external=["B"], seed=0)
    assert len(splits) == 28 and set(splits[splits.center == "B"].split) == {"test"}
    assert splits.groupby("patient_id").split.nunique().max() == 1
