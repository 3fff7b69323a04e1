"""`diffkd.models.unwrap`: the one way to reach the model inside DeepSpeed / DDP wrappers."""
from torch import nn

from diffkd.models import unwrap


class Wrapper(nn.Module):
    """Holds its model as `.module`, as DeepSpeed's engine and torch's DDP do."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


def test_unwrap_reaches_the_model_through_any_number_of_wrappers():
    model = nn.Linear(2, 2)
    assert unwrap(model) is model
    assert unwrap(Wrapper(model)) is model and unwrap(Wrapper(Wrapper(model))) is model


def test_unwrap_follows_only_modules():
    model = nn.Linear(2, 2)
    model.module = "not a module"  # an attribute of that name that is no wrapper
    assert unwrap(model) is model
