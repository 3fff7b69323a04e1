"""diffkd: distributed diffusion augmentation + knowledge distillation for multicenter medical imaging."""
from diffkd import _torchvision_compat

__version__ = "0.1.0"

_torchvision_compat.install()
