"""Train / val / test assignment: computed from the dataset, never stored (docs/dataset.md).

`SplitConfig` is the one description of a split for the whole package (experiment configs, the
diffusion stage's saved provenance, the audit); `make_splits` applies it to a metadata table.

- External centers are whole centers and go to `test` only.
- Internal centers are split by patient: all images of a patient land on the same side. Patients are
  stratified by center and by label (a patient counts as `upgrade` if any of their images is), and
  within each stratum ordered by a seeded hash of the (pseudonymous) patient id, the first
  n * val_fraction (rounded half up) going to `val`. The assignment therefore depends only on the seed and the
  patient ids, not on row order, and adding a center leaves every other patient's split unchanged.
- Synthetic rows are training data only: `train` when their center is internal, dropped (with a
  warning) when their center is external, since training on generated images of a held-out center
  would leak it.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pandas as pd

from diffkd.data.dataset import ImageDataset

log = logging.getLogger("diffkd.splits")

SPLITS = ("train", "val", "test")
COLUMNS = ("case_id", "patient_id", "center", "label", "modality", "synthetic", "split")
LEAKS_SHOWN = 10


@dataclass
class SplitConfig:
    """How the patient-level split is computed; only this is saved, never the assignment itself."""

    external: list[str] = field(default_factory=list)  # whole centers held out for external testing
    val_fraction: float = 0.2
    seed: int = 0


class LeakageError(ValueError):
    """A patient (or a synthetic row) sits where it would leak between training and evaluation."""


def _frame(metadata) -> pd.DataFrame:
    df = metadata.to_pandas() if hasattr(metadata, "to_pandas") else pd.DataFrame(metadata)
    missing = [c for c in COLUMNS[:-1] if c not in df.columns]
    if missing:
        raise ValueError(f"metadata lacks column(s) {', '.join(missing)}; pass ImageDataset.metadata() rows")
    return df[list(COLUMNS[:-1])].reset_index(drop=True)


def _order_key(seed: int, patient_id: str) -> str:
    return hashlib.sha256(f"{seed}\0{patient_id}".encode()).hexdigest()


def make_splits(metadata_df, external: Sequence[str] = (), val_fraction: float = 0.2, seed: int = 0) -> pd.DataFrame:
    """One row per image: case_id, patient_id, center, label, modality, synthetic, split (train|val|test)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    df = _frame(metadata_df)
    real = ~df["synthetic"].astype(bool)
    real_centers = set(df.loc[real, "center"])
    external = list(dict.fromkeys(external))
    unknown = [c for c in external if c not in real_centers]
    if unknown:
        raise ValueError(f"external center(s) {', '.join(unknown)} not in the dataset; it has: "
                         f"{', '.join(sorted(real_centers)) or 'no real rows'}")
    internal = real_centers - set(external)
    if not internal:
        raise ValueError("every center is external: keep at least one internal center to train on")

    split = pd.Series("train", index=df.index, dtype=object)
    is_external = df["center"].isin(external)
    split[real & is_external] = "test"
    inside = df[real & ~is_external]
    patients = inside.groupby("patient_id").agg(center=("center", "first"), label=("label", "max"))
    val_patients: set[str] = set()
    for _, group in patients.groupby(["center", "label"]):
        ordered = sorted(group.index, key=lambda p: _order_key(seed, p))
        val_patients.update(ordered[:int(len(ordered) * val_fraction + 0.5)])  # half rounds up
    split[real & ~is_external & df["patient_id"].isin(val_patients)] = "val"

    drop = ~real & ~df["center"].isin(internal)
    if drop.any():
        log.warning("dropping %d synthetic row(s) of external or unknown center(s) %s: training on them would "
                    "leak the held-out center", int(drop.sum()), ", ".join(sorted(set(df.loc[drop, "center"]))))
    out = df.assign(split=split)[~drop].reset_index(drop=True)
    check_no_leakage(out)
    return out


def check_no_leakage(df: pd.DataFrame) -> None:
    """Raise LeakageError if a patient is on two sides, a case on two sides, or a synthetic row outside train."""
    for column in ("patient_id", "split", "synthetic"):
        if column not in df.columns:
            raise ValueError(f"splits table lacks column {column!r}")
    real = df[~df["synthetic"].astype(bool)]
    sides = real.groupby("patient_id")["split"].agg(lambda s: tuple(sorted(set(s))))
    leaks = sides[sides.map(len) > 1]
    if len(leaks):
        where = real[real["patient_id"].isin(leaks.index)].groupby("patient_id")
        lines = [f"{pid}: splits {', '.join(leaks[pid])}"
                 + (f", centers {', '.join(sorted(set(g['center'])))}" if "center" in g else "")
                 for pid, g in list(where)[:LEAKS_SHOWN]]
        raise LeakageError(f"{len(leaks)} patient(s) appear on more than one side of the split:\n  "
                           + "\n  ".join(lines) + "\nsplits must be patient-level; check for a patient "
                           "ingested under two centers")
    if "case_id" in df.columns:
        case_sides = df.groupby("case_id")["split"].nunique()
        if (case_sides > 1).any():
            raise LeakageError(f"case(s) {', '.join(case_sides[case_sides > 1].index[:LEAKS_SHOWN])} appear on "
                               "more than one side of the split")
    bad = df[df["synthetic"].astype(bool) & df["split"].isin(["val", "test"])]
    if len(bad):
        raise LeakageError(f"{len(bad)} synthetic row(s) assigned to val/test (e.g. {bad['case_id'].iloc[0]}); "
                           "generated images may only be used for training")


