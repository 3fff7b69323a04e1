"""A tiny source folder in the BUS-BRA layout (`diffkd ingest --layout busbra`), for tests and examples.

    write_busbra_tree("busbra_phantom")            # 6 patients, 10 images, 3 scanners
    write_busbra_tree("x", cases=[BusbraCase(1, "lr", "malignant", "4", "GE Logiq 7 @10-14MHz")])

The images are noise with a darker ellipse where the mask says the lesion is: enough to exercise
the importer (file names, the CSV, masks, scanners), not a model of breast ultrasound (use
`diffkd phantom` for that). Like BUS-BRA: gray 8-bit PNGs, 1-bit masks, `bus_data.csv` with quoted
bounding boxes, the histology of every case filled in (which the importer must never store).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HEADER = ("ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "Side", "BBOX")
SIDES = {"l": "left", "r": "right", "s": "single"}
HISTOLOGY = {"benign": "fibroadenoma", "malignant": "invasive ductal carcinoma"}


@dataclass(frozen=True)
class BusbraCase:
    """One patient: its views ("lr" = left and right views of one lesion, "s" = a single view)."""
    case: int
    views: str
    pathology: str  # benign | malignant
    birads: str  # as BUS-BRA writes it: 2, 3, 4, 5
    device: str


DEFAULT_CASES = (
    BusbraCase(1, "lr", "malignant", "4", "GE Logiq 7 @10-14MHz"),
    BusbraCase(2, "lr", "benign", "4", "GE Logiq 7 @10-14MHz"),
    BusbraCase(3, "s", "benign", "2", "GE Logiq 7 @10-14MHz"),
    BusbraCase(4, "lr", "malignant", "5", "GE Logiq 5 @10-12MHz"),
    BusbraCase(5, "s", "benign", "3", "GE Logiq 5 @10-12MHz"),
    BusbraCase(6, "lr", "benign", "3", "Toshiba Aplio 300 @12-14 MHz"),
)


def write_busbra_tree(root: str | Path, cases=DEFAULT_CASES, *, size: tuple[int, int] = (24, 32),
                      seed: int = 0) -> Path:
    """Write `cases` under `root` as Images/, Masks/ and bus_data.csv; returns `root`."""
    root = Path(root)
    (root / "Images").mkdir(parents=True, exist_ok=True)
    (root / "Masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    height, width = size
    rows = []
    for case in cases:
        for view in case.views:
            name = f"{case.case:04d}-{view}"
            cy, cx = rng.integers(height // 3, 2 * height // 3), rng.integers(width // 3, 2 * width // 3)
            ry, rx = rng.integers(3, height // 4 + 1), rng.integers(3, width // 4 + 1)
            yy, xx = np.mgrid[:height, :width]
            lesion = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            image = rng.integers(60, 200, size, dtype=np.uint8)
            image[lesion] //= 3
            Image.fromarray(image).save(root / "Images" / f"bus_{name}.png")
            Image.fromarray(lesion).save(root / "Masks" / f"mask_{name}.png")  # 1-bit, as BUS-BRA's
            ys, xs = np.nonzero(lesion)
            bbox = f"[{xs.min()},{ys.min()},{xs.max() - xs.min() + 1},{ys.max() - ys.min() + 1}]"
            rows.append((f"bus_{name}", case.case, HISTOLOGY[case.pathology], case.pathology, case.birads,
                         case.device, width, height, SIDES[view], bbox))
    with open(root / "bus_data.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return root
