import pytest
import torch
from torch import nn

from diffkd.train.ema import WeightAverage


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_the_average_follows_the_weights_with_a_warming_decay():
    torch.manual_seed(0)
    live, average = model(), WeightAverage(model(), decay=0.99)
    average.reset(live)
    assert all(torch.equal(a, b) for a, b in zip(average.module.state_dict().values(), live.state_dict().values()))
    start = live[0].weight.detach().clone()
    with torch.no_grad():
        live[0].weight.add_(1.0)
    average.update(live)  # decay min(0.99, 2/11): the first updates mostly take the new weights
    assert average.updates == 1 and average.current_decay() == pytest.approx(2 / 11)
    assert torch.allclose(average.module[0].weight, start + (1 - 2 / 11))
    for _ in range(2000):
        average.update(live)
    assert average.current_decay() == 0.99
    assert torch.allclose(average.module[0].weight, live[0].weight, atol=1e-5)
    assert not average.module.training and not any(p.requires_grad for p in average.module.parameters())


def test_batch_norm_statistics_are_averaged_and_counters_copied():
    live, average = model(), WeightAverage(model(), decay=0.5, updates=100)
    average.reset(live)
    live.train()
    live(torch.randn(16, 3) * 5 + 3)  # moves running_mean / running_var, counts a batch
    average.update(live)
    bn, live_bn = average.module[1], live[1]
    assert torch.allclose(bn.running_mean, 0.5 * live_bn.running_mean)  # halfway from the zeros it started at
    assert int(bn.num_batches_tracked) == int(live_bn.num_batches_tracked) == 1


def test_a_decay_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="within \\(0, 1\\)"):
        WeightAverage(model(), decay=1.0)
