"""Generate a whole synthetic multicenter cohort in the `folder` ingest layout.

OUT/<center>/images/<case>_<view>.png     one PNG per image (gray or RGB as the center exports)
OUT/<center>/masks/<case>_<view>_mask.png lesion mask where a lesion is visible
OUT/<center>/clinical.csv                 one row per image (columns: CSV_COLUMNS)
OUT/readers.csv                           simulated senior/junior reads per center (readers.py)
OUT/truth.csv                             the phantom's hidden truth per case (for audits, never for training):
                                          label_probability (P(label | everything), the Bayes ceiling),
                                          image_probability (P(label | what the images draw), the image
                                          ceiling: ceiling.py) and reference_score (the readers' suspicion)
OUT/cohort.json                           centers, profiles, counts, generator version, seed, difficulty

Everything is written under a temporary sibling folder and renamed into place at the end, so an
interrupted run leaves nothing half-written. Every image draws its random numbers from its own
seed (seed, center, patient, view): the output is byte-identical for a seed, whatever `workers`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

import diffkd
from diffkd.data.phantom import centers as centers_mod
from diffkd.data.phantom import mammo
from diffkd.data.phantom.ceiling import mammo_probability, ultrasound_probability
from diffkd.data.phantom.clinical import imaging_suspicion, missing_mask, sample_latent_cases
from diffkd.data.phantom.display import export_image
from diffkd.data.phantom.doppler import add_flow
from diffkd.data.phantom.readers import simulate_readers
from diffkd.data.phantom.ultrasound import UltrasoundCase, render_frame, sample_anatomy
from diffkd.data.schema import CLINICAL_COLUMNS, DEFAULT_LABEL_NAMES

GENERATOR_VERSION = "1.0"
CSV_COLUMNS = ("file", "mask", "patient_id", "case_id", "label", "modality", "spacing_mm", *CLINICAL_COLUMNS)
COHORT_MODALITIES = ("us", "mammo")
# Each hospital writes its record numbers its own way (and no two centers share a patient).
PATIENT_ID_FORMATS = ("MRN-{:06d}", "H2-{:07d}", "PID{:08d}", "{:09d}", "MRN{:07d}", "P-{:06d}")

PNG_LEVEL = 1  # speckle barely compresses: zlib's fast level costs ~10% in size and saves most of the time
PROGRESS_EVERY_TENTH = 200  # patients in a center above which progress is reported per tenth
Progress = Callable[[str], None]


@dataclass
class CohortSummary:
    out: Path
    modality: str
    seed: int
    difficulty: float
    centers: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def patients(self) -> int:
        return sum(c["patients"] for c in self.centers)

    @property
    def images(self) -> int:
        return sum(c["images"] for c in self.centers)


def generate_cohort(out: str | os.PathLike, *, size: str = "paper", centers: int | None = None,
                    patients: int | None = None, seed: int = 0, difficulty: float = 1.0,
                    doppler_fraction: float = 0.0, modality: str = "us", overwrite: bool = False,
                    workers: int = 1, progress: Progress | None = None) -> CohortSummary:
    """Write a synthetic cohort to `out` (see the module docstring for the layout) and summarise it.

    size: "paper" (DiffKD-DCIS scale: 4 centers, 1,435 patients; mammo: 2 centers, 294 cases) or
    "demo" (60-100 patients per center, images ~256 px). centers / patients (total) override the
    preset. difficulty: 1.0 default; lower is easier, higher harder (clinical.py). doppler_fraction:
    share of each center's patients imaged with Doppler only (`us_doppler`) instead of B-mode.
    modality: "us" or "mammo" (An et al. 2025's microcalcification design; label 1 = invasive).
    """
    started = time.perf_counter()
    out = Path(out)
    if modality not in COHORT_MODALITIES:
        raise ValueError(f"--modality must be one of {', '.join(COHORT_MODALITIES)}, not {modality!r}")
    if not 0.0 <= doppler_fraction <= 1.0:
        raise ValueError(f"--doppler-fraction must be within [0, 1], got {doppler_fraction}")
    if modality == "mammo" and doppler_fraction:
        raise ValueError("--doppler-fraction applies to ultrasound cohorts only, not --modality mammo")
    if difficulty < 0:
        raise ValueError(f"--difficulty must be >= 0, got {difficulty}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to replace it (or choose another --out)")
    progress = progress or (lambda msg: None)

    if modality == "mammo":
        profiles = mammo.center_profiles(size, centers or mammo.DEFAULT_CENTERS, patients)
    else:
        profiles = centers_mod.center_profiles(centers or centers_mod.DEFAULT_CENTERS, size, patients, seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    summary = CohortSummary(out, modality, seed, difficulty)
    try:
        truths = []
        for ci, profile in enumerate(profiles):
            truth, images = _generate_center(ci, profile, modality, seed, difficulty, doppler_fraction,
                                             tmp / profile.name, workers, progress)
            truths.append(truth)
            summary.centers.append(_center_summary(profile, truth, images))
        truth = pd.concat(truths, ignore_index=True)
        _write_csv(simulate_readers(truth, seed), tmp / "readers.csv")
        _write_csv(_truth_table(truth), tmp / "truth.csv")
        summary.seconds = time.perf_counter() - started
        (tmp / "cohort.json").write_text(json.dumps(_cohort_json(summary, size, doppler_fraction), indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ------------------------------------------------------------------------------------------ plan
def plan_center(ci: int, profile, modality: str, seed: int, difficulty: float,
                doppler_fraction: float = 0.0) -> pd.DataFrame:
    """One center's cases before rendering: hidden truth, ids, modality, view count, missingness."""
    if modality == "mammo":
        cases = mammo.sample_cases(profile, np.random.default_rng([seed, ci, 1]), difficulty)
    else:
        cases = sample_latent_cases(profile.patients, profile.mix, np.random.default_rng([seed, ci, 1]), difficulty)
    rng = np.random.default_rng([seed, ci, 5])
    n = len(cases)
    fmt = PATIENT_ID_FORMATS[ci] if ci < len(PATIENT_ID_FORMATS) else f"C{ci + 1}-" + "{:06d}"
    numbers = rng.choice(900_000, size=n, replace=False) + 100_000
    cases.insert(0, "center", profile.name)
    cases.insert(1, "patient_index", np.arange(n))  # seeds the patient's images
    cases.insert(2, "case_id", [f"{profile.name}-{i + 1:04d}" for i in range(n)])
    cases.insert(3, "patient_id", [fmt.format(int(k)) for k in numbers])
    if modality == "mammo":
        cases["modality"] = "mammo"
        cases["rows"] = profile.rows
        cases["reference_score"] = mammo.imaging_suspicion(cases)
        cases["image_probability"] = mammo_probability(cases, profile, difficulty)
    else:
        doppler = np.zeros(n, bool)
        doppler[rng.permutation(n)[: int(round(doppler_fraction * n))]] = True
        cases["modality"] = np.where(doppler, "us_doppler", "us")
        cases["n_views"] = np.where(doppler, np.minimum(cases["n_views"], 2), cases["n_views"])
        cases["rows"] = rng.choice(np.asarray(profile.rows), size=n)
        cases["reference_score"] = imaging_suspicion(cases, "calcs_on_us")
        cases["image_probability"] = ultrasound_probability(cases, profile.mix, difficulty)
    for name, missing in missing_mask(n, profile.mix, rng).items():
        cases[f"missing_{name}"] = missing
    return cases


# ---------------------------------------------------------------------------------------- render
def render_patient(ci: int, profile, case: dict, seed: int, center_dir: Path) -> list[dict]:
    """Render and save one patient's images; returns one record per image (file, mask, size, shape)."""
    idx = int(case["patient_index"])
    records = []
    if case["modality"] == "mammo":
        views = mammo.render_case(profile, case, [seed, ci, 2, idx])
    else:
        views = _render_us_case(profile, case, [seed, ci, 2, idx])
    for v, exported in enumerate(views):
        stem = f"{case['case_id']}_{v + 1}"
        Image.fromarray(exported.pixels).save(center_dir / "images" / f"{stem}.png", compress_level=PNG_LEVEL)
        mask_file = ""
        if exported.mask is not None:
            mask_file = f"masks/{stem}_mask.png"
            Image.fromarray(exported.mask.astype(np.uint8) * 255, "L").save(center_dir / mask_file,
                                                                             compress_level=PNG_LEVEL)
        records.append({"file": f"images/{stem}.png", "mask": mask_file, "diameter_mm": exported.diameter_mm,
                        "height": exported.pixels.shape[0], "width": exported.pixels.shape[1]})
    return records


def _render_us_case(profile, case: dict, seed_words: list[int]) -> list:
    us_case = UltrasoundCase.from_row(case)
    rows = int(case["rows"])
    anatomy = sample_anatomy(us_case, rows * profile.spacing_mm, np.random.default_rng(seed_words))
    doppler = case["modality"] == "us_doppler"
    views = []
    for v in range(int(case["n_views"])):
        rng = np.random.default_rng([*seed_words, 1 + v])
        frame = render_frame(profile, us_case, anatomy, v, rows, rng)
        gray = add_flow(frame.gray, frame.grid, frame.lesion, us_case.vascularity, rng) if doppler else frame.gray
        views.append(export_image(gray, frame.mask, profile, profile.spacing_mm, rng, force_gray=doppler,
                                  extra_text="PDI  PRF 0.8kHz" if doppler else ""))
    return views


def _render_chunk(ci: int, profile, cases: list[dict], seed: int, center_dir: Path) -> list[list[dict]]:
    return [render_patient(ci, profile, case, seed, center_dir) for case in cases]


def _generate_center(ci: int, profile, modality: str, seed: int, difficulty: float, doppler_fraction: float,
                     center_dir: Path, workers: int, progress: Progress) -> tuple[pd.DataFrame, pd.DataFrame]:
    started = time.perf_counter()
    (center_dir / "images").mkdir(parents=True)
    (center_dir / "masks").mkdir()
    truth = plan_center(ci, profile, modality, seed, difficulty, doppler_fraction)
    cases = truth.to_dict("records")
    n = len(cases)
    step = max(1, n // 10)
    chunks = [cases[i:i + step] for i in range(0, n, step)]
    per_case: list[list[dict]] = []
    done_images = 0

    def report(results: list[list[dict]]) -> None:
        nonlocal done_images
        per_case.extend(results)
        done_images += sum(len(r) for r in results)
        if n >= PROGRESS_EVERY_TENTH or len(per_case) == n:  # big centers report every tenth
            progress(f"{profile.name}: {len(per_case)}/{n} patients, {done_images} images, "
                     f"{time.perf_counter() - started:.1f} s")

    if workers > 1 and n > step:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_render_chunk, ci, profile, chunk, seed, center_dir) for chunk in chunks]
            for fut in futures:
                report(fut.result())
    else:
        for chunk in chunks:
            report(_render_chunk(ci, profile, chunk, seed, center_dir))

    rng = np.random.default_rng([seed, ci, 4])
    measured = np.array([max((r["diameter_mm"] for r in recs if r["diameter_mm"]), default=np.nan) for recs in per_case])
    reading_error = rng.normal(0.0, 0.4, n)  # a sonographer's caliper placement
    fallback = truth["size_mm"].to_numpy() * rng.uniform(0.9, 1.1, n)  # size from other imaging
    truth["measured_size_mm"] = measured
    truth["lesion_size_mm"] = np.round(np.clip(np.where(np.isnan(measured), fallback, measured + reading_error),
                                               1.0, 150.0), 1)
    images = _image_table(truth, per_case, profile)
    _write_csv(images, center_dir / "clinical.csv")
    return truth, images


