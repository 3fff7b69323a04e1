"""The distillation losses: values, shapes, gradients, equality, and pairing-free order invariance."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffkd.distill import (LOSSES, PAIRING_FREE, DistillBatch, FeatureKD, FeatureLoss, FeatureWidths,
                            GroupDenseKD, GroupPrototypeKD, LogitKD, build_loss, register_loss)


def _feats(b, c, h=3, w=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g)


def _labels(*values):
    return torch.tensor(values, dtype=torch.long)


def _all_grads_finite(module, *tensors):
    grads = [p.grad for p in module.parameters() if p.requires_grad] + [t.grad for t in tensors]
    assert all(g is not None for g in grads), "a parameter or input got no gradient"
    return all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------- logit KD

def test_logit_kd_matches_hand_computed_value():
    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    kd = LogitKD(temperature=2.0, alpha=0.5)
    p_t = torch.softmax(t / 2, -1)
    p_s = torch.softmax(s / 2, -1)
    kl = (p_t * (p_t.log() - p_s.log())).sum()
    ce = -torch.log_softmax(s, -1)[0, 1]
    expected = 0.5 * ce + 0.5 * 4.0 * kl
    assert torch.allclose(kd(s, t, _labels(1)), expected, atol=1e-6)


def test_logit_kd_soft_term_zero_iff_equal_and_alpha_zero_is_cross_entropy():
    s = torch.randn(5, 2, requires_grad=True)
    kd = LogitKD(temperature=4.0, alpha=0.9)
    assert kd.soft_loss(s, s.detach().clone()).abs().item() < 1e-6
    assert kd.soft_loss(s, torch.randn(5, 2)).item() > 1e-4
    y = torch.randint(0, 2, (5,))
    assert torch.allclose(LogitKD(alpha=0.0)(s, torch.randn(5, 2), y), F.cross_entropy(s, y))
    kd(s, torch.randn(5, 2), y).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_logit_kd_t_squared_keeps_gradient_scale():
    """Without T² the soft gradient falls as 1/T²; with it, it stays of the same order."""
    s = torch.tensor([[1.0, -1.0]], requires_grad=True)
    t = torch.tensor([[-1.0, 1.0]])
    norms = []
    for temperature in (2.0, 8.0):
        s.grad = None
        LogitKD(temperature=temperature).soft_loss(s, t).backward()
        norms.append(s.grad.norm().item())
    assert 0.5 < norms[0] / norms[1] < 2.0


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"alpha": 1.5}])
def test_logit_kd_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        LogitKD(**kwargs)


# ---------------------------------------------------------------- feature KD

@pytest.mark.parametrize("kind", ["mse", "attention"])
def test_feature_kd_shapes_gradients_and_grid_resize(kind):
    kd = FeatureKD(student_channels=6, teacher_channels=10, kind=kind)
    s = _feats(4, 6, 2, 2).requires_grad_()
    t = _feats(4, 10, 4, 4, seed=1)
    loss = kd(s, t)
    assert loss.dim() == 0 and loss.item() > 0
    loss.backward()
    assert _all_grads_finite(kd, s)


@pytest.mark.parametrize("kind", ["mse", "attention"])
def test_feature_kd_zero_when_student_equals_teacher(kind):
    kd = FeatureKD(8, 8, kind=kind)
    if kd.projector is not None:
        kd.projector.set_identity()
    f = _feats(3, 8)
    assert kd(f, f.clone()).item() < 1e-10
    assert kd(f, _feats(3, 8, seed=5)).item() > 1e-3


def test_feature_kd_refuses_unpaired_batches_and_unknown_kind():
    with pytest.raises(ValueError, match="pairs images one to one"):
        FeatureKD(4, 4)(_feats(3, 4), _feats(2, 4))
    with pytest.raises(ValueError, match="'mse' or 'attention'"):
        FeatureKD(4, 4, kind="cosine")


# ---------------------------------------------------------------- GKD-Pro

def test_gkd_pro_scalar_with_finite_gradients_everywhere():
    kd = GroupPrototypeKD(student_channels=6, teacher_channels=16, num_queries=3, num_heads=4, attn_dim=8)
    s = _feats(5, 6, 2, 2).requires_grad_()
    t = _feats(7, 16, 3, 3, seed=1)  # different batch size and grid: no pairing
    loss = kd(s, _labels(0, 1, 0, 1, 1), t, _labels(1, 0, 0, 1, 0, 1, 1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert _all_grads_finite(kd, s)
    assert kd.queries.grad.abs().sum() > 0


def test_gkd_pro_alignment_zero_when_student_equals_teacher():
    kd = GroupPrototypeKD(16, 16, num_queries=4, num_heads=2, attn_dim=8)
    kd.projector.set_identity()
    f, y = _feats(6, 16), _labels(0, 0, 1, 1, 0, 1)
    parts = kd.terms(f, y, f.clone(), y)
    assert parts["align"].item() < 1e-6
    assert 0.0 < parts["distinct"].item() < 1.0
    assert kd.terms(_feats(6, 16, seed=9), y, f, y)["align"].item() > 1e-3


def test_gkd_pro_invariant_to_order_of_images_within_groups():
    kd = GroupPrototypeKD(6, 16, num_queries=3, num_heads=4, attn_dim=8)
    s, ys = _feats(6, 6), _labels(0, 1, 0, 1, 1, 0)
    t, yt = _feats(5, 16, seed=2), _labels(1, 0, 1, 0, 0)
    base = kd(s, ys, t, yt)
    ps, pt = torch.randperm(6, generator=torch.Generator().manual_seed(3)), torch.tensor([4, 2, 0, 3, 1])
    assert torch.allclose(kd(s[ps], ys[ps], t[pt], yt[pt]), base, atol=1e-6)
    # Swapping images between groups changes it: the grouping, not the order, is what counts.
    assert not torch.allclose(kd(s, ys.flip(0), t, yt), base, atol=1e-4)


def test_gkd_pro_without_a_shared_class_is_zero_but_keeps_the_graph():
    kd = GroupPrototypeKD(4, 8, num_queries=2, num_heads=2, attn_dim=4)
    s = _feats(2, 4).requires_grad_()
    loss = kd(s, _labels(0, 0), _feats(2, 8), _labels(1, 1))
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None


def test_gkd_pro_optimising_the_student_reaches_the_teacher_prototypes():
    torch.manual_seed(0)
    kd = GroupPrototypeKD(8, 8, num_queries=4, num_heads=2, attn_dim=8, distinct_weight=0.0)
    t, yt = _feats(6, 8, seed=1) + torch.tensor([2.0] * 4 + [-2.0] * 4).view(1, 8, 1, 1), _labels(0, 1, 0, 1, 0, 1)
    s = _feats(4, 8, seed=2).requires_grad_()
    ys = _labels(1, 0, 1, 0)
    opt = torch.optim.Adam([s, *kd.parameters()], lr=0.05)
    first = kd(s, ys, t, yt).item()
    for _ in range(100):
        opt.zero_grad()
        loss = kd(s, ys, t, yt)
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first


def test_gkd_pro_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="num_heads"):
        GroupPrototypeKD(4, 10, num_heads=4)


# ---------------------------------------------------------------- GKD-Den

def test_gkd_den_scalar_with_finite_gradients():
    kd = GroupDenseKD(6, 16)
    s = _feats(4, 6, 2, 2).requires_grad_()
    loss = kd(s, _labels(0, 1, 1, 0), _feats(3, 16, 3, 3, seed=1), _labels(1, 0, 1))
    assert loss.dim() == 0 and 0.0 < loss.item() <= 2.0
    loss.backward()
    assert _all_grads_finite(kd, s)


def test_gkd_den_near_zero_when_student_equals_teacher():
    kd = GroupDenseKD(16, 16, temperature=0.02)
    kd.projector.set_identity()
    f, y = _feats(4, 16), _labels(0, 1, 0, 1)
    equal = kd(f, y, f.clone(), y).item()
    other = kd(_feats(4, 16, seed=7), y, f, y).item()
    assert equal < 1e-3 and other > 100 * equal


def test_gkd_den_invariant_to_order_of_images_within_groups():
    kd = GroupDenseKD(6, 16)
    s, ys = _feats(6, 6), _labels(0, 1, 0, 1, 1, 0)
    t, yt = _feats(5, 16, seed=2), _labels(1, 0, 1, 0, 0)
    base = kd(s, ys, t, yt)
    ps, pt = torch.tensor([5, 3, 1, 0, 2, 4]), torch.tensor([2, 4, 0, 1, 3])
    assert torch.allclose(kd(s[ps], ys[ps], t[pt], yt[pt]), base, atol=1e-6)
    assert not torch.allclose(kd(s, ys.flip(0), t, yt), base, atol=1e-4)


# ---------------------------------------------------------------- standardised logit KD

def test_standardized_logit_kd_keeps_the_teachers_order_whatever_its_scale():
    """The plain term asks a student to copy a nearly constant teacher's tiny margins; this one only its order."""
    from diffkd.distill.ranking import StandardizedLogitKD

    kd = StandardizedLogitKD(temperature=4.0)
    teacher = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 0.1  # margins of sd ~0.14
    confident_same_order = teacher * 30 + torch.tensor([2.0, -1.0])
    assert float(kd.soft_loss(confident_same_order, teacher)) < 1e-6  # no pull toward the teacher's scale
    assert float(LogitKD(temperature=4.0).soft_loss(confident_same_order, teacher)) > 0.5  # Hinton's pulls hard
    assert float(kd.soft_loss(-confident_same_order, teacher)) > float(kd.soft_loss(torch.randn(64, 2), teacher))
    # large T: (1 - correlation of the margins) / 4
    a, b = torch.randn(512, 2), torch.randn(512, 2)
    b = a + b
    margins = torch.stack([a[:, 1] - a[:, 0], b[:, 1] - b[:, 0]])
    expected = (1 - torch.corrcoef(margins)[0, 1]) / 4
    assert math.isclose(float(StandardizedLogitKD(temperature=200.0).soft_loss(a, b)), float(expected), rel_tol=1e-3)


