import math

import pytest

from diffkd.evaluate.health import (FLAG_TEXT, HealthThresholds, check_health, constant_cross_entropy, health_line,
                                 longest_run, warmup_epochs)

LN2 = math.log(2)


def history(ces, aucs, se=0.05):
    return [{"epoch": i + 1, "loss": ce + 0.3, "ce": ce, "val_auc": auc, "val_auc_se": se}
            for i, (ce, auc) in enumerate(zip(ces, aucs))]


def test_constant_cross_entropy_is_the_prevalence_entropy():
    labels = [1] * 25 + [0] * 75
    assert constant_cross_entropy(labels) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    # balanced class weights n / (2 n_c) make the weighted prevalence one half
    assert constant_cross_entropy(labels, (100 / 150, 100 / 50)) == pytest.approx(LN2)
    assert constant_cross_entropy([1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="no training labels"):
        constant_cross_entropy([])


def test_healthy_history_raises_no_flag():
    h = history([0.70, 0.62, 0.55, 0.50, 0.46, 0.42, 0.40, 0.38], [0.55, 0.66, 0.71, 0.74, 0.75, 0.77, 0.76, 0.78])
    result = check_health(h, LN2)
    assert result["flags"] == []
    c = result["checks"]
    assert c["warmup_epochs"] == 2 and c["epochs_judged"] == 6 and c["epochs_ce_not_below_constant"] == 0
    assert c["val_auc_min"] == 0.55 and c["longest_run_auc_below_half"] == 0
    assert c["auc_swings"] == 0 and c["max_auc_change"] == pytest.approx(0.05)
    assert c["auc_change_limit"] == pytest.approx(3 * math.hypot(0.05, 0.05), abs=1e-4)
    assert "healthy" in health_line("teacher", result)


def test_loss_above_the_constant_predictor_is_flagged():
    h = history([1.3, 2.1, 5.1, 1.6, 0.9, 0.6, 1.4, 0.8], [0.6, 0.62, 0.63, 0.64, 0.66, 0.65, 0.66, 0.67])
    result = check_health(h, LN2)
    assert result["flags"] == ["loss_not_below_constant"]
    assert result["checks"]["epochs_ce_not_below_constant"] == 5  # of the 6 epochs after warm-up
    # a loss that only beats the constant on half the judged epochs is not flagged (more than half must fail)
    h = history([1.0, 1.0, 0.8, 0.5, 0.8, 0.5, 0.8, 0.5], [0.6] * 8)
    assert "loss_not_below_constant" not in check_health(h, LN2)["flags"]


def test_warm_up_epochs_are_not_judged_by_the_loss():
    h = history([3.0, 2.0, 0.5, 0.45, 0.4, 0.35, 0.3, 0.3], [0.6] * 8)
    assert check_health(h, LN2)["flags"] == []


def test_the_ce_term_is_judged_not_the_total_loss():
    # a student's total loss carries its distillation terms; cross-entropy alone is compared with the constant
    h = [{"loss": 2.5, "ce": 0.4, "val_auc": 0.7, "val_auc_se": 0.05} for _ in range(6)]
    assert check_health(h, LN2)["flags"] == []
    without_ce = [{"loss": 2.5, "val_auc": 0.7, "val_auc_se": 0.05} for _ in range(6)]
    assert check_health(without_ce, LN2)["flags"] == ["loss_not_below_constant"]


def test_inverted_auc_is_flagged():
    h = history([0.5] * 8, [0.45, 0.30, 0.20, 0.10, 0.08, 0.20, 0.25, 0.30], se=0.2)
    result = check_health(h, LN2)
    assert result["flags"] == ["inverted"]
    assert result["checks"]["longest_run_auc_below_half"] == 8
    assert "FLAGGED" in health_line("student_pairing_free", result) and FLAG_TEXT["inverted"] in \
        health_line("student_pairing_free", result)
    # below 0.5 for two epochs only, not in a row of three: not inverted
    h = history([0.5] * 6, [0.45, 0.6, 0.48, 0.62, 0.65, 0.66], se=0.2)
    assert "inverted" not in check_health(h, LN2)["flags"]
    # a two-epoch run below 0.5 throughout is inverted; one epoch alone is no pattern
    assert "inverted" in check_health(history([0.5] * 2, [0.4, 0.3], se=0.2), LN2)["flags"]
    assert "inverted" not in check_health(history([0.5], [0.3]), LN2)["flags"]


def test_swings_beyond_the_auc_noise_are_flagged():
    h = history([0.5] * 8, [0.6, 0.7, 0.93, 0.08, 0.85, 0.2, 0.9, 0.75], se=0.06)
    result = check_health(h, LN2)
    assert "unstable_auc" in result["flags"]
    assert result["checks"]["max_auc_change"] == pytest.approx(0.85)
    # the same moves on a validation set so small that its SE is 0.3 are noise
    h = history([0.5] * 8, [0.6, 0.7, 0.93, 0.3, 0.85, 0.4, 0.9, 0.75], se=0.3)
    assert "unstable_auc" not in check_health(h, LN2)["flags"]
    # a jump out of warm-up's first epoch is learning, not a swing
    h = history([0.5] * 8, [0.3, 0.9, 0.91, 0.9, 0.92, 0.91, 0.92, 0.93], se=0.03)
    assert check_health(h, LN2)["flags"] == []


def test_missing_values_are_not_judged():
    h = [{"loss": 0.4, "val_auc": math.nan, "val_auc_se": math.nan}, {"loss": 0.3, "val_auc": 0.7},
         {"loss": 0.3, "val_auc": 0.9}]
    result = check_health(h, LN2)
    assert result["flags"] == [] and result["checks"]["auc_swings"] == 0
    assert result["checks"]["max_auc_change"] is None
    assert check_health([], LN2) == {"checks": {"epochs": 0, "warmup_epochs": 0, "constant_ce": round(LN2, 4),
                                                "train_ce_first": None, "train_ce_last": None, "train_ce_min": None,
                                                "epochs_judged": 0, "epochs_ce_not_below_constant": 0},
                                     "flags": []}


def test_helpers():
    assert longest_run([True, True, False, True, True, True, False]) == 3
    assert warmup_epochs(12, 0.25) == 3 and warmup_epochs(2, 0.25) == 1 and warmup_epochs(1, 0.25) == 1
    assert HealthThresholds().inverted_epochs == 3