# ---------------------------------------------------------------------------------------- tables
def _fmt_bool(v: bool) -> str:
    return "true" if v else "false"


def clinical_values(case: dict) -> dict[str, str]:
    """The CSV's clinical columns for a case, as text, with the center's missing values left empty."""
    values = {
        "age": f"{case['age']:.0f}",
        "lesion_size_mm": f"{case['lesion_size_mm']:.1f}",
        "birads": str(case["birads"]),
        "lesion_type": str(case["lesion_type"]),
        "palpable": _fmt_bool(case["palpable"]),
        "axillary_node_suspicious": _fmt_bool(case["node"]),
        "nuclear_grade": str(int(case["grade"])),
        "microcalcifications": _fmt_bool(case["calcs"]),
    }
    return {k: ("" if case.get(f"missing_{k}", False) else v) for k, v in values.items()}


def _label_name(modality: str, label: int) -> str:
    return mammo.LABEL_NAMES[label] if modality == "mammo" else DEFAULT_LABEL_NAMES[label]


def _image_table(truth: pd.DataFrame, per_case: list[list[dict]], profile) -> pd.DataFrame:
    rows = []
    for case, records in zip(truth.to_dict("records"), per_case):
        clinical = clinical_values(case)
        for rec in records:
            rows.append({"file": rec["file"], "mask": rec["mask"], "patient_id": case["patient_id"],
                         "case_id": case["case_id"], "label": _label_name(case["modality"], int(case["label"])),
                         "modality": case["modality"], "spacing_mm": f"{profile.spacing_mm:.6g}", **clinical})
    return pd.DataFrame(rows, columns=list(CSV_COLUMNS))


