"""The report folder is switched whole: a failure at any filesystem step of a report write leaves the
previous report or the new one, never a mix and no staging folder; names from the data ("$",
markup, unicode) pass through the whole report as text."""
from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

from diffkd.evaluate.report import ReportInputs, write_report

HOSTILE_CENTER = "Zürich $x^_\\q$ <script>alert(1)</script> ✓"  # "$...$" that is no valid mathtext


def _small(simulate_predictions, center_a="A", label_names=("DCIS", "upgrade")):
    preds = simulate_predictions(internal=(center_a,), external=("B",), cases_per_center=40,
                                 models=("student_kd", "teacher"))
    preds["patient_id"] = preds.case_id  # one case per patient: DeLong intervals, no slow bootstrap
    return preds, ReportInputs(title="faults", label_names=list(label_names))


def _digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # ~16 report builds (about a minute); tests/test_files.py covers the same switch in seconds
def test_a_failure_at_every_step_of_a_report_write_leaves_the_old_or_the_new_report(
        tmp_path, simulate_predictions, fault_injector, monkeypatch):
    from diffkd.evaluate import figures

    # figures are drawn but not rasterised: this test is about how the folder is switched, and
    # rasterising dominates a report's time (the hostile-name test below draws them for real)
    monkeypatch.setattr(figures, "to_png", lambda fig: b"\x89PNG figure")
    preds, inputs = _small(simulate_predictions)
    run = tmp_path / "run"
    write_report(run, preds, inputs)
    old = _digest(run / "report")
    saved = tmp_path / "saved"
    shutil.copytree(run / "report", saved)
    newer = preds.assign(prob=preds.prob * 0.9)
    fault_injector.install()
    write_report(tmp_path / "probe", newer, inputs)
    steps = len(fault_injector.calls)
    fault_injector.remove()
    outcomes = {"old": 0, "new": 0}
    for k in range(steps):
        shutil.rmtree(run / "report")  # back to the old report
        shutil.copytree(saved, run / "report")
        fault_injector.install(at=k, error=errno.ENOSPC if k % 2 else errno.EIO)
        try:
            write_report(run, newer, inputs)
        except OSError:
            pass
        finally:
            fault_injector.remove()
        seen = _digest(run / "report")
        metrics = json.loads((run / "report" / "metrics.json").read_text())
        is_new = metrics["predictions_sha256"] != json.loads(json.dumps(old)) and seen != old
        if seen == old:
            outcomes["old"] += 1
        else:  # a whole new report: its files agree with each other
            parquet = hashlib.sha256((run / "report" / "predictions.parquet").read_bytes()).hexdigest()
            assert is_new and metrics["predictions_sha256"] == parquet, f"step {k}: a mix of two reports"
            outcomes["new"] += 1
        assert not [p.name for p in run.iterdir() if p.name != "report"], f"step {k}: leftovers"
    assert outcomes["old"] and outcomes["new"]
    print(f"REPORT FAULTS: {steps} steps, {outcomes}")


def test_a_hostile_center_and_label_name_pass_through_the_whole_report(tmp_path, simulate_predictions):
    preds, inputs = _small(simulate_predictions, center_a=HOSTILE_CENTER, label_names=("be$nign", "mal<i>gnant"))
    files = write_report(tmp_path / "run", preds, inputs)
    page = files.index.read_text()
    text = re.sub(r'src="data:[^"]+"', "", page)
    assert "<script>alert(1)</script>" not in text  # escaped, not markup
    assert "Zürich $x^_\\q$ &lt;script&gt;" in text
    assert "mal&lt;i&gt;gnant" in text
    metrics = json.loads(files.metrics.read_text())
    assert HOSTILE_CENTER in set(_strings(metrics))  # kept exactly, as data


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value
