"""Small image datasets for the pipeline tests (not collected: no test_ prefix).

Every image is a depth ramp (brighter with depth, textured across) at one of several sizes and
aspect ratios; every 4th image of a center can be a 16-bit PNG; odd rows carry a lesion mask.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import arrow_schema


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def depth_ramp(height: int, width: int, dtype=np.uint8) -> np.ndarray:
    """Brightness rising with depth (row), plus texture: what augmentation must never turn upside down."""
    full = 255 if dtype == np.uint8 else 65535
    rows = np.linspace(0.1, 0.9, height)[:, None] * np.ones((1, width))
    texture = 0.05 * np.sin(np.arange(width) / 3.0)[None, :]
    return np.clip((rows + texture) * full, 0, full).astype(dtype)


def make_rows(center: str, n: int, *, synthetic: bool = False, modality: str = "us", start: int = 0,
              sixteen_bit_every: int = 0) -> pa.Table:
    rows = []
    for i in range(start, start + n):
        h, w = 40 + 8 * (i % 3), 60 - 6 * (i % 2)  # several sizes and aspect ratios
        sixteen = sixteen_bit_every and i % sixteen_bit_every == 0
        image = png(depth_ramp(h, w, np.uint16 if sixteen else np.uint8))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2] = 1
        prefix = "syn" if synthetic else "real"
        rows.append(dict(case_id=f"{prefix}-{center}-{i}", patient_id=f"p{center}{i}", center=center,
                         modality=modality, label=i % 2, image=image, mask=png(mask) if i % 2 else None,
                         height=h, width=w, spacing_mm=0.1, synthetic=synthetic, source=f"test:{i}",
                         sha256=hashlib.sha256(image).hexdigest(), age=40.0 + i, birads="4b" if i % 2 else None,
                         palpable=bool(i % 3)))
    table = pa.Table.from_pylist(rows)
    for f in arrow_schema():
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table


def build_dataset(root) -> ImageDataset:
    """Centers A (24 rows, some 16-bit), B (16), C (8 us + 4 mammo); 40 synthetic rows for A."""
    ds = ImageDataset(root)
    ds.write_center("A", make_rows("A", 24, sixteen_bit_every=4))
    ds.write_center("B", make_rows("B", 16))
    ds.write_center("C", pa.concat_tables([make_rows("C", 8), make_rows("C", 4, modality="mammo", start=100)]))
    ds.write_synthetic("A", make_rows("A", 40, synthetic=True), run_id="r1")
    return ds
