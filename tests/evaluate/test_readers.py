"""Reader import, operating points, McNemar comparisons and reader AUCs against hand-computed cases."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from diffkd.evaluate.metrics import CIOptions
from diffkd.evaluate.readers import (DATASET_READER, ReadersError, birads_positive_from_default, compare_readers,
                                     dataset_birads_reads, load_readers, mcnemar, read_scores, reader_aucs,
                                     reader_operating_points)


def test_mcnemar_exact_mid_p_hand_case():
    # 5 cases only the model gets right, 1 only the reader: exact two-sided p = 2 * P(X <= 1 | 6, 1/2)
    # = 2 * 7/64 = 14/64; mid-p subtracts P(X = 1) = 6/64 -> 8/64
    model = [True] * 5 + [False] + [True] * 4
    reader = [False] * 5 + [True] + [True] * 4
    result = mcnemar(model, reader)
    assert (result.model_only, result.reader_only) == (5, 1)
    assert result.p == pytest.approx(8 / 64) and result.method == "exact mid-p"
    # balanced discordance (2 vs 2): no evidence either way, mid-p = 2 * 11/16 - 6/16 = 1
    assert mcnemar([True, True, False, False], [False, False, True, True]).p == pytest.approx(1.0)


def test_mcnemar_large_discordance_uses_chi_square():
    model = [True] * 30 + [False] * 10
    reader = [False] * 30 + [True] * 10
    result = mcnemar(model, reader)
    assert result.p == pytest.approx(stats.chi2.sf((20 - 1) ** 2 / 40, 1))
    assert mcnemar([True, False], [True, False]).p == 1.0


def write(tmp_path, text):
    path = tmp_path / "readers.csv"
    path.write_text(text)
    return path


def test_load_readers_bases_and_precedence(tmp_path):
    path = write(tmp_path, "Reader,Experience,case_id,call,probability,birads\n"
                           "R1,Senior,c1,upgrade,,\n"
                           "R1,Senior,c2,,0.8,\n"
                           "R1,Senior,c3,,,4B\n"
                           "R1,Senior,c4,,,BI-RADS 5\n"
                           "R2,junior,c1,0,0.9,5\n")
    reads = load_readers(path)
    assert reads.call.tolist() == [1, 1, 0, 1, 0]  # 4b < 4c: negative; R2's explicit call wins
    assert reads.basis.tolist() == ["call", "probability", "birads", "birads", "call"]
    assert reads.experience.tolist()[0] == "senior"
    assert load_readers(path, birads_positive_from="4b").call.tolist()[2] == 1


@pytest.mark.parametrize("text, message", [
    ("reader,case_id,call\nR1,c1,1\n", "missing column.*experience"),
    ("reader,experience,case_id\nR1,senior,c1\n", "no read column"),
    ("reader,experience,case_id,birads\nR1,senior,c1,4a\nR1,senior,c2,7x\n", "line 3, column 'birads'"),
    ("reader,experience,case_id,probability\nR1,senior,c1,1.5\n", "line 2, column 'probability'"),
    ("reader,experience,case_id,call\nR1,senior,c1,maybe\n", "line 2, column 'call'"),
    ("reader,experience,case_id,call\nR1,senior,,1\n", "line 2: column 'case_id' is empty"),
    ("reader,experience,case_id,call,birads\nR1,senior,c1,,\n", "line 2: none of call, birads"),
    ("reader,experience,case_id,call\nR1,senior,c1,1\nR1,senior,c1,0\n", "more than once \\(lines 2, 3\\)"),
    ("reader,experience,case_id,call\nR1,senior,c1,1\nR1,junior,c2,0\n", "several experience levels"),
])
def test_bad_reads_are_named(tmp_path, text, message):
    with pytest.raises(ReadersError, match=message):
        load_readers(write(tmp_path, text))


def test_compare_readers_hand_case():
    # 4 positives, 4 negatives on the external set; model threshold 0.5
    model = pd.DataFrame({"case_id": [f"c{i}" for i in range(8)], "split": "test",
                          "label": [1, 1, 1, 1, 0, 0, 0, 0],
                          "prob": [0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.2, 0.1]})
    reads = pd.DataFrame({"reader": "R1", "experience": "senior", "case_id": model.case_id,
                          "call": [1, 0, 0, 1, 1, 1, 0, 0], "basis": "call"})
    (row,) = compare_readers(reads, model, threshold=0.5)
    assert row["cohort"] == "external" and row["n"] == 8
    assert row["model_sensitivity"] == 0.75 and row["reader_sensitivity"] == 0.5
    assert row["model_specificity"] == 0.75 and row["reader_specificity"] == 0.5
    # positives: model-only right c1, c2; reader-only right c3 -> (2, 1); negatives: model-only c5 -> (1, 0)
    assert row["discordant_sensitivity"] == [2, 1] and row["discordant_specificity"] == [1, 0]
    assert row["p_sensitivity"] == pytest.approx(2 * 4 / 8 - 3 / 8)  # exact 1.0, mid-p 1 - P(X=1|3)
    (point,) = reader_operating_points(reads, model).to_dict("records")
    assert point["sensitivity"] == 0.5 and point["n"] == 8
    with pytest.raises(ReadersError, match="absent from the predictions"):
        compare_readers(pd.concat([reads, reads.iloc[[0]].assign(case_id="zz")]), model, 0.5)


def test_reads_keep_their_birads_level_and_probability(tmp_path):
    path = write(tmp_path, "reader,experience,case_id,call,probability,birads\n"
                           "R1,senior,c1,1,,\nR1,senior,c2,,0.8,\nR1,senior,c3,,,BI-RADS 4\nR2,junior,c1,0,0.9,5\n")
    reads = load_readers(path)
    assert reads.birads.fillna("-").tolist() == ["-", "-", "4b", "5"]
    assert reads.probability.fillna(-1).tolist() == [-1, 0.8, -1, 0.9]
    assert read_scores(reads).fillna(-1).tolist() == [-1, 0.8, 3.0, 5.0]  # BI-RADS as its rank, else probability


def test_the_birads_cut_follows_the_question():
    assert birads_positive_from_default(("benign", "malignant")) == "4a"  # BI-RADS 4 or 5: biopsy recommended
    assert birads_positive_from_default(("DCIS", "upgrade")) == "4c"  # every DCIS was biopsied already


def test_the_datasets_birads_is_one_reader():
    cases = pd.DataFrame({"case_id": ["a", "a", "b", "c", "d"], "birads": ["4b", "4b", "3", None, "2"]})
    own = dataset_birads_reads(cases)
    assert own.reader.unique().tolist() == [DATASET_READER] and own.case_id.tolist() == ["a", "b", "d"]
    reads = load_readers(own, birads_positive_from="4a")
    assert reads.call.tolist() == [1, 0, 0] and set(reads.basis) == {"birads"}
    assert dataset_birads_reads(cases.assign(birads=None)) is None


def test_reader_aucs_set_birads_beside_every_model():
    rng = np.random.default_rng(0)
    n = 60
    label = np.tile([0, 1], n // 2)
    levels = np.array(["2", "3", "4a", "4b", "4c", "5"])
    birads = levels[np.clip(label * 2 + rng.integers(0, 4, n), 0, 5)]
    cases = pd.DataFrame({"case_id": [f"c{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                          "center": "X", "split": np.where(np.arange(n) < 20, "val", "test"), "label": label})
    preds = pd.concat([cases.assign(model="good", prob=np.clip(0.5 * label + rng.random(n) * 0.6, 0, 1)),
                       cases.assign(model="noise", prob=rng.random(n))], ignore_index=True)
    reads = pd.concat([dataset_birads_reads(cases.assign(birads=birads)),
                       pd.DataFrame({"reader": "calls only", "experience": "junior", "case_id": cases.case_id,
                                     "call": label})], ignore_index=True)
    entries = reader_aucs(load_readers(reads, birads_positive_from="4a"), preds, CIOptions("delong"))
    assert [(e["reader"], e["cohort"]) for e in entries] == [(DATASET_READER, "external"), (DATASET_READER, "internal")]
    external = entries[0]
    test = cases.split == "test"
    rank = pd.Series(birads).map(lambda v: list(levels).index(v)).to_numpy()
    assert external["n"] == 40 and external["auc"] == pytest.approx(roc_auc_score(label[test], rank[test]))
    assert external["auc_ci"][0] < external["auc"] < external["auc_ci"][1]
    by_model = {m["model"]: m for m in external["models"]}
    good = by_model["good"]
    assert good["n"] == 40 and good["method"] == "delong"
    assert good["difference"] == pytest.approx(roc_auc_score(label[test], preds.prob[:n][test]) - external["auc"])
    assert by_model["noise"]["difference"] < good["difference"]
