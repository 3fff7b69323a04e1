"""A real-data path end to end: a BUSI-layout folder (no clinical data, one modality) -> ingest -> `diffkd run`.

The folder is made from the phantom's images the way the public BUSI dataset is laid out: class
folders, `<class> (N).png` saved as RGB, `_mask.png` and `_mask_1.png` files, mixed image sizes, a
`normal` class the label map skips, one image filed under both classes, and no clinical CSV. Every
stage is enabled in a tiny config; the run must finish, say up front which stages the data cannot
support, keep the library chatter in OUT/logs/, and write a report that names the skipped parts and
calls the outcomes by the dataset's names (benign / malignant).
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffkd.cli import main as diffkd
from diffkd.data.phantom import generate_cohort

ROOT = Path(__file__).resolve().parents[2]
LABEL_MAP = "benign=0,malignant=1,normal=skip"

TINY_CONFIG = """
name: busi-smoke
splits: {val_fraction: 0.3, seed: 0}
ray: {address: "", num_cpus: 4}
diffusion:
  enabled: true
  model:
    model: {image_size: 16, block_out_channels: [16, 32], layers_per_block: 1, condition_dim: 16, mask_channel: true}
  loop: {epochs: 1, batch_size: 8, lr: 0.002}
synth: {mode: balanced, per_cell: 4, num_inference_steps: 2, batch_size: 8, num_actors: 1, chunk_rows: 16}
audit: {epochs: 1, max_per_set: 40, kid_subset_size: 4, kid_subsets: 2, label_pairs: 2}
synthetic_ratio: 0.5
teacher:
  arch: resnet18
  pipeline: {image_size: 32, batch_size: 8}
  loop: {epochs: 1, batch_size: 8}
student:
  arch: mobilenetv3_small_050
  pipeline: {image_size: 32, batch_size: 8}
  loop: {epochs: 1, batch_size: 8}
tune: {enabled: true, space: SPACE, num_samples: 1}
pairing_free: {enabled: true, teacher_modality: us_doppler, student_modality: us}
baselines:
  enabled: true
  config: {n_mrmr: 4, feature_folds: 2}
  feature_model:
    arch: resnet18
    pipeline: {image_size: 32, batch_size: 8}
    loop: {epochs: 1, batch_size: 8}
