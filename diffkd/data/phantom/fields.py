"""Small numerical building blocks shared by the ultrasound and mammography renderers."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.spatial import ConvexHull, QhullError


@lru_cache(maxsize=1024)
def _interp_matrix(n: int, cell: float) -> np.ndarray:
    """(n, m) Gaussian-weight interpolation from m coarse knots spaced `cell` samples apart to n samples."""
    m = int(np.ceil(n / cell)) + 3
    knots = (np.arange(m) - 1.5) * cell
    d = (np.arange(n)[:, None] + 0.5 - knots[None, :]) / cell
    w = np.exp(-0.5 * (d / 0.7) ** 2)
    w /= np.sqrt((w * w).sum(axis=1, keepdims=True))  # unit variance for i.i.d. unit knots
    return w.astype(np.float32)


def smooth_noise(shape: tuple[int, int], cell: float | tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A smooth, roughly unit-variance Gaussian random field with correlation length ~`cell` samples.

    Built as Ly @ K @ Lx^T from a coarse knot grid: two small matrix products instead of an upsampling
    filter, which keeps a 500x600 field at about a millisecond.
    """
    cy, cx = (cell, cell) if np.isscalar(cell) else cell
    ly, lx = _interp_matrix(shape[0], max(float(cy), 1.0)), _interp_matrix(shape[1], max(float(cx), 1.0))
    knots = rng.standard_normal((ly.shape[1], lx.shape[1]), dtype=np.float32)
    return ly @ knots @ lx.T


def smooth_curve(n: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth unit-variance 1-D random curve of length n with correlation length ~`cell` samples."""
    lx = _interp_matrix(n, max(float(cell), 1.0))
    return lx @ rng.standard_normal(lx.shape[1], dtype=np.float32)


def feret_diameter(mask: np.ndarray) -> tuple[float, tuple[tuple[float, float], tuple[float, float]] | None]:
    """Largest extent of a binary mask in pixels (pixel-edge to pixel-edge) and its end points (row, col).

    The distance between the two farthest pixel centres plus one pixel, which is what a caliper placed
    on the outer edges of the lesion reads.
    """
    present = mask.any(axis=1)
    if not present.any():
        return 0.0, None
    rows = np.flatnonzero(present)
    first = np.argmax(mask[rows], axis=1)
    last = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)
    # the hull of a mask is the hull of each row's two end pixels
    pts = np.unique(np.concatenate([np.column_stack([rows, first]), np.column_stack([rows, last])]), axis=0)
    pts = pts.astype(float)
    if len(pts) == 1:
        return 1.0, (tuple(pts[0]), tuple(pts[0]))
    try:
        pts = pts[ConvexHull(pts).vertices]
    except QhullError:  # collinear pixels: the hull is the segment itself
        pass
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
    i, j = np.unravel_index(np.argmax(d2), d2.shape)
    return float(np.sqrt(d2[i, j])) + 1.0, (tuple(pts[i]), tuple(pts[j]))


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))
