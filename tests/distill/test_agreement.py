"""Teacher-student agreement: the measures on hand-built logits, and that they see real transfer."""
import math

import pytest
import torch
from torch import nn

from diffkd.distill import LogitKD
from diffkd.distill.agreement import agreement


def test_identical_logits_agree_perfectly():
    logits = torch.tensor([[0.0, 1.0], [2.0, -1.0], [0.5, 0.2]])
    out = agreement(logits, logits.clone())
    assert out["agree_corr"] == pytest.approx(1.0)
    assert out["agree_kl"] == pytest.approx(0.0, abs=1e-12)
    assert out["agree_top1"] == 1.0


def test_reversed_ranking_scale_and_hand_computed_kl():
    teacher = torch.tensor([[0.0, 1.0], [0.0, -1.0], [0.0, 3.0]])
    reversed_ = agreement(-teacher, teacher)
    assert reversed_["agree_corr"] == pytest.approx(-1.0) and reversed_["agree_top1"] == 0.0
    # twice the scale: the same ranking and decisions, but different probabilities
    scaled = agreement(2 * teacher, teacher)
    assert scaled["agree_corr"] == pytest.approx(1.0) and scaled["agree_top1"] == 1.0
    p_t, p_s = torch.softmax(teacher, 1), torch.softmax(2 * teacher, 1)
    expected = float((p_t * (p_t.log() - p_s.log())).sum(1).mean())
    assert scaled["agree_kl"] == pytest.approx(expected, rel=1e-6) and expected > 0


def test_margins_not_raw_logits_are_correlated_and_a_constant_student_has_no_ranking():
    teacher = torch.tensor([[1.0, 2.0], [5.0, 5.5], [0.0, -1.0]])  # margins 1, 0.5, -1
    shifted = teacher + torch.tensor([[10.0], [-3.0], [7.0]])  # per-image shifts leave the margins alone
    assert agreement(shifted, teacher)["agree_corr"] == pytest.approx(1.0)
    assert math.isnan(agreement(torch.zeros(3, 2), teacher)["agree_corr"])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        agreement(torch.zeros(3, 2), torch.zeros(4, 2))


def _distil(teacher: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, steps: int = 300) -> nn.Module:
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(inputs.shape[1], 16), nn.ReLU(), nn.Linear(16, 2))
    kd = LogitKD(temperature=2.0, alpha=1.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        kd.soft_loss(student(inputs), targets).backward()
        optimizer.step()
    return student


def test_a_distilled_student_agrees_with_its_teacher_and_one_taught_shuffled_outputs_does_not():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2)).requires_grad_(False)
    train, held_out = torch.randn(400, 5), torch.randn(400, 5)
    taught = teacher(train)
    faithful = _distil(teacher, train, taught)
    shuffled = _distil(teacher, train, taught[torch.randperm(len(taught))])
    with torch.no_grad():
        good = agreement(faithful(held_out), teacher(held_out))
        bad = agreement(shuffled(held_out), teacher(held_out))
    assert good["agree_corr"] > 0.9 and good["agree_top1"] > 0.85
    assert abs(bad["agree_corr"]) < 0.3 and bad["agree_top1"] < 0.7
    assert good["agree_kl"] < bad["agree_kl"]
