"""`diffkd data grid DS --out grid.png`: sample images per center × label, to look at.

One row per center (real), then one per center with synthetic rows; `per_cell` images of each label
side by side, lesion masks outlined. Samples are drawn with a fixed seed, so the same dataset gives
the same picture. Only the sampled rows' bytes are read.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffkd.data.dataset import ImageDataset
from diffkd.runtime.files import save_figure


def _sample(meta: pa.Table, per_cell: int, rng: np.random.Generator) -> dict[tuple[str, int], list[str]]:
    """(center, label) -> sampled image keys (sha256: a case may have several images)."""
    df = meta.select(["sha256", "center", "label"]).to_pandas()
    out = {}
    for (center, label), part in df.groupby(["center", "label"], sort=True):
        keys = sorted(part["sha256"])
        out[(center, int(label))] = list(rng.choice(keys, size=min(per_cell, len(keys)), replace=False))
    return out


def _read_rows(ds: ImageDataset, synthetic: bool, keys: list[str]) -> dict[str, dict]:
    if not keys:
        return {}
    tables = [pq.read_table(path, filesystem=ds.fs, columns=["sha256", "image", "mask"],
                            filters=[("sha256", "in", keys)]) for path in ds.files(synthetic=synthetic)]
    return {r["sha256"]: r for r in pa.concat_tables(tables).to_pylist()}


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    arr = np.asarray(Image.open(io.BytesIO(png)))
    if arr.dtype != np.uint8:  # 16-bit: show the used range
        top = max(int(arr.max()), 1)
        arr = (arr.astype(np.float32) * (255.0 / top)).astype(np.uint8)
    return arr


def make_grid(dataset, out, per_cell: int = 4, seed: int = 0, synthetic: bool = True, masks: bool = True,
              cell_inches: float = 1.6) -> Path:
    """Write a PNG grid of sample images per center × label (+ synthetic rows); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.parse_math"] = False  # center names are shown as written ("$" is no mathtext)
    import matplotlib.pyplot as plt

    ds = ImageDataset.open(dataset)
    if not ds.centers():
        raise ValueError(f"dataset {ds.uri} has no centers yet; add one with `diffkd ingest`")
    if per_cell < 1:
        raise ValueError("--per-cell must be at least 1")
    rng = np.random.default_rng(seed)
    metas = {False: ds.metadata()}
    if synthetic and ds.centers(synthetic=True):
        metas[True] = ds.metadata(synthetic=True)
    groups = [(synth, _sample(meta, per_cell, rng)) for synth, meta in metas.items()]
    counts = {synth: meta.select(["center", "label"]).to_pandas().value_counts().to_dict()
              for synth, meta in metas.items()}
    rows = [(synth, center) for synth, cells in groups for center in sorted({c for c, _ in cells})]
    names = ds.label_names
    labels = list(range(len(names)))
    n_cols = per_cell * len(labels)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(cell_inches * n_cols, cell_inches * len(rows) + 0.6),
                             squeeze=False)
    for r, (synth, center) in enumerate(rows):
        cells = dict(groups)[synth]
        wanted = [cid for lab in labels for cid in cells.get((center, lab), [])]
        data = _read_rows(ds, synth, wanted)
        for li, lab in enumerate(labels):
            ids = cells.get((center, lab), [])
            for k in range(per_cell):
                ax = axes[r][li * per_cell + k]
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if r == 0 and k == 0:
                    ax.set_title(names[lab], loc="left", fontsize=11, fontweight="bold")
                if k == 0:
                    n = counts[synth].get((center, lab), 0)
                    ax.set_xlabel(f"n={n}", loc="left", fontsize=7)
                if li == 0 and k == 0:
                    ax.set_ylabel(f"{'synthetic ' if synth else ''}{center}", fontsize=10)
                if k >= len(ids):
                    continue
                row = data[ids[k]]
                ax.imshow(_decode(row["image"]), cmap="gray", vmin=0, vmax=255, interpolation="lanczos")
                if masks and row["mask"] is not None:
                    mask = _decode(row["mask"]) > 0
                    if mask.any():
                        ax.contour(mask, levels=[0.5], colors=["#ffb000"], linewidths=0.6)
    fig.suptitle(f"{Path(str(ds.uri).rstrip('/')).name}: {per_cell} sample(s) per center × label (seed {seed}); n = images in the cell"
                 + ("; orange = lesion mask" if masks else ""), fontsize=9)
    fig.tight_layout()
    return Path(save_figure(fig, out))