evaluate: {threshold: youden, ci_method: delong}
"""


def busi_folders(phantom: Path, out: Path) -> list[Path]:
    """Two pseudo-centers in the BUSI layout, split by file number as a user would split BUSI."""
    with open(phantom / "center1" / "clinical.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["modality"] == "us"]
    folders = [out / "busi_a", out / "busi_b"]
    counts: dict[str, int] = {}  # BUSI numbers each class's files once: a split by number keeps names unique
    for i, row in enumerate(rows):
        src = folders[0] if i < len(rows) * 0.6 else folders[1]
        cls = "benign" if row["label"] == "DCIS" else "malignant"
        if i % 11 == 5:
            cls = "normal"  # BUSI's third class, left out by the label map
        n = counts[cls] = counts.get(cls, 0) + 1
        image = Image.open(phantom / "center1" / row["file"]).convert("L")
        mask = Image.open(phantom / "center1" / row["mask"]).convert("L") if row["mask"] else \
            Image.new("L", image.size)
        if i % 3 == 1:  # mixed sizes, as BUSI's 190-1048 x 310-719 px
            size = (int(image.width * 1.4), int(image.height * 0.8))
            image, mask = image.resize(size), mask.resize(size, Image.Resampling.NEAREST)
        stem = src / cls / f"{cls} ({n})"
        stem.parent.mkdir(parents=True, exist_ok=True)
        Image.merge("RGB", [image] * 3).save(f"{stem}.png")  # gray images stored as RGB, as BUSI's are
        pixels = np.asarray(mask)
        if i % 4 == 0 and pixels.any():  # a second mask file holding part of the lesion
            half = pixels.shape[0] // 2
            first, second = pixels.copy(), pixels.copy()
            first[half:], second[:half] = 0, 0
            Image.fromarray(first).save(f"{stem}_mask.png")
            Image.fromarray(second).save(f"{stem}_mask_1.png")
        else:
            mask.save(f"{stem}_mask.png")
    # BUSI's known defect: one image filed under both classes
    (folders[0] / "malignant" / "malignant (999).png").write_bytes(
        (folders[0] / "benign" / "benign (1).png").read_bytes())
    (folders[0] / "malignant" / "malignant (999)_mask.png").write_bytes(
        (folders[0] / "benign" / "benign (1)_mask.png").read_bytes())
    return folders


@pytest.fixture(scope="module")
def busi_dataset(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("busi")
    generate_cohort(work / "phantom", size="demo", centers=1, patients=40, seed=3)
    dataset = work / "ds"
    for center, folder in zip(("A", "B"), busi_folders(work / "phantom", work)):
        assert diffkd(["ingest", str(folder), "--center", center, "--dataset", str(dataset), "--layout", "busi",
                       "--label-names", "benign,malignant", "--label-map", LABEL_MAP,
                       "--quarantine", str(work / "quarantine")]) == 0
    assert list((work / "quarantine").glob("rejected-A.PHI.csv")), "the cross-class duplicate was not set aside"
    return dataset


def tiny_config(folder: Path) -> Path:
    config = folder / "tiny.yaml"
    config.write_text(TINY_CONFIG.replace("SPACE", str(ROOT / "tune_spaces" / "kd_demo.yaml")))
    return config


def test_busi_folder_ingests_and_the_run_plan_names_what_it_cannot_support(busi_dataset, tmp_path):
    """The fast half (default suite): the ingested folder and the checks `diffkd run` makes before training."""
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.splits import make_splits
    from diffkd.experiments.experiment import load_experiment
    from diffkd.experiments.stages import plan_stages

    ds = ImageDataset(busi_dataset)
    assert tuple(ds.label_names) == ("benign", "malignant")
    meta = ds.metadata().to_pandas()
    assert sorted(meta["center"].unique()) == ["A", "B"] and set(meta["modality"]) == {"us"}
    assert not meta["source"].str.contains("normal").any()  # the label map's skip
    masks = ds.read_table(columns=["mask"]).column("mask").to_pylist()
    assert all(masks)  # every kept image has its lesion mask (the _mask_1 halves merged in)
    plan = plan_stages(ds, make_splits(meta, ["B"], 0.3, 0), load_experiment(tiny_config(tmp_path)), None)
    assert plan.mask_conditioning and not plan.clinical_baselines and not plan.pairing_free
    assert set(plan.skipped) == {"student_pairing_free", "clinical and combined baselines", "reader comparison"}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_busi_layout_runs_end_to_end_and_says_what_it_skipped(busi_dataset, tmp_path):
    """The whole run: 13 Ray Train jobs (generator, audit classifiers, teachers, one search trial per student
    arm, students, cross-fitted feature extractors), several minutes on 2 cores, so in `make test-slow`."""
    config = tiny_config(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "diffkd.cli", "run", "--dataset", str(busi_dataset),
                           "--external", "B", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=2300)
    console = proc.stdout
    assert proc.returncode == 0, console + proc.stderr[-3000:]
    # said up front, before anything trained
    before_training = console.split("[diffusion] starting")[0]
    assert "skipping student_pairing_free" in before_training
    assert "skipping clinical and combined baselines: no usable clinical variable" in before_training
    assert "skipping reader comparison" in before_training
    # the console shows stages and epochs; the libraries' own lines are in the stage logs
    for stage in ("diffusion", "synth", "audit", "teacher", "teacher_real_only", "tune_student_kd", "student_kd",
                  "student_plain", "student_kd_real_only", "baselines", "report"):
        assert f"[{stage}] done" in console, stage
    assert "[teacher] epoch 1/1" in console
    for noise in ("core_worker.cc", "Setting accelerator", "Progress bars disabled", "Parquet dataset sampling",
                  "RayDeprecationWarning", "pid="):
        assert noise not in console, noise
    teacher_log = (out / "logs" / "teacher.log").read_text()
    assert "Parquet dataset sampling" in teacher_log and "(RayTrainWorker pid=" in teacher_log
    assert proc.stderr == ""
    # the report: the deep-feature model ran, the clinical-data models and the pairing-free student did not
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert {"teacher", "student_kd", "deep_features"} <= set(metrics["models"])
    assert not {"clinical", "combined", "student_pairing_free"} & set(metrics["models"])
    report = (out / "report" / "index.html").read_text()
    assert "clinical model skipped: no usable clinical variable" in report
    assert "pairing-free group KD student is not trained" in report
    assert "no reader CSV was given" in report
    # the dataset's outcome names, not the phantom's DCIS/upgrade
    assert metrics["label_names"] == {"0": "benign", "1": "malignant"}
    assert "malignant" in report and "upgrade" not in report
