"""The audit's measures on plain arrays: no model, no dataset, no Ray."""
from __future__ import annotations

import numpy as np
import pytest

from diffkd.synth.stats import label_effect, label_recovery


def test_fid_and_kid_match_known_gaussian_shifts():
    from diffkd.synth.stats import frechet_distance, kernel_distance, nearest

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))
    shifted = b + np.array([1.0, 0, 0, 0, 0, 0, 0, 0])
    assert frechet_distance(a, b) < 0.05
    assert frechet_distance(a, shifted) == pytest.approx(1.0, abs=0.1)  # FID of N(0,I) vs N(e1,I) is |e1|^2
    same, apart = kernel_distance(a, b, 200, 20), kernel_distance(a, shifted, 200, 20)
    assert abs(same) < 0.02 < apart
    dist, idx = nearest(np.array([[0.0, 0.0], [5.0, 5.0]]), np.array([[1.0, 0.0], [5.0, 4.0], [9.0, 9.0]]))
    assert idx.tolist() == [0, 1] and dist.tolist() == pytest.approx([1.0, 1.0])


def test_near_copy_thresholds_come_from_real_pairs_and_flag_a_planted_copy():
    from diffkd.data.pipeline import PipelineConfig
    from diffkd.synth.stats import near_copies

    rng = np.random.default_rng(0)
    pipe = PipelineConfig(image_size=16)

    def images(n):  # smooth random blobs, in the pipeline's normalisation
        base = rng.uniform(0, 1, (n, 1, 4, 4)).repeat(4, axis=2).repeat(4, axis=3)
        return ((base + rng.normal(0, 0.02, base.shape) - pipe.norm_mean) / pipe.norm_std).astype(np.float32)

    train, val, synth = images(60), images(30), images(20)
    synth[7] = train[11]  # the generator "memorised" training image 11
    feats = {name: rng.normal(size=(len(x), 16)).astype(np.float32) for name, x in
             (("train", train), ("val", val), ("synth", synth))}
    feats["synth"][7] = feats["train"][11]
    arrays = lambda x: {"image": x, "case_id": np.array([f"c{i}" for i in range(len(x))], dtype=object)}  # noqa: E731
    copies = near_copies(arrays(train), arrays(val), arrays(synth), feats["train"], feats["val"], feats["synth"],
                         pipe, quantile=0.05)
    assert copies["flagged_case_ids"] == ["c7"] and copies["count"] == 1
    assert copies["synthetic_pixel_index"][7] == 11 and copies["synthetic_pixel"][7] == pytest.approx(0, abs=1e-5)
    assert 0 < copies["pixel_threshold"] <= np.median(copies["real_pixel"])


def test_label_recovery_is_balanced_so_a_majority_guesser_scores_half_on_both_sets():
    rng = np.random.default_rng(0)
    train_y = (rng.random(200) < 0.25).astype(int)  # real prevalence of upgrades
    real_y = (rng.random(100) < 0.25).astype(int)
    synth_y = np.repeat([0, 1], 50)  # a label-balanced synthetic set
    # A classifier that learnt nothing but the prevalence: every score low, in no order.
    guess = label_recovery(train_y, rng.random(200) * 0.3, synth_y, rng.random(100) * 0.3, real_y,
                           rng.random(100) * 0.3)
    assert guess["conditional_accuracy"] == pytest.approx(0.5, abs=0.1)
    assert guess["conditional_accuracy_real"] == pytest.approx(0.5, abs=0.15)
    assert guess["conditional_auc_ci"][0] < 0.5 < guess["conditional_auc_ci"][1]
    # One whose score follows the label: the threshold fixed on the real training set carries over.
    score = lambda y: 0.2 + 0.5 * y + 0.05 * rng.random(len(y))  # noqa: E731
    follows = label_recovery(train_y, score(train_y), synth_y, score(synth_y), real_y, score(real_y))
    assert follows["conditional_accuracy"] == 1.0 and follows["conditional_accuracy_real"] == 1.0
    assert follows["conditional_auc"] == 1.0 and 0.25 < follows["label_threshold"] <= 0.75


def test_label_effect_is_the_paired_rise_with_a_t_interval():
    out = label_effect(np.array([0.2, 0.3, 0.1, 0.4]), np.array([0.3, 0.5, 0.1, 0.5]))
    assert out["label_effect"] == pytest.approx(0.1) and out["label_pairs"] == 4
    assert out["label_effect_positive_share"] == 0.75  # the tie does not count as a rise
    lo, hi = out["label_effect_ci"]
    assert lo < 0.1 < hi and hi - 0.1 == pytest.approx(0.1 - lo)
