"""The report folder: metrics.json and predictions.parquet agree, the page is self-contained, skipped
sections are said, a rebuild reproduces it, and a failure leaves the previous report whole."""
import base64
import json
import re
import shutil

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from diffkd.cli import main
from diffkd.evaluate.report import ReportInputs, rebuild_report, write_report


@pytest.fixture(scope="module")
def built(tmp_path_factory, simulate_report):
    tmp = tmp_path_factory.mktemp("report")
    preds, reads, inputs = simulate_report(tmp)
    files = write_report(tmp / "run", preds, inputs, readers=reads)
    return tmp, preds, files


def test_metrics_json_agrees_with_predictions_parquet(built):
    _, _, files = built
    metrics = json.loads(files.metrics.read_text())  # strict JSON: NaN would not parse back as a number
    preds = pd.read_parquet(files.predictions)
    assert list(preds.columns) == ["case_id", "patient_id", "center", "split", "label", "model", "prob"]
    assert set(metrics["models"]) == set(preds.model)
    for model, entry in metrics["models"].items():
        for cohort, split in (("internal", "val"), ("external", "test")):
            part = preds[(preds.model == model) & (preds.split == split)]
            assert entry[cohort]["n"] == len(part)
            assert entry[cohort]["auc"] == pytest.approx(roc_auc_score(part.label, part.prob), abs=1e-12)
            assert entry[cohort]["sensitivity"] == pytest.approx(
                (part[part.label == 1].prob >= entry["threshold"]).mean(), abs=1e-12)
        for center, m in entry["per_center"].items():
            part = preds[(preds.model == model) & (preds.center == center) & (preds.split != "train")]
            assert m["auc"] == pytest.approx(roc_auc_score(part.label, part.prob), abs=1e-12)
    assert metrics["models"]["student_kd"]["params"] == 1_100_000
    assert metrics["initialised_from"] == {"teacher": "/weights/resnet50", "student_kd": "scratch",
                                           "diffusion": "scratch"}
    assert metrics["synthetic"]["fid"] == 38.5
    assert metrics["baselines"]["clinical"]["odds_ratios"]


def test_the_distillation_section_gives_agreement_and_the_paired_gap_to_the_teacher(built):
    _, preds, files = built
    metrics = json.loads(files.metrics.read_text())
    kd = metrics["distillation"]["student_kd"]
    assert kd["teacher"] == "teacher" and kd["best_epoch"] == 5 and kd["epochs_run"] == 6
    assert kd["at_best_epoch"]["agree_corr"] == pytest.approx(0.75)  # the kept epoch's, not the last one's
    assert "kd_logit_standardized" in kd["at_best_epoch"]
    gap = kd["external_gap"]
    external = preds[preds.split == "test"]
    auc = {m: roc_auc_score(external[external.model == m].label, external[external.model == m].prob)
           for m in ("student_kd", "teacher")}
    assert gap["difference"] == pytest.approx(auc["student_kd"] - auc["teacher"], abs=1e-12)
    assert gap["difference_ci"][0] < gap["difference"] < gap["difference_ci"][1]
    page = files.index.read_text()
    section = page.split('<section id="distillation">')[1].split("</section>")[0]
    assert "top-1 agreement" in section and "<code>student_plain</code>" in section
    assert "5 of 6" in section and "data:image/png;base64," in section


def test_each_trained_models_health_is_in_metrics_json_and_flagged_rows_show(built):
    _, _, files = built
    models = json.loads(files.metrics.read_text())["models"]
    assert models["student_kd"]["health"]["flags"] == []
    assert models["student_kd"]["health"]["checks"]["constant_ce"] == pytest.approx(0.6931)
    assert models["teacher"]["health"]["flags"] == ["inverted"]
    deep = models["deep_features"]["health"]
    assert set(deep["checks"]) == {"deep_feature_model_fold0", "deep_feature_model_fold1"}
    assert deep["flags"] == ["inverted (deep_feature_model_fold1)"]
    assert "health" not in models["clinical"]  # nothing was trained through the loop
    section = files.index.read_text().split('<section id="health">')[1].split("</section>")[0]
    flagged = re.findall(r'<tr class="flagged">(.*?)</tr>', section)
    assert len(flagged) == 2 and "<code>teacher</code>" in flagged[0] and "(inverted)" in flagged[0]
    assert "<code>deep_feature_model_fold1</code>" in flagged[1]
    assert "<code>student_plain</code>" in section and "healthy" in section


def test_page_is_self_contained(built):
    _, _, files = built
    page = files.index.read_text()
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    images = re.findall(r'<img alt="([^"]*)" src="([^"]+)"', page)
    assert len(images) >= 8  # cohort, ROC, forest, calibration, decision, efficiency, 2 grids
    for alt, src in images:
        assert src.startswith("data:image/png;base64,"), alt
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG"), alt
    for heading in ("Summary", "Data and participants", "Discrimination", "Per-center performance", "Calibration",
                    "Clinical utility", "Ablations", "Baselines (An et al. 2025)", "Reader study",
                    "Model size and speed", "Synthetic-data audit", "Limitations and skipped analyses",
                    "Reproducibility"):
        assert f">{heading}<" in page, heading
    odds_ratios = json.loads(files.metrics.read_text())["baselines"]["clinical"]["odds_ratios"]
    assert "odds ratios" in page and all(f"<code>{r['term']}</code>" in page for r in odds_ratios)
    assert "scikit-learn" in page and "student:" in page  # package versions and the config
    # size and speed: both models in both runtimes at batch 1 and 32, so speed-ups compare like with like
    for header in ("torch, batch 1 (ms / image)", "torch, batch 32 (ms / image)",
                   "ONNX Runtime, batch 1 (ms / image)", "ONNX Runtime, batch 32 (ms / image)"):
        assert header in page
    assert all(value in page for value in ("6.17", "5.29", "0.61", "0.43"))
    assert ">initialised from<" in page and "/weights/resnet50" in page  # each model's start
    assert "<code>diffusion</code> started from: scratch" in page  # models outside the performance table too