def test_standardized_logit_kd_gradients_and_limits():
    from diffkd.distill.ranking import StandardizedLogitKD

    kd = build_loss("logit_standardized", temperature=2.0)
    assert isinstance(kd, StandardizedLogitKD) and kd.blends_with_ce and kd.needs_pairs
    student = torch.randn(8, 2, requires_grad=True)
    kd.soft_loss(student, torch.randn(8, 2)).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    one = DistillBatch(student_logits=torch.randn(1, 2), teacher_logits=torch.randn(1, 2),
                       student_features=_feats(1, 4), teacher_features=_feats(1, 4), student_labels=_labels(1),
                       teacher_labels=_labels(1), pairs=(torch.arange(1), torch.arange(1)))
    assert kd.term(one) is None  # a single pair has no spread to standardise by
    with pytest.raises(ValueError, match="2-class"):
        kd.soft_loss(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="temperature"):
        build_loss("logit_standardized", temperature=0.0)


# ---------------------------------------------------------------- registry

def test_registry_builds_every_loss_and_names_pairing_free_ones():
    # A new loss registers itself without touching this test: it pins the shipped ones only.
    assert {"logit", "logit_standardized", "feature", "gkd_pro", "gkd_den"} <= set(LOSSES)
    assert {"gkd_pro", "gkd_den"} <= PAIRING_FREE and not {"logit", "logit_standardized", "feature"} & PAIRING_FREE
    assert PAIRING_FREE == {name for name, cls in LOSSES.items() if not cls.needs_pairs}
    assert isinstance(build_loss("logit", temperature=3.0), LogitKD)
    den = build_loss("gkd_den", FeatureWidths(student=4, teacher=8), temperature=0.2)
    assert isinstance(den, GroupDenseKD) and den.projector.conv.weight.shape[:2] == (8, 4)
    with pytest.raises(ValueError, match="unknown distillation loss 'dkd'"):
        build_loss("dkd")
    with pytest.raises(ValueError, match="pass widths"):
        build_loss("feature")
    assert math.isclose(build_loss("logit", temperature=3.0).temperature, 3.0)