def leave_one_center_out(centers: Sequence[str]) -> list[tuple[str, list[str]]]:
    """[(held-out center, internal centers), ...], one fold per center, in sorted order."""
    names = sorted(dict.fromkeys(centers))
    if len(names) < 2:
        raise ValueError(f"leave-one-center-out needs at least two centers, got {names}")
    return [(held_out, [c for c in names if c != held_out]) for held_out in names]


def dataset_splits(dataset, external: Sequence[str] = (), val_fraction: float = 0.2, seed: int = 0,
                   synthetic: bool = True) -> pd.DataFrame:
    """`make_splits` over a dataset's (ImageDataset, path or URI) real and, if asked, synthetic rows."""
    ds = ImageDataset.open(dataset)
    tables = [ds.metadata().to_pandas()]
    if synthetic and ds.centers(synthetic=True):
        tables.append(ds.metadata(synthetic=True).to_pandas())
    return make_splits(pd.concat(tables, ignore_index=True), external, val_fraction, seed)


def split_case_ids(meta: pd.DataFrame, split: SplitConfig) -> dict[str, list[str]]:
    """{"train", "val", "test"} case ids of the real rows of `meta`, recomputed from `split`."""
    unknown = sorted(set(split.external) - set(meta["center"]))
    if unknown:
        raise ValueError(f"external center(s) {', '.join(unknown)} are not in the dataset; "
                         f"it has {', '.join(sorted(meta['center'].unique()))}")
    table = make_splits(meta, external=list(split.external), val_fraction=split.val_fraction, seed=split.seed)
    return {name: sorted(table.loc[table["split"] == name, "case_id"]) for name in SPLITS}


def ids_digest(case_ids: Iterable[str]) -> str:
    """sha256 of a set of case ids (order-free; a case imaged several times counts once, as split tables
    list images): tells whether today's split still matches a saved one."""
    return hashlib.sha256("\n".join(sorted(set(case_ids))).encode()).hexdigest()


def fingerprint_of_digest(train_ids_sha256: str) -> str:
    """The short form of a split's fingerprint (the sha256 of its sorted training case ids) shown to users."""
    return train_ids_sha256[:12]


def split_fingerprint(assignments: pd.DataFrame) -> str:
    """Fingerprint of a splits table: its real training case ids, hashed as a generator records its own split."""
    real = assignments[~assignments["synthetic"].astype(bool)] if "synthetic" in assignments else assignments
    return fingerprint_of_digest(ids_digest(set(real.loc[real["split"] == "train", "case_id"].astype(str))))


def check_synthetic_split(dataset, assignments: pd.DataFrame, sources: Sequence[str] = ()) -> None:
    """Refuse synthetic rows whose generator was not trained on this split.

    A training stage mixes synthetic rows of its training centers (of the generator runs `sources`;
    every run when empty). A generator trained on another split may have learnt from patients that are
    validation or external here, and its images would carry them into training. Rows of a run that
    recorded no split (written before diffkd recorded one) are refused too: nothing shows they are safe.
    """
    ds = ImageDataset.open(dataset)
    current = split_fingerprint(assignments)
    centers = set(assignments.loc[assignments["split"] == "train", "center"])
    wrong: dict[str, dict] = {}  # generator run -> what it recorded and where its rows are
    for center, entry in ds.manifest["synthetic"].items():
        if center not in centers:
            continue
        for run in entry.get("runs", []):
            generator = run.get("generator") or {}
            source = generator.get("source") or run["run_id"]
            if sources and source not in sources or generator.get("split_fingerprint") == current:
                continue
            seen = wrong.setdefault(source, {"generator": generator, "rows": 0, "centers": set()})
            seen["rows"] += int(run.get("rows", 0))
            seen["centers"].add(center)
    if not wrong:
        return
    lines = []
    for source, seen in sorted(wrong.items()):
        generator = seen["generator"]
        trained = (f"a generator trained on split {generator['split_fingerprint']} ({generator.get('split')})"
                   if generator.get("split_fingerprint") else "a generator whose training split was not recorded")
        lines.append(f"run {source}: {seen['rows']} row(s) in center(s) {', '.join(sorted(seen['centers']))}, "
                     f"from {trained}")
    raise LeakageError(
        f"synthetic rows of dataset {ds.uri} do not come from a generator trained on this split "
        f"(fingerprint {current}, its training case ids):\n  " + "\n  ".join(lines) + "\n"
        "Such a generator may have learnt from this split's validation or external patients. Train with the "
        "same --external/--val-fraction/--split-seed as the generator, name this split's runs in "
        "pipeline.synthetic_sources, synthesize with a generator trained on this split, or set the synthetic "
        "ratio to 0.")