TRUTH_COLUMNS = ("center", "case_id", "patient_id", "modality", "label", "aggressiveness", "label_probability",
                 "lesion_type", "margin", "posterior", "taller_than_wide", "halo", "calcs", "calcs_on_us", "pattern",
                 "size_mm", "measured_size_mm", "lesion_size_mm", "palpable", "node", "grade", "vascularity", "age",
                 "birads", "image_probability", "reference_score", "n_views")


def _truth_table(truth: pd.DataFrame) -> pd.DataFrame:
    table = truth[[c for c in TRUTH_COLUMNS if c in truth.columns]].copy()
    for col in table.columns:
        if table[col].dtype.kind == "f":
            table[col] = table[col].map(lambda v: "" if np.isnan(v) else f"{v:.4f}")
    return table


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


def _center_summary(profile, truth: pd.DataFrame, images: pd.DataFrame) -> dict:
    return {
        "name": profile.name,
        "patients": int(len(truth)),
        "images": int(len(images)),
        "labels": {k: int(v) for k, v in images.drop_duplicates("case_id")["label"].value_counts().sort_index().items()},
        "modalities": {k: int(v) for k, v in images["modality"].value_counts().sort_index().items()},
        "masks": int((images["mask"] != "").sum()),
        "profile": profile.summary(),
    }


def _cohort_json(summary: CohortSummary, size: str, doppler_fraction: float) -> dict:
    return {
        "generator": "diffkd phantom",
        "generator_version": GENERATOR_VERSION,
        "diffkd_version": diffkd.__version__,
        "modality": summary.modality,
        "size": size,
        "seed": summary.seed,
        "difficulty": summary.difficulty,
        "doppler_fraction": doppler_fraction,
        "label_meaning": {"0": _label_name(summary.modality, 0), "1": _label_name(summary.modality, 1)},
        "patients": summary.patients,
        "images": summary.images,
        "centers": summary.centers,
        "files": {"clinical": "<center>/clinical.csv", "readers": "readers.csv", "truth": "truth.csv"},
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished cohort into place; an existing `out` is only removed once the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
