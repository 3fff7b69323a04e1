"""Patient-level, stratified, seeded splits; external centers test-only; the leakage guard."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diffkd.data.splits import (LeakageError, SplitConfig, check_no_leakage, ids_digest, leave_one_center_out,
                                make_splits, split_case_ids)


def cohort(centers=("A", "B", "C"), patients=60, seed=0, synthetic_per_center=0) -> pd.DataFrame:
    """1-3 images per patient, ~30% upgrade patients, optional synthetic rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for center in centers:
        for p in range(patients):
            label = int(rng.random() < 0.3)
            for k in range(rng.integers(1, 4)):
                rows.append(dict(case_id=f"{center}-{p}", patient_id=f"pid-{center}-{p}", center=center,
                                 label=label, modality="us", synthetic=False))
        for s in range(synthetic_per_center):
            rows.append(dict(case_id=f"syn-{center}-{s}", patient_id=f"syn-{center}-{s}", center=center,
                             label=s % 2, modality="us", synthetic=True))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)  # order must not matter


def test_patient_level_stratified_and_external_test_only():
    df = cohort()
    out = make_splits(df, external=["C"], val_fraction=0.25, seed=1)
    assert list(out.columns) == ["case_id", "patient_id", "center", "label", "modality", "synthetic", "split"]
    assert (out[out.center == "C"].split == "test").all()
    assert set(out[out.center != "C"].split) == {"train", "val"}
    assert out.groupby("patient_id").split.nunique().max() == 1
    patients = out[out.center != "C"].drop_duplicates("patient_id")
    for (center, label), group in patients.groupby(["center", "label"]):
        n_val = (group.split == "val").sum()
        assert n_val == int(len(group) * 0.25 + 0.5), (center, label)


def test_deterministic_from_the_seed_and_independent_of_row_order():
    df = cohort()
    a = make_splits(df, ["C"], seed=3).set_index("case_id").split
    b = make_splits(df.iloc[::-1], ["C"], seed=3).set_index("case_id").split
    assert a.sort_index().equals(b.sort_index())
    c = make_splits(df, ["C"], seed=4).set_index("case_id").split
    assert not a.sort_index().equals(c.sort_index())


def test_adding_a_center_keeps_everyone_elses_split():
    small = make_splits(cohort(("A", "B")), [], seed=0)
    big = make_splits(pd.concat([cohort(("A", "B")), cohort(("D",), seed=9)]), [], seed=0)
    merged = small.merge(big, on=["case_id", "patient_id"], suffixes=("_small", "_big")).drop_duplicates("case_id")
    assert (merged.split_small == merged.split_big).all()


def test_synthetic_rows_train_only_and_dropped_for_external_centers():
    df = cohort(synthetic_per_center=5)
    out = make_splits(df, ["C"], seed=0)
    synth = out[out.synthetic]
    assert (synth.split == "train").all() and set(synth.center) == {"A", "B"}


def test_bad_arguments():
    df = cohort(("A", "B"))
    with pytest.raises(ValueError, match="Z not in the dataset"):
        make_splits(df, ["Z"])
    with pytest.raises(ValueError, match="every center is external"):
        make_splits(df, ["A", "B"])
    with pytest.raises(ValueError, match="val_fraction"):
        make_splits(df, [], val_fraction=1.0)
    with pytest.raises(ValueError, match="lacks column"):
        make_splits(df.drop(columns=["patient_id"]), [])


def test_leakage_guard_fails_loudly():
    out = make_splits(cohort(), ["C"], seed=0)
    check_no_leakage(out)
    leaky = out.copy()
    victim = leaky[leaky.split == "train"].patient_id.iloc[0]
    leaky.loc[leaky.index[leaky.center == "C"][:1], "patient_id"] = victim  # same patient in the external center
    with pytest.raises(LeakageError, match=f"{victim}: splits test, train"):
        check_no_leakage(leaky)
    synthetic_val = out.copy()
    synthetic_val.loc[len(synthetic_val)] = ["syn-1", "syn-p1", "A", 1, "us", True, "val"]
    with pytest.raises(LeakageError, match="synthetic"):
        check_no_leakage(synthetic_val)


def test_leave_one_center_out():
    folds = leave_one_center_out(["B", "A", "C", "A"])
    assert folds == [("A", ["B", "C"]), ("B", ["A", "C"]), ("C", ["A", "B"])]
    with pytest.raises(ValueError, match="at least two"):
        leave_one_center_out(["A"])


def test_a_split_config_gives_the_case_ids_of_make_splits_and_an_order_free_digest():
    df = cohort()
    split = SplitConfig(external=["C"], val_fraction=0.25, seed=1)
    ids = split_case_ids(df, split)
    table = make_splits(df, external=["C"], val_fraction=0.25, seed=1)
    for name in ("train", "val", "test"):
        assert ids[name] == sorted(table.loc[table.split == name, "case_id"])
    assert ids_digest(ids["train"]) == ids_digest(reversed(ids["train"]))
    assert ids_digest(ids["train"]) != ids_digest(ids["train"][1:])
    with pytest.raises(ValueError, match="external center.*Z are not in the dataset; it has A, B, C"):
        split_case_ids(df, SplitConfig(external=["Z"]))


