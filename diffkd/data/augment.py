"""Geometry and intensity for ultrasound images: letterbox resize and training augmentation.

Ultrasound has a direction: the transducer is at the top and rows are depth (attenuation, TGC,
posterior shadowing and enhancement all run downwards). So augmentation never flips vertically
and rotates only a little; left/right is arbitrary (probe orientation, breast side), so horizontal
flips are fine. Intensity changes mimic what differs between scanners and sonographers: overall
gain, the gray map (a gamma curve) and speckle (multiplicative noise). All of them keep black
(no echo, and the letterbox padding) black.

Geometry runs per image in Pillow's C code — one resize with antialiasing, then one affine warp that
also places the image on the square canvas — so each pixel is resampled at most twice. Intensity
changes run on the whole batch at once in numpy. Every random draw comes from the generator a row
is given, so a row's augmentation is a pure function of its generator's seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass
class AugmentConfig:
    """Ranges of the random training augmentation (all drawn uniformly unless noted)."""

    hflip_p: float = 0.5  # probability of a left/right flip; there is deliberately no vertical flip
    rotate_deg: float = 10.0  # rotation in [-rotate_deg, +rotate_deg] about the image centre
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor (log-uniform)
    translate: float = 0.05  # shift in x and y, as a fraction of the image side
    gain_db: float = 3.0  # overall gain in [-gain_db, +gain_db] dB (amplitude: 10**(dB/20))
    gamma: tuple[float, float] = (0.8, 1.25)  # gray-map exponent (log-uniform): contrast
    speckle_p: float = 0.5  # probability of multiplicative speckle-like noise
    speckle_looks: tuple[float, float] = (16.0, 100.0)  # Gamma(L, 1/L) noise, std 1/sqrt(L)

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)
        self.gamma = tuple(self.gamma)
        self.speckle_looks = tuple(self.speckle_looks)
        if not 0 <= self.hflip_p <= 1 or not 0 <= self.speckle_p <= 1:
            raise ValueError("augment: hflip_p and speckle_p are probabilities in [0, 1]")
        if not (0 < self.scale[0] <= self.scale[1]) or not (0 < self.gamma[0] <= self.gamma[1]):
            raise ValueError("augment: scale and gamma are (low, high) ranges of positive numbers")
        if not 0 <= self.rotate_deg <= 30:
            raise ValueError("augment: rotate_deg must be in [0, 30]; larger rotations scramble depth")
        if not 1 <= self.speckle_looks[0] <= self.speckle_looks[1]:
            raise ValueError("augment: speckle_looks is a (low, high) range with low >= 1")


@dataclass(frozen=True)
class AugmentParams:
    """One row's draw. `identity()` is the no-op used for evaluation."""

    flip: bool = False
    angle_deg: float = 0.0
    scale: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # fraction of the side, +x right, +y deeper
    gain: float = 1.0  # amplitude factor
    gamma: float = 1.0
    looks: float = 0.0  # 0 = no speckle noise

    @staticmethod
    def identity() -> "AugmentParams":
        return AugmentParams()

    @property
    def is_geometric_identity(self) -> bool:
        return not self.flip and self.angle_deg == 0 and self.scale == 1 and self.shift == (0.0, 0.0)


def draw_params(rng: np.random.Generator, cfg: AugmentConfig) -> AugmentParams:
    """Draw one row's augmentation; a fixed number of draws, so rows never shift each other's streams."""
    u = rng.random(9)
    log_uniform = lambda lo, hi, v: float(math.exp(math.log(lo) + v * (math.log(hi) - math.log(lo))))  # noqa: E731
    return AugmentParams(
        flip=bool(u[0] < cfg.hflip_p),
        angle_deg=float((2 * u[1] - 1) * cfg.rotate_deg),
        scale=log_uniform(*cfg.scale, u[2]),
        shift=(float((2 * u[3] - 1) * cfg.translate), float((2 * u[4] - 1) * cfg.translate)),
        gain=float(10 ** ((2 * u[5] - 1) * cfg.gain_db / 20)),
        gamma=log_uniform(*cfg.gamma, u[6]),
        looks=log_uniform(*cfg.speckle_looks, u[8]) if u[7] < cfg.speckle_p else 0.0,
    )


def fit_size(width: int, height: int, size: int, keep_aspect: bool) -> tuple[int, int]:
    """Size of the resized image inside the `size`×`size` canvas (letterbox keeps the aspect ratio)."""
    if not keep_aspect:
        return size, size
    factor = size / max(width, height)
    return max(1, round(width * factor)), max(1, round(height * factor))


def _inverse_affine(params: AugmentParams, fitted: tuple[int, int], size: int) -> tuple[float, ...]:
    """Pillow AFFINE coefficients mapping canvas pixels back into the fitted (resized) image.

    Forward map: centre the fitted image on the canvas, then flip x, rotate, scale and shift about
    the canvas centre. Pillow wants the inverse: output (x, y) -> input (a x + b y + c, d x + e y + f).
    """
    cx = cy = size / 2
    off_x, off_y = (size - fitted[0]) // 2, (size - fitted[1]) // 2  # the same integer offset as the paste
    theta = math.radians(params.angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    flip = -1.0 if params.flip else 1.0
    # inverse rotation R(-theta), then inverse scale, then the flip (its own inverse)
    a, b = flip * cos / params.scale, flip * sin / params.scale
    d, e = -sin / params.scale, cos / params.scale
    tx, ty = cx + params.shift[0] * size, cy + params.shift[1] * size
    c = -(a * tx + b * ty) + cx - off_x
    f = -(d * tx + e * ty) + cy - off_y
    return a, b, c, d, e, f


def place(image: Image.Image, size: int, keep_aspect: bool, params: AugmentParams, resample: int) -> Image.Image:
    """Resize `image` to fit a `size`×`size` canvas (letterbox, black bars) and apply the geometric part of `params`."""
    fitted = fit_size(image.width, image.height, size, keep_aspect)
    if fitted != image.size:
        # reducing_gap: integer box-reduce first, then a short filtered resize (fast, still antialiased)
        image = image.resize(fitted, resample, reducing_gap=2.0)
    if params.is_geometric_identity:
        if fitted == (size, size):
            return image
        canvas = Image.new(image.mode, (size, size), 0)
        canvas.paste(image, ((size - fitted[0]) // 2, (size - fitted[1]) // 2))
        return canvas
    return image.transform((size, size), Image.Transform.AFFINE, _inverse_affine(params, fitted, size),
                           resample=resample, fillcolor=0)


def apply_intensity(images: np.ndarray, params: list[AugmentParams], rngs: list[np.random.Generator]) -> np.ndarray:
    """Gain, gray-map gamma and speckle noise on a batch [B, H, W] of intensities in [0, 1], in place where possible."""
    gains = np.array([p.gain for p in params], dtype=np.float32)[:, None, None]
    gammas = np.array([p.gamma for p in params], dtype=np.float32)[:, None, None]
    np.multiply(images, gains, out=images)
    np.clip(images, 0.0, 1.0, out=images)  # the display saturates
    np.power(images, gammas, out=images)
    for i, (p, rng) in enumerate(zip(params, rngs)):
        if p.looks > 0:
            noise = rng.standard_gamma(p.looks, size=images.shape[1:], dtype=np.float32)
            images[i] *= noise * np.float32(1.0 / p.looks)
    np.clip(images, 0.0, 1.0, out=images)
    return images
