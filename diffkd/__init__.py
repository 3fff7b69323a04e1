"""diffkd: distributed diffusion augmentation + knowledge distillation for multicenter medical imaging."""

__version__ = "0.1.0"
