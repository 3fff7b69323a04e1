"""`diffkd ingest --layout busi`: class folders, OR-merged masks, the required label map."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffkd.data.dataset import ImageDataset
from diffkd.data.ingest import IngestError, ingest

LABEL_MAP = "benign=0,malignant=1,normal=skip"


def busi_tree(root: Path, seed: int = 0) -> Path:
    """BUSI-like: RGB PNGs named 'benign (N).png', masks '_mask.png' and '_mask_1.png', a duplicate image."""
    rng = np.random.default_rng(seed)
    for cls, n in (("benign", 3), ("malignant", 2), ("normal", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(1, n + 1):
            gray = rng.integers(0, 256, (30, 36), dtype=np.uint8)
            Image.fromarray(np.dstack([gray] * 3)).save(root / cls / f"{cls} ({i}).png")  # gray stored as RGB
            mask = np.zeros((30, 36), np.uint8)
            if cls != "normal":
                mask[2:8, 2:8] = 255
            Image.fromarray(mask).save(root / cls / f"{cls} ({i})_mask.png")
    second = np.zeros((30, 36), np.uint8)
    second[20:25, 20:30] = 255
    Image.fromarray(second).save(root / "benign" / "benign (1)_mask_1.png")
    (root / "benign" / "benign (3).png").write_bytes((root / "benign" / "benign (2).png").read_bytes())
    return root


def test_busi_layout(tmp_path, rows_by_file):
    src = busi_tree(tmp_path / "Dataset_BUSI_with_GT")
    report = ingest(src, "busi", tmp_path / "ds", layout="busi", label_map="benign=0,malignant=1,normal=skip")
    assert report.skipped == 2 and report.duplicates == 1
    assert report.labels_added == {"DCIS": 2, "upgrade": 2}
    rows = rows_by_file(tmp_path / "ds", src, "busi")
    assert not any("benign" in r["source"] for r in rows.values())  # file names are stored as salted hashes
    first = rows["benign/benign (1).png"]
    img = Image.open(io.BytesIO(first["image"]))
    assert img.mode == "L"
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(src / "benign/benign (1).png"))[..., 0])
    mask = np.asarray(Image.open(io.BytesIO(first["mask"]))) > 0
    assert mask[4, 4] and mask[22, 25] and mask.sum() == 36 + 50  # both masks, OR-merged
    assert np.asarray(Image.open(io.BytesIO(rows["malignant/malignant (1).png"]["mask"]))).sum() == 36 * 255
    assert len({r["patient_id"] for r in rows.values()}) == 4
    assert any("own patient" in w for w in report.warnings)


def test_busi_needs_a_complete_label_map(tmp_path):
    src = busi_tree(tmp_path / "busi")
    with pytest.raises(IngestError, match=r"needs --label-map .*benign, malignant, normal"):
        ingest(src, "busi", tmp_path / "ds", layout="busi")
    with pytest.raises(IngestError, match="does not map class folder.*normal"):
        ingest(src, "busi", tmp_path / "ds", layout="busi", label_map="benign=0,malignant=1")
    assert not (tmp_path / "ds").exists()


def test_copies_of_one_image_with_different_labels_are_all_set_aside(tmp_path, rows_by_file):
    """BUSI's known defect: one image filed under two classes. Nothing says which label is right, so
    --quarantine sets both copies aside (with the reason) and the summary counts them."""
    src = busi_tree(tmp_path / "busi")
    (src / "benign" / "benign (4).png").write_bytes((src / "malignant" / "malignant (2).png").read_bytes())
    with pytest.raises(IngestError, match=r"benign/benign \(4\).png.*malignant/malignant \(2\).png"):
        ingest(src, "busi", tmp_path / "ds", layout="busi", label_map="benign=0,malignant=1,normal=skip")
    report = ingest(src, "busi", tmp_path / "ds", layout="busi", label_map="benign=0,malignant=1,normal=skip",
                    label_names="benign,malignant", quarantine=tmp_path / "q")
    assert report.quarantined == 2 and report.conflicting == 2
    assert report.labels_added == {"benign": 2, "malignant": 1}
    stored = rows_by_file(tmp_path / "ds", src, "busi")
    assert "benign/benign (4).png" not in stored and "malignant/malignant (2).png" not in stored
    rejected = (tmp_path / "q" / "rejected-busi.PHI.csv").read_text()
    assert "benign/benign (4).png" in rejected and "malignant/malignant (2).png" in rejected
    assert rejected.count("with a different label") == 2
    summary = report.summary()
    assert "2 quarantined, 2 of them copies of one image with different labels" in summary
    assert "(benign 2, malignant 1)" in summary


def test_two_hospitals_reusing_file_names_are_different_patients(tmp_path):
    """Without patient ids each image is its own patient within its center: a second hospital's BUSI-style
    export that reuses the names ('benign (1).png') is new patients, not the first hospital's."""
    ds = tmp_path / "ds"
    first = ingest(busi_tree(tmp_path / "u1", seed=0), "U1", ds, layout="busi", label_map=LABEL_MAP)
    second = ingest(busi_tree(tmp_path / "u2", seed=1), "U2", ds, layout="busi", label_map=LABEL_MAP)
    assert first.added == second.added == 4
    patients = {c: {r["patient_id"] for r in ImageDataset(ds).read_table([c]).to_pylist()} for c in ("U1", "U2")}
    assert len(patients["U1"]) == len(patients["U2"]) == 4 and not patients["U1"] & patients["U2"]
    with pytest.raises(IngestError, match="the same image is already in center U1"):
        ingest(busi_tree(tmp_path / "u3", seed=0), "U3", ds, layout="busi", label_map=LABEL_MAP)
