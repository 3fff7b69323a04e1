"""Contact sheet of a cohort folder: one row per center (and modality), samples of each label side by side.

It reads the PNGs back from disk, so it shows exactly what an importer will see.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from diffkd.data.phantom.display import overlay_font

TILE = 200  # tile height and width in pixels
HEADER = 22


def contact_sheet(cohort_dir: str | Path, png: str | Path, per_label: int = 3, outline_masks: bool = True) -> Path:
    """Write a grid of sample images per center x label (x modality) to `png` and return its path."""
    cohort_dir, png = Path(cohort_dir), Path(png)
    centers = sorted(p for p in cohort_dir.iterdir() if (p / "clinical.csv").is_file())
    if not centers:
        raise FileNotFoundError(f"{cohort_dir} holds no <center>/clinical.csv: is it a phantom cohort folder?")
    rows: list[tuple[str, list[tuple[str, Path, Path | None]]]] = []
    for center in centers:
        table = pd.read_csv(center / "clinical.csv", dtype=str, keep_default_na=False)
        for modality, group in table.groupby("modality", sort=True):
            first = group.drop_duplicates("case_id")  # one image per case, so the row shows different patients
            tiles = []
            for label in sorted(first["label"].unique(), key=lambda v: (v != "DCIS", v)):
                for _, r in first[first["label"] == label].head(per_label).iterrows():
                    tiles.append((label, center / r["file"], center / r["mask"] if r["mask"] else None))
            rows.append((f"{center.name} · {modality}", tiles))
    n_cols = max(len(t) for _, t in rows)
    sheet = Image.new("RGB", (n_cols * TILE, len(rows) * (TILE + HEADER)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = overlay_font(13)
    for ri, (title, tiles) in enumerate(rows):
        y = ri * (TILE + HEADER)
        draw.text((4, y + 4), title, fill=(255, 255, 255), font=font)
        for ci, (label, image_path, mask_path) in enumerate(tiles):
            tile = _tile(image_path, mask_path if outline_masks else None)
            sheet.paste(tile, (ci * TILE + (TILE - tile.width) // 2, y + HEADER + (TILE - tile.height) // 2))
            color = (120, 200, 255) if label == "DCIS" else (255, 150, 90)
            box = draw.textbbox((ci * TILE + 4, y + HEADER + 2), label, font=font)
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
            draw.text((ci * TILE + 4, y + HEADER + 2), label, fill=color, font=font)
    png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(png)
    return png


def _tile(image_path: Path, mask_path: Path | None) -> Image.Image:
    img = Image.open(image_path).convert("RGB")
    if mask_path is not None and mask_path.is_file():
        mask = np.asarray(Image.open(mask_path)) > 0
        edge = mask & ~_eroded(mask)
        arr = np.asarray(img).copy()
        arr[edge] = (0, 255, 0)
        img = Image.fromarray(arr)
    img.thumbnail((TILE - 4, TILE - 4))
    return img


def _eroded(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=max(1, mask.shape[0] // 250))