# ---- synthetic rows from a generator of another split are refused ----------------------------------

def _generated_by(two_modality_rows, ds, model_dir, external: list[str], val_fraction: float, n: int = 6,
                  center: str = "A") -> str:
    """Synthetic rows of `center` written as `diffkd synth run` writes them, by a generator trained on the given split."""
    import json
    import os

    import pyarrow as pa

    from diffkd.data.splits import make_splits
    from diffkd.models.diffusion import TRAINING_INFO
    from diffkd.synth.sampling import generator_provenance

    meta = ds.metadata().to_pandas()
    table = make_splits(meta, external=external, val_fraction=val_fraction, seed=0)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, TRAINING_INFO), "w") as f:
        json.dump({"split": {"external": external, "val_fraction": val_fraction, "seed": 0},
                   "train_case_ids_sha256": ids_digest(table.loc[table["split"] == "train", "case_id"])}, f)
    source = f"syn-{os.path.basename(model_dir)}"
    rows = two_modality_rows(center, n, 0, 16, seed=9)
    rows = rows.set_column(rows.column_names.index("synthetic"), "synthetic", pa.array([True] * n))
    rows = rows.set_column(rows.column_names.index("source"), "source", pa.array([source] * n))
    rows = rows.set_column(rows.column_names.index("case_id"), "case_id",
                           pa.array([f"synthetic-{source}-{i}" for i in range(n)]))
    ds.write_synthetic(center, rows, run_id=f"{source}-chunk", generator=generator_provenance(model_dir, source))
    return source


def test_synthetic_rows_of_a_generator_trained_on_another_split_are_refused(tmp_path, two_modality_dataset,
                                                                            two_modality_rows):

    from diffkd.data.splits import check_synthetic_split, split_fingerprint
    from diffkd.train.teacher import TeacherConfig, train_teacher

    ds = two_modality_dataset(tmp_path / "data", n_us=12, n_doppler=0, size=16)
    current = make_splits(ds.metadata().to_pandas(), external=["C"], val_fraction=0.3, seed=0)
    same = _generated_by(two_modality_rows, ds, str(tmp_path / "gen-same"), ["C"], 0.3)
    check_synthetic_split(ds, current)  # the generator saw this split's training patients only: accepted

    other = _generated_by(two_modality_rows, ds, str(tmp_path / "gen-other"), ["B"], 0.3)  # B was internal for it: seen
    other_fp = split_fingerprint(make_splits(ds.metadata().to_pandas(), external=["B"], val_fraction=0.3, seed=0))
    with pytest.raises(LeakageError) as err:
        check_synthetic_split(ds, current)
    message = str(err.value)
    assert other in message and same not in message  # names the offending run, not the good one
    assert split_fingerprint(current) in message and other_fp in message  # and both fingerprints
    check_synthetic_split(ds, current, sources=(same,))  # naming the good run mixes that one only

    # the standalone stage refuses before any training starts (no Ray is needed to get here)
    with pytest.raises(LeakageError, match=other):
        train_teacher(ds, current, TeacherConfig(arch="resnet18"), str(tmp_path / "teacher"), synthetic_ratio=0.5)


def test_synthetic_rows_without_a_recorded_generator_split_are_refused(tmp_path, two_modality_dataset,
                                                                       two_modality_rows):
    import pyarrow as pa

    from diffkd.data.splits import check_synthetic_split

    ds = two_modality_dataset(tmp_path / "data", n_us=12, n_doppler=0, size=16)
    rows = two_modality_rows("A", 4, 0, 16, seed=9)
    rows = rows.set_column(rows.column_names.index("synthetic"), "synthetic", pa.array([True] * 4))
    ds.write_synthetic("A", rows, run_id="legacy")
    current = make_splits(ds.metadata().to_pandas(), external=["C"], val_fraction=0.3, seed=0)
    with pytest.raises(LeakageError, match="legacy.*not recorded"):
        check_synthetic_split(ds, current)
    check_synthetic_split(ds, current[current["center"] != "A"])  # centers it does not train on are not mixed


def test_the_generator_and_a_training_stage_fingerprint_a_split_alike_when_cases_have_several_images():
    """A case imaged 1-3 times: the generator's recorded digest and the teachers' check must agree."""
    from diffkd.data.splits import fingerprint_of_digest, split_fingerprint

    meta = cohort()
    assert meta["case_id"].duplicated().any()
    generator = ids_digest(split_case_ids(meta, SplitConfig(external=["C"], val_fraction=0.25, seed=0))["train"])
    assert fingerprint_of_digest(generator) == split_fingerprint(make_splits(meta, ["C"], 0.25, 0))
