"""`diffkd run` checks, before anything trains, what each enabled stage needs from the dataset."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import CLINICAL_COLUMNS
from diffkd.data.splits import make_splits
from diffkd.experiments.experiment import load_experiment
from diffkd.experiments.stages import plan_stages

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def without(table: pa.Table, columns) -> pa.Table:
    for name in columns:
        i = table.column_names.index(name)
        table = table.set_column(i, name, pa.nulls(len(table), table.schema.field(name).type))
    return table


def plan_for(ramp_rows, tmp_path, transform=lambda t: t, readers=None):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", transform(ramp_rows("A", 24)))
    ds.write_center("B", transform(ramp_rows("B", 12)))
    cfg = load_experiment(CONFIGS / "demo.yaml")  # every stage enabled, mask conditioning on
    assignments = make_splits(ds.metadata().to_pandas(), ["B"], 0.25, 0)
    return plan_stages(ds, assignments, cfg, readers)


def test_a_dataset_with_masks_and_clinical_values_keeps_those_stages(tmp_path, ramp_rows):
    plan = plan_for(ramp_rows, tmp_path, readers=None)
    assert plan.diffusion and plan.mask_conditioning and plan.clinical_baselines
    assert not plan.pairing_free  # B-mode only: no Doppler teacher
    assert set(plan.skipped) == {"student_pairing_free"}  # no readers CSV, but the cases' BI-RADS is a reader
    assert "no 'us_doppler' images in the train split" in plan.skipped["student_pairing_free"]


def test_no_clinical_values_no_masks_no_readers_are_each_named(tmp_path, ramp_rows):
    plan = plan_for(ramp_rows, tmp_path, lambda t: without(t, [*CLINICAL_COLUMNS, "mask"]))
    assert not plan.clinical_baselines and not plan.mask_conditioning
    assert plan.diffusion  # trained without the mask channel, not skipped
    assert set(plan.skipped) == {"student_pairing_free", "clinical and combined baselines", "reader comparison"}
    assert "deep-feature model still runs" in plan.skipped["clinical and combined baselines"]
    assert "no case has a BI-RADS category" in plan.skipped["reader comparison"]
    assert any("without mask conditioning" in change for change in plan.changes)


def test_an_unreadable_reader_csv_fails_before_training(tmp_path, ramp_rows):
    with pytest.raises(ValueError, match="readers file .*missing.csv does not exist"):
        plan_for(ramp_rows, tmp_path, readers=str(tmp_path / "missing.csv"))
    reads = tmp_path / "reads.csv"
    reads.write_text("reader,experience,case,probability\nr1,5,c1,0.4\n")
    with pytest.raises(ValueError, match="needs a case_id column"):
        plan_for(ramp_rows, tmp_path / "again", readers=str(reads))


def test_a_broken_search_space_fails_before_training(tmp_path, ramp_rows):
    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", ramp_rows("A", 12))
    cfg = load_experiment(CONFIGS / "demo.yaml")
    cfg.tune.enabled, cfg.tune.space = True, str(tmp_path / "missing.yaml")
    with pytest.raises((FileNotFoundError, ValueError), match="missing.yaml"):
        plan_stages(ds, make_splits(ds.metadata().to_pandas(), [], 0.25, 0), cfg, None)


def test_the_report_reads_the_cases_birads_beside_a_readers_csv(tmp_path, ramp_rows):
    """The dataset's BI-RADS is one more reader, on the cases the reference model scored."""
    from diffkd.data.ingest import pseudonymizer_for
    from diffkd.evaluate.readers import DATASET_READER, load_readers
    from diffkd.experiments.run_report import report_reads

    ds = ImageDataset(tmp_path / "ds")
    (tmp_path / ".ds.salt").write_text("ab" * 32)  # the salt a readers CSV's raw case ids are mapped with
    (tmp_path / ".ds.salt").chmod(0o600)  # a salt other users can read is refused
    case_ids = [pseudonymizer_for(ds).case("A", f"raw{i}") for i in range(8)]
    rows = ramp_rows("A", 8).set_column(0, "case_id", pa.array(case_ids))
    ds.write_center("A", rows)
    preds = ds.metadata().to_pandas().head(6).assign(model="student_kd", split="test", prob=0.5)
    csv = tmp_path / "reads.csv"
    csv.write_text("reader,experience,case_id,call\n" + "".join(f"R1,senior,raw{i},{i % 2}\n" for i in range(8)))
    notes: list[str] = []
    reads = load_readers(report_reads(ds, str(csv), preds, "student_kd", notes), birads_positive_from="4a")
    assert set(reads.reader) == {"R1", DATASET_READER}
    own = reads[reads.reader == DATASET_READER]
    assert set(own.case_id) <= set(preds.case_id) and set(own.birads) == {"4b"}  # ramp rows: 4b on odd rows
    assert len(reads[reads.reader == "R1"]) == 6 and "2 reader read(s)" in notes[0]
    ds.write_center("A", without(rows, ["birads"]))
    assert report_reads(ds, None, preds, "student_kd", []) is None