def test_skipped_sections_are_said_never_silent(tmp_path, simulate_report):
    preds, _, inputs = simulate_report(tmp_path)
    inputs.skipped = {"synthetic": "the dataset has one modality only"}
    inputs.notes = ["no us_doppler images: the pairing-free student was not trained"]
    preds = preds[preds.split != "test"]  # no external centers at all
    files = write_report(tmp_path / "run", preds, inputs, readers=None)
    page = files.index.read_text()
    assert "No us_doppler images: the pairing-free student was not trained" in page
    assert "skipped: the dataset has one modality only" in page
    assert "skipped: no reader reads were provided" in page
    assert "skipped: no external (&#x27;test&#x27;) predictions" in page
    metrics = json.loads(files.metrics.read_text())
    assert metrics["skipped"] == {"external": "no external ('test') predictions",
                                  "readers": "no reader reads were provided",
                                  "synthetic": "the dataset has one modality only"}
    assert metrics["models"]["student_kd"]["external"] is None
    with pytest.raises(ValueError, match="unknown report section"):
        ReportInputs(skipped={"reader": "typo"})


def test_rebuild_reproduces_metrics(built, tmp_path):
    _, _, files = built
    rebuilt = rebuild_report(files.predictions, tmp_path / "again")
    assert rebuilt.metrics.read_text() == files.metrics.read_text()
    assert (tmp_path / "again" / "report" / "grids" / "grid_label0.png").exists()
    # the CLI, with a changed threshold rule: same AUCs, different threshold
    assert main(["report", "--predictions", str(files.predictions), "--out", str(tmp_path / "cli"),
                 "--threshold", "sensitivity", "--target-sensitivity", "0.99"]) == 0
    before = json.loads(files.metrics.read_text())["models"]["student_kd"]
    after = json.loads((tmp_path / "cli" / "report" / "metrics.json").read_text())["models"]["student_kd"]
    assert after["external"]["auc"] == before["external"]["auc"]
    assert after["threshold"] != before["threshold"] and after["internal"]["sensitivity"] >= 0.99


def test_failure_leaves_previous_report_whole(built, tmp_path, capsys):
    _, preds, files = built
    run = tmp_path / "run"
    shutil.copytree(files.index.parent, run / "report")
    before = {p.name: p.read_bytes() for p in (run / "report").iterdir() if p.is_file()}
    inputs = ReportInputs.load(run / "report" / "report_inputs.json")
    inputs.synthetic_grids = [str(tmp_path / "missing.png")]
    with pytest.raises(FileNotFoundError, match="missing.png"):
        write_report(run, preds, inputs)
    bad = preds.copy()
    bad.loc[3, "prob"] = 2.0
    assert main(["report", "--predictions", str(_parquet(tmp_path, bad)), "--out", str(run)]) == 2
    assert "row 3, column 'prob'" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in (run / "report").iterdir() if p.is_file()}
    assert after == before  # nothing replaced, no temporary files left behind


def _parquet(tmp_path, frame):
    path = tmp_path / "bad.parquet"
    frame.to_parquet(path)
    return path


def test_the_report_and_metrics_use_the_datasets_outcome_names(built, tmp_path, simulate_report):
    """A dataset of benign/malignant images: no page text or metrics.json calls them DCIS or upgrade."""
    preds, _, inputs = simulate_report(tmp_path)
    inputs.label_names = ["benign", "malignant"]
    inputs.synthetic = dict(inputs.synthetic or {}, label_effect=0.2)
    files = write_report(tmp_path / "run", preds, inputs)
    metrics = json.loads(files.metrics.read_text())
    assert metrics["label_names"] == {"0": "benign", "1": "malignant"}
    page = files.index.read_text()
    text = re.sub(r'src="data:[^"]+"', "", page)  # the text, without the figures' bytes
    assert "malignant rate" in text and "<th class=\"num\">malignant</th>" in text
    assert "probability of malignant (rather than benign)" in text
    assert "from the benign- to the malignant-conditioned image" in text
    assert not re.search(r"upgrade|DCIS", text)
    assert json.loads(built[2].metrics.read_text())["label_names"] == {"0": "DCIS", "1": "upgrade"}  # the default


def test_readers_with_birads_get_an_auc_beside_every_model(built, tmp_path):
    tmp, preds, files = built
    metrics = json.loads(files.metrics.read_text())
    entries = {(e["reader"], e["cohort"]): e for e in metrics["readers"]["auc"]}
    assert set(entries) == {(r, c) for r in ("R1", "R2") for c in ("internal", "external")}
    external = entries[("R1", "external")]
    assert {m["model"] for m in external["models"]} == set(preds.model)
    kd = next(m for m in external["models"] if m["model"] == "student_kd")
    assert kd["difference"] == pytest.approx(kd["auc_model"] - external["auc"])
    page = files.index.read_text()
    assert "AUC reader" in page and "difference = model − reader" in page
    rebuilt = rebuild_report(files.predictions, tmp_path / "again")  # readers.csv beside keeps the BI-RADS levels
    assert json.loads(rebuilt.metrics.read_text())["readers"]["auc"] == metrics["readers"]["auc"]
