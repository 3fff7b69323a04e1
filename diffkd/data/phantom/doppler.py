"""Power-Doppler-like frames: blood flow drawn over the B-mode anatomy inside a Doppler box.

Flow is shown as bright intensity in a single gray channel (so one image pipeline handles both
modalities). What is drawn follows the lesion's Adler vascularity grade (0-3), which tracks the
hidden aggressiveness more closely than any B-mode descriptor (clinical.COUPLING["vascularity"]):
grade 0 shows nothing in the lesion, 1 a dot or a short peripheral vessel, 2 peripheral vessels and
one penetrating vessel, 3 several penetrating, branching vessels. Background vessels in normal
tissue and flash artefacts, unrelated to the label, are added at every grade.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from diffkd.data.phantom.ultrasound import BeamGrid, LesionView

# per Adler grade: (peripheral arcs, penetrating vessels, internal dots)
VESSELS_BY_GRADE = {0: (0, 0, 0), 1: (1, 0, 1), 2: (2, 1, 2), 3: (3, 3, 4)}


def add_flow(gray: np.ndarray, grid: BeamGrid, lesion: LesionView | None, vascularity: int,
             rng: np.random.Generator) -> np.ndarray:
    """Return the frame with a Doppler box and flow drawn in (output frame, values in [0, 1])."""
    h, w = gray.shape
    s = grid.spacing
    if lesion is not None:
        cx, cy = lesion.x0 / s + w / 2, lesion.z0 / s
        a, b = lesion.half_w / s, lesion.half_h / s
        tilt = lesion.tilt
    else:  # nothing to aim at: the sonographer boxes a stretch of gland
        cx, cy = w / 2 + rng.uniform(-0.2, 0.2) * w, h * rng.uniform(0.3, 0.5)
        a, b, tilt = 6.0 / s, 3.0 / s, 0.0
    bw, bh = 1.6 * a + 4.0 / s, 1.6 * b + 4.0 / s
    box = (int(max(cx - bw, 1)), int(max(cy - bh, 1)), int(min(cx + bw, w - 2)), int(min(cy + bh, h - 2)))

    flow = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(flow)
    width_px = lambda mm: max(1, int(round(mm / s)))  # noqa: E731

    def to_xy(rho: np.ndarray, phi: np.ndarray) -> list[tuple[float, float]]:
        p, q = rho * np.cos(phi) * a, rho * np.sin(phi) * b
        return list(zip(cx + p * np.cos(tilt) - q * np.sin(tilt), cy + p * np.sin(tilt) + q * np.cos(tilt)))

    def vessel(points: list[tuple[float, float]], mm: float) -> None:
        level = int(rng.uniform(150, 255))
        for p0, p1 in zip(points[:-1], points[1:]):  # intensity varies along the vessel (pulsatility)
            level = int(np.clip(level + rng.normal(0, 20), 120, 255))
            draw.line([p0, p1], fill=level, width=width_px(mm))

    periph, penetrating, dots = VESSELS_BY_GRADE[int(np.clip(vascularity, 0, 3))]
    if lesion is not None:
        for _ in range(periph + int(rng.poisson(0.3))):
            start = rng.uniform(-np.pi, np.pi)
            phi = start + np.linspace(0, rng.uniform(0.4, 1.1), 8)
            vessel(to_xy(1.1 + 0.05 * rng.standard_normal(8), phi), rng.uniform(0.4, 0.8))
        for _ in range(penetrating):
            phi0 = rng.uniform(-np.pi, np.pi)
            rho = np.linspace(1.25, rng.uniform(0.1, 0.5), 7)
            phi = phi0 + np.cumsum(rng.normal(0, 0.12, 7))
            vessel(to_xy(rho, phi), rng.uniform(0.5, 0.9))
            if vascularity >= 3 and rng.random() < 0.7:  # a branch off the penetrating vessel
                k = int(rng.integers(2, 5))
                branch_phi = phi[k] + np.cumsum(np.full(4, rng.choice([-1, 1]) * 0.25))
                vessel(to_xy(np.linspace(rho[k], rho[k] * 0.5, 4), branch_phi), 0.4)
        for _ in range(dots):
            r, phi = 0.7 * np.sqrt(rng.random()), rng.uniform(-np.pi, np.pi)
            (x, y), = to_xy(np.array([r]), np.array([phi]))
            rad = max(1.0, rng.uniform(0.3, 0.6) / s)
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=int(rng.uniform(160, 255)))
    # background vessels in normal tissue and flash artefacts: present whatever the lesion
    x0, y0, x1, y1 = box
    for _ in range(int(rng.poisson(1.0))):
        steps = int(rng.integers(3, 7))
        heading = rng.normal(0, 0.4) + rng.choice([0, np.pi])  # breast vessels run roughly along the skin
        turns = heading + np.cumsum(rng.normal(0, 0.35, steps))
        step_px = rng.uniform(0.8, 1.6) / s
        xs = rng.uniform(x0, x1) + np.cumsum(step_px * np.cos(turns))
        ys = rng.uniform(y0, y1) + np.cumsum(step_px * np.sin(turns))
        vessel(list(zip(xs, ys)), rng.uniform(0.25, 0.5))
    for _ in range(int(rng.poisson(2.0))):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=int(rng.uniform(90, 180)))

    f = np.asarray(flow, np.float32) / 255.0
    f = ndimage.gaussian_filter(f, 0.6)
    inside = np.zeros((h, w), bool)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    f[~inside] = 0
    out = np.where(f > 0.12, 0.35 + 0.65 * f, gray)
    if grid.out_valid is not None:
        out[~grid.out_valid] = 0
    frame = np.zeros((h, w), bool)  # the box outline
    frame[y0:y1 + 1, [x0, x1]] = True
    frame[[y0, y1], x0:x1 + 1] = True
    out[frame] = 0.8
    return out.astype(np.float32)