def test_a_modality_only_an_external_center_has_skips_the_pairing_free_stage(tmp_path, ramp_rows):
    """Doppler images in the external center alone: nothing to train the Doppler teacher on, so the plan
    skips the stage (the whole dataset holding both modalities is not enough)."""
    import pyarrow.compute as pc

    ds = ImageDataset(tmp_path / "ds")
    ds.write_center("A", ramp_rows("A", 24))
    ds.write_center("B", ramp_rows("B", 12, modality="us_doppler"))
    cfg = load_experiment(CONFIGS / "demo.yaml")
    assert set(pc.unique(ds.metadata().column("modality")).to_pylist()) == {"us", "us_doppler"}
    plan = plan_stages(ds, make_splits(ds.metadata().to_pandas(), ["B"], 0.25, 0), cfg, None)
    assert not plan.pairing_free
    why = plan.skipped["student_pairing_free"]
    assert "no 'us_doppler' images in the train split and no 'us_doppler' images in the internal-validation" in why
    assert "their modalities: us;" in why and "whole dataset's: us, us_doppler" in why
    # the same images in a training center: the stage runs
    plan = plan_stages(ds, make_splits(ds.metadata().to_pandas(), [], 0.25, 0), cfg, None)
    assert plan.pairing_free and "student_pairing_free" not in plan.skipped


def test_missing_training_rows_names_split_and_modality():
    import pandas as pd

    from diffkd.experiments.stages import missing_training_rows

    rows = pd.DataFrame({"split": ["train", "train", "val", "test"], "modality": ["us", "us_doppler", "us", "us_doppler"],
                         "synthetic": [False, False, False, False]})
    assert missing_training_rows(rows, ("us",)) == []
    assert missing_training_rows(rows, ("us_doppler",)) == ["'us_doppler' images in the internal-validation split"]
    rows.loc[1, "synthetic"] = True  # a synthetic Doppler row is no training image of the modality
    assert missing_training_rows(rows, ("us_doppler",)) == ["'us_doppler' images in the train split",
                                                            "'us_doppler' images in the internal-validation split"]


def test_the_report_gets_every_trained_networks_health_from_its_training_json(tmp_path):
    import json

    from diffkd.experiments.run_report import health_inputs

    entry = {"checks": {"epochs": 3}, "flags": ["inverted"]}
    models = tmp_path / "models"
    for name in ("teacher", "student", "deep_feature_model_fold0", "diffusion"):
        (models / name).mkdir(parents=True)
    for name in ("teacher", "student", "deep_feature_model_fold0"):
        (models / name / "training.json").write_text(json.dumps({"metrics": {"health": entry}}))
    dirs = {"teacher": str(models / "teacher"), "student_kd": str(models / "student"),
            "diffusion": str(models / "diffusion")}
    assert health_inputs(dirs, models) == {"teacher": entry, "student_kd": entry, "deep_feature_model_fold0": entry}
