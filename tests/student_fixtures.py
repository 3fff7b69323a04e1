"""A tiny two-modality dataset for the student / tune tests (not collected: no test_ prefix).

Centers A, B (internal) and C (external). Each center images some patients with B-mode (`us`) and
*other* patients with Doppler (`us_doppler`), so teacher and student views share no patient. Label 1
carries a bright disc, label 0 a dark square; the Doppler rendering adds a bright flow blob beside the
upgraded lesions, which makes it the more informative modality, as in the PaGKD setting.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import arrow_schema

CENTERS = ("A", "B", "C")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _draw(label: int, doppler: bool, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + rng.uniform(-0.1, 0.1, 2)
    image = np.full((size, size), 0.35)
    weak = rng.uniform(0.3, 1.0)  # lesion contrast varies: B-mode alone is not perfectly separable
    if label:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.18 ** 2] = 0.35 + 0.5 * weak
    else:
        image[(abs(yy - cy) < 0.16) & (abs(xx - cx) < 0.16)] = 0.35 - 0.3 * weak
    if doppler and label:
        image[(yy - cy + 0.25) ** 2 + (xx - cx) ** 2 < 0.08 ** 2] = 1.0
    image += rng.normal(0, 0.08, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def make_rows(center: str, n_us: int, n_doppler: int, size: int, seed: int) -> pa.Table:
    rng = np.random.default_rng([seed, ord(center)])
    rows = []
    for i in range(n_us + n_doppler):
        doppler = i >= n_us
        label = int(rng.random() < 0.5)
        image = _png(_draw(label, doppler, rng, size))
        rows.append(dict(case_id=f"{center}-{i:03d}", patient_id=f"p-{center}-{i:03d}", center=center,
                         modality="us_doppler" if doppler else "us", label=label, image=image, mask=None,
                         height=size, width=size, spacing_mm=0.1, synthetic=False, source=f"fixture:{center}:{i}",
                         sha256=hashlib.sha256(image).hexdigest(), age=float(40 + i % 30),
                         lesion_size_mm=float(8 + i % 20), birads="4c" if label else "4a"))
    table = pa.Table.from_pylist(rows)
    for f in arrow_schema():
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table


def two_modality_dataset(root, n_us: int = 24, n_doppler: int = 16, size: int = 32, seed: int = 0) -> ImageDataset:
    ds = ImageDataset(root)
    for center in CENTERS:
        ds.write_center(center, make_rows(center, n_us, n_doppler, size, seed))
    return ds


def splits(ds: ImageDataset) -> pd.DataFrame:
    from diffkd.data.splits import make_splits

    return make_splits(ds.metadata().to_pandas(), external=["C"], val_fraction=0.3, seed=0)