def test_every_registered_loss_computes_its_term_from_one_batch():
    s_feats, t_feats = _feats(4, 6, seed=1), _feats(4, 16, seed=2)
    batch = DistillBatch(student_logits=torch.randn(4, 2), teacher_logits=torch.randn(4, 2),
                         student_features=s_feats, teacher_features=t_feats, student_labels=_labels(0, 1, 0, 1),
                         teacher_labels=_labels(1, 0, 1, 0), pairs=(torch.arange(4), torch.arange(4)))
    for name in LOSSES:
        value = build_loss(name, FeatureWidths(6, 16)).term(batch)
        assert value.dim() == 0 and torch.isfinite(value), name
    unpaired = DistillBatch(**{**batch.__dict__, "pairs": (torch.zeros(0, dtype=torch.long),) * 2})
    for name, cls in LOSSES.items():  # instance losses sit out a step without pairs; group losses do not need them
        assert (build_loss(name, FeatureWidths(6, 16)).term(unpaired) is None) == cls.needs_pairs, name


def test_a_loss_in_a_new_module_is_usable_from_a_config_by_its_name(monkeypatch):
    """The whole cost of a new loss: the class with its decorator; the config names it, the student builds it."""
    from diffkd.distill.objective import DistillationModel, DistillConfig, combine

    monkeypatch.setattr("diffkd.distill.registry.LOSSES", dict(LOSSES))  # the registration is undone afterwards

    @register_loss("mean_gap")
    class MeanFeatureGap(FeatureLoss):
        """|mean student activation - mean teacher activation|·scale: no pairs, no parameters."""

        def __init__(self, student_channels: int, teacher_channels: int, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def term(self, batch: DistillBatch) -> torch.Tensor:
            return self.scale * (batch.student_features.mean() - batch.teacher_features.mean()).abs()

    from diffkd.distill import registry

    assert registry.LOSSES["mean_gap"] is MeanFeatureGap and "mean_gap" not in LOSSES
    cfg = DistillConfig({"logit": {"weight": 0.5}, "mean_gap": {"weight": 2.0, "scale": 3.0}})
    with pytest.raises(ValueError, match="unknown option.*margin.*takes: weight, warmup_epochs, scale"):
        DistillConfig({"mean_gap": {"weight": 1.0, "margin": 1.0}})
    model = DistillationModel(nn.Identity(), cfg, student_channels=6, teacher_channels=16)
    assert isinstance(model.losses["mean_gap"], MeanFeatureGap) and model.losses["mean_gap"].scale == 3.0
    batch = DistillBatch(student_logits=torch.zeros(2, 2), teacher_logits=torch.zeros(2, 2),
                         student_features=torch.full((2, 6, 1, 1), 1.0), teacher_features=torch.zeros(2, 16, 1, 1),
                         student_labels=_labels(0, 1), teacher_labels=_labels(0, 1), pairs=(torch.arange(2),) * 2)
    gap = model.losses["mean_gap"].term(batch)
    assert math.isclose(float(gap), 3.0)
    terms = {"ce": torch.tensor(1.0), "kd_logit": torch.tensor(0.0), "kd_mean_gap": gap}
    assert math.isclose(float(combine(terms, cfg)), 0.5 * 1.0 + 2.0 * 3.0)


def test_registering_a_second_loss_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="'logit' is already registered by diffkd.distill.logit.LogitKD"):
        @register_loss("logit")
        class Impostor(FeatureLoss):
            pass
    with pytest.raises(TypeError, match="not a DistillLoss subclass"):
        register_loss("plain")(nn.MSELoss)
