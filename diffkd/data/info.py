"""`diffkd data info DS`: what is in a dataset, as plain-text tables.

Counts per center × split × label (images, positive share, patients), per-center acquisition facts
(modality, image size, pixel spacing, masks), a clinical summary by label, and the synthetic rows.
Splits are computed with `splits.make_splits` from the given external centers and seed, exactly as
training will compute them. Labels are shown by the dataset's outcome names (`ImageDataset.label_names`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import CLINICAL_SCHEMA
from diffkd.data.splits import SPLITS, make_splits


@dataclass
class DatasetInfo:
    uri: str
    external: list[str]
    val_fraction: float
    seed: int
    label_names: tuple[str, str]  # label 0, label 1 (the positive class)
    counts: pd.DataFrame  # center, split, <label 0>, <label 1>, total, positive_pct, patients
    centers: pd.DataFrame  # center, modalities, images, patients, masks_pct, size, spacing_mm
    clinical: pd.DataFrame  # attribute, missing_pct, <label 0>, <label 1>
    synthetic: pd.DataFrame  # center, <label 0>, <label 1>, total, positive_pct

    def format(self) -> str:
        return format_info(self)


def dataset_info(dataset, external: Sequence[str] = (), seed: int = 0, val_fraction: float = 0.2) -> DatasetInfo:
    ds = ImageDataset.open(dataset)
    if not ds.centers():
        raise ValueError(f"dataset {ds.uri} has no centers yet; add one with `diffkd ingest`")
    meta = ds.metadata().to_pandas()
    has_mask = pc.invert(pc.is_null(ds.read_table(columns=["mask"]).column("mask"))).to_numpy(zero_copy_only=False)
    meta["has_mask"] = has_mask
    splits = make_splits(meta, external, val_fraction, seed)
    meta["split"] = splits["split"].to_numpy()  # same row order: real rows only, none dropped
    synth = ds.metadata(synthetic=True).to_pandas() if ds.centers(synthetic=True) else meta.iloc[:0]
    names = ds.label_names
    return DatasetInfo(str(ds.uri), list(external), val_fraction, seed, names, _counts(meta, names),
                       _centers(meta), _clinical(meta, names), _synthetic(synth, names))


def _label_counts(df: pd.DataFrame, names: tuple[str, str]) -> dict:
    negative, positive = int((df["label"] == 0).sum()), int((df["label"] == 1).sum())
    total = negative + positive
    return {names[0]: negative, names[1]: positive, "total": total,
            "positive_pct": 100.0 * positive / total if total else float("nan"),
            "patients": df["patient_id"].nunique()}


def _counts(meta: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    rows = []
    for center in sorted(meta["center"].unique()):
        for split in SPLITS:
            part = meta[(meta["center"] == center) & (meta["split"] == split)]
            if len(part):
                rows.append({"center": center, "split": split, **_label_counts(part, names)})
    for split in SPLITS:
        part = meta[meta["split"] == split]
        if len(part):
            rows.append({"center": "all", "split": split, **_label_counts(part, names)})
    rows.append({"center": "all", "split": "all", **_label_counts(meta, names)})
    return pd.DataFrame(rows)


def _centers(meta: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for center, part in meta.groupby("center", sort=True):
        spacing = part["spacing_mm"].dropna()
        rows.append({
            "center": center,
            "modalities": ", ".join(f"{m} {n}" for m, n in part["modality"].value_counts().sort_index().items()),
            "images": len(part), "patients": part["patient_id"].nunique(),
            "images_per_patient": len(part) / max(part["patient_id"].nunique(), 1),
            "masks_pct": 100.0 * part["has_mask"].mean(),
            "size": f"{int(part['height'].median())}x{int(part['width'].median())}"
                    + ("" if part["height"].nunique() == 1 and part["width"].nunique() == 1 else " (median)"),
            "spacing_mm": f"{spacing.median():.3f}" if len(spacing) else "-",
        })
    return pd.DataFrame(rows)


def _summary(values: pd.Series, kind: str, levels: Sequence[str]) -> str:
    present = values.dropna()
    if not len(present):
        return "-"
    if kind in ("float", "int"):
        q1, med, q3 = np.percentile(present.astype(float), [25, 50, 75])
        return f"{med:.4g} ({q1:.4g}-{q3:.4g})"
    if kind == "bool":
        yes = int(present.astype(bool).sum())
        return f"yes {100 * yes / len(present):.0f}% ({yes}/{len(present)})"
    shares = present.value_counts()
    return " ".join(f"{lvl} {100 * shares.get(lvl, 0) / len(present):.0f}%" for lvl in levels if shares.get(lvl, 0))


def _clinical(meta: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    rows = []
    for col in CLINICAL_SCHEMA:
        values = meta[col.name]
        row = {"attribute": col.name, "missing_pct": 100.0 * values.isna().mean()}
        for label, name in enumerate(names):
            row[name] = _summary(values[meta["label"] == label], col.kind, col.levels)
        rows.append(row)
    return pd.DataFrame(rows)


def _synthetic(synth: pd.DataFrame, names: tuple[str, str]) -> pd.DataFrame:
    rows = [{"center": c, **{k: v for k, v in _label_counts(part, names).items() if k not in ("patients",)}}
            for c, part in synth.groupby("center", sort=True)]
    return pd.DataFrame(rows)


def format_table(df: pd.DataFrame, headers: dict[str, str] | None = None, floats: str = "{:.1f}") -> str:
    """Plain-text table: text columns left-aligned, numbers right-aligned, one space-padded line per row."""
    headers = headers or {}
    columns = list(df.columns)
    cells = []
    numeric = {c: pd.api.types.is_numeric_dtype(df[c]) for c in columns}
    for _, row in df.iterrows():
        out = []
        for c in columns:
            v = row[c]
            if isinstance(v, (float, np.floating)):
                out.append("-" if np.isnan(v) else floats.format(v))
            else:
                out.append(str(v))
        cells.append(out)
    titles = [headers.get(c, c) for c in columns]
    widths = [max([len(t)] + [len(r[i]) for r in cells]) for i, t in enumerate(titles)]

    def line(values):
        return "  ".join(v.rjust(w) if numeric[c] else v.ljust(w)
                         for v, w, c in zip(values, widths, columns)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(titles), rule, *(line(r) for r in cells)])


def format_info(info: DatasetInfo) -> str:
    total = info.counts.iloc[-1]
    negative, positive = info.label_names
    share = {"positive_pct": f"{positive} %"}
    n_centers = len(info.centers)
    head = [f"dataset {info.uri}",
            f"{n_centers} center(s), {total['total']} images, {total['patients']} patients; external (test): "
            f"{', '.join(info.external) or 'none'}; val fraction {info.val_fraction:g}, seed {info.seed}"]
    parts = ["\n".join(head),
             "Images by center, split and label\n" + format_table(info.counts, share),
             "Centers\n" + format_table(info.centers, {"images_per_patient": "img/patient", "masks_pct": "masks %",
                                                       "spacing_mm": "spacing mm"}, floats="{:.1f}"),
             "Clinical attributes (real images; median (IQR) or shares)\n"
             + format_table(info.clinical.rename(columns={
                 negative: f"{negative} (n={int(total[negative])})",
                 positive: f"{positive} (n={int(total[positive])})"}),
                 {"missing_pct": "missing %"})]
    if len(info.synthetic):
        parts.append("Synthetic images (training only)\n" + format_table(info.synthetic, share))
    else:
        parts.append("Synthetic images: none")
    return "\n\n".join(parts)
