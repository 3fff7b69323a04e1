"""The audit's figures: real vs synthetic grids, label pairs, and the near-copy histogram."""
from __future__ import annotations

import numpy as np

from diffkd.runtime.files import save_figure
from diffkd.synth.stats import LabelPairs, unit_range


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grid(real: dict, synth: dict, centers: list[str], pipe_cfg, per_cell: int, path: str, seed: int,
              label_names: tuple[str, str]) -> str:
    """One row per center x label: real training images on the left, synthetic ones on the right (with the
    outline of the lesion mask each was conditioned on, for a mask-conditioned generator)."""
    plt = _figure()
    cells = [(ci, c, lbl) for ci, c in enumerate(centers) for lbl in range(len(label_names))]
    fig, axes = plt.subplots(len(cells), 2 * per_cell, figsize=(2 * per_cell * 0.9, len(cells) * 1.0 + 0.6),
                             squeeze=False)
    rng = np.random.default_rng(seed)
    outlined = bool(synth["mask"].any())  # a mask-conditioned generator
    for row, (ci, center, label) in enumerate(cells):
        for half, arrays in enumerate((real, synth)):
            pick = np.flatnonzero((arrays["center_idx"] == ci) & (arrays["label"] == label))
            pick = rng.choice(pick, min(per_cell, len(pick)), replace=False) if len(pick) else pick
            for k in range(per_cell):
                ax = axes[row, half * per_cell + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(pick):
                    ax.imshow(unit_range(arrays["image"][pick[k]], pipe_cfg)[0], cmap="gray", vmin=0, vmax=1)
                    if half and outlined:  # where the generator was told the lesion is
                        ax.contour(arrays["mask"][pick[k], 0], levels=[0.5], colors="tab:red", linewidths=0.5)
                else:
                    ax.axis("off")  # fewer images than columns in this cell
        axes[row, 0].set_ylabel(f"{center}\n{label_names[label]}", rotation=0, ha="right", va="center", fontsize=8)
    axes[0, 0].set_title("real (training)", loc="left", fontsize=9)
    axes[0, per_cell].set_title("synthetic (red: the lesion mask it was conditioned on)" if outlined else "synthetic",
                                loc="left", fontsize=9)
    fig.suptitle("Real vs synthetic images per center x label", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_label_pairs(pairs: LabelPairs, scored: dict[int, np.ndarray], per_cell: int, path: str,
                     label_names: tuple[str, str]) -> str:
    """Two rows per center (label 0 above, label 1 below, same noise and mask), the classifier's
    probability of label 1 over each image."""
    plt = _figure()
    centers = sorted(pairs.rows["center"].unique())
    fig, axes = plt.subplots(2 * len(centers), per_cell, figsize=(per_cell * 1.1, 2 * len(centers) * 1.1 + 0.6),
                             squeeze=False)
    for ci, center in enumerate(centers):
        shown = np.flatnonzero(pairs.rows["center"].to_numpy() == center)[:per_cell]
        for k in range(per_cell):
            for label, images in ((0, pairs.dcis), (1, pairs.upgrade)):
                ax = axes[2 * ci + label, k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k >= len(shown):
                    ax.axis("off")
                    continue
                i = shown[k]
                ax.imshow(images[i, 0], cmap="gray", vmin=0, vmax=1)
                if pairs.masks[i].any():
                    ax.contour(pairs.masks[i], levels=[0.5], colors="tab:red", linewidths=0.5)
                ax.set_title(f"p={scored[label][i]:.2f}", fontsize=7)
            for label, name in enumerate(label_names):
                axes[2 * ci + label, 0].set_ylabel(f"{center}\n{name}", rotation=0, ha="right", va="center",
                                                   fontsize=8)
    fig.suptitle("The same noise, mask and clinical values, conditioned on each label\n"
                 f"(p: the real-trained classifier's probability of {label_names[1]})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_near_copies(copies: dict, real: dict, synth: dict, pipe_cfg, pairs: int, path: str) -> str:
    """Distance histograms (synthetic->train vs real->train) and the closest synthetic/training pairs."""
    plt = _figure()
    order = np.argsort(copies["synthetic_pixel"])[:pairs]
    fig = plt.figure(figsize=(max(8, 1.3 * len(order)), 5.2))
    grid = fig.add_gridspec(3, max(1, len(order)), height_ratios=[1.6, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    bins = np.linspace(0, max(copies["synthetic_pixel"].max(), copies["real_pixel"].max()) * 1.05, 40)
    ax.hist(copies["real_pixel"], bins=bins, alpha=0.6, density=True, label="real validation -> nearest training")
    ax.hist(copies["synthetic_pixel"], bins=bins, alpha=0.6, density=True, label="synthetic -> nearest training")
    ax.axvline(copies["pixel_threshold"], color="k", ls="--", lw=1,
               label=f"near-copy threshold ({copies['quantile']:.0%} of real)")
    ax.set_xlabel("pixel-space distance to the nearest training image (RMS of standardised pixels)")
    ax.legend(fontsize=7)
    ax.set_title(f"near copies: {copies['count']} of {len(copies['synthetic_pixel'])} synthetic images", fontsize=9)
    for k, i in enumerate(order):
        top, bottom = fig.add_subplot(grid[1, k]), fig.add_subplot(grid[2, k])
        top.imshow(unit_range(synth["image"][i], pipe_cfg)[0], cmap="gray", vmin=0, vmax=1)
        bottom.imshow(unit_range(real["image"][copies["synthetic_pixel_index"][i]], pipe_cfg)[0], cmap="gray",
                      vmin=0, vmax=1)
        mark = " COPY" if copies["flagged"][i] else ""
        top.set_title(f"d={copies['synthetic_pixel'][i]:.3f}{mark}", fontsize=7, color="red" if mark else "black")
        for a in (top, bottom):
            a.set_xticks([])
            a.set_yticks([])
        if k == 0:
            top.set_ylabel("synthetic", fontsize=8)
            bottom.set_ylabel("nearest\ntraining", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
