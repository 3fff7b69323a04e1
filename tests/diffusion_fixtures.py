"""A tiny two-center dataset whose images say their center and label plainly (for diffusion/synth tests).

Center A has a dark background, center B a bright one; label 1 carries a bright disc, label 0 a dark
square. Each row is its own patient with its own noise, so no two images are equal.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import arrow_schema

BACKGROUND = {"A": 0.25, "B": 0.65}
NEW_CENTER_BACKGROUND = {"C": 0.45}  # a center added after the generator was trained


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def draw(center: str, label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + rng.uniform(-0.1, 0.1, 2)
    image = np.full((size, size), {**BACKGROUND, **NEW_CENTER_BACKGROUND}[center])
    if label:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.2 ** 2] = 0.95
    else:
        image[(abs(yy - cy) < 0.18) & (abs(xx - cx) < 0.18)] = 0.05
    image += rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_rows(center: str, n: int, size: int = 32, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng([seed, ord(center)])
    rows = []
    for i in range(n):
        label = i % 2
        image = png(draw(center, label, rng, size))
        rows.append(dict(case_id=f"{center}-{i:03d}", patient_id=f"p-{center}-{i:03d}", center=center, modality="us",
                         label=label, image=image, mask=None, height=size, width=size, spacing_mm=0.1,
                         synthetic=False, source=f"fixture:{center}:{i}", sha256=hashlib.sha256(image).hexdigest(),
                         age=float(40 + 2 * i % 40), lesion_size_mm=float(8 + i % 20),
                         birads="4c" if label else "4a", palpable=bool(i % 3 == 0)))
    table = pa.Table.from_pylist(rows)
    for f in arrow_schema():
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table


def tiny_dataset(root, per_center: int = 24, size: int = 32) -> ImageDataset:
    ds = ImageDataset(root)
    for center in BACKGROUND:
        ds.write_center(center, make_rows(center, per_center, size))
    return ds
