"""The synthetic cohort generator: clinical model, rendering, output layout, determinism, CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from diffkd.cli import main as cli_main
from diffkd.data.phantom import CSV_COLUMNS, generate_cohort, mammo, plan_center
from diffkd.data.phantom.centers import DEFAULT_PATIENTS, center_profiles
from diffkd.data.phantom.clinical import CaseMix, oracle_features, sample_latent_cases
from diffkd.data.phantom.doppler import add_flow
from diffkd.data.phantom.fields import feret_diameter
from diffkd.data.phantom.readers import READER_COLUMNS, simulate_readers
from diffkd.data.phantom.ultrasound import UltrasoundCase, render_frame, sample_anatomy
from diffkd.data.schema import (BIRADS_LEVELS, CLINICAL_SCHEMA, LESION_TYPES, MODALITIES, normalize_birads,
                                parse_label)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    generate_cohort(out, size="demo", seed=3, doppler_fraction=0.3)
    return out


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    return {c.name: pd.read_csv(c / "clinical.csv", dtype=str, keep_default_na=False)
            for c in sorted(root.iterdir()) if (c / "clinical.csv").is_file()}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _auc_lr(X: np.ndarray, y: np.ndarray) -> float:
    X = (X - X.mean(0)) / (X.std(0) + 1e-9)
    p = cross_val_predict(LogisticRegression(max_iter=2000), X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                          method="predict_proba")[:, 1]
    return roc_auc_score(y, p)


# ---------------------------------------------------------------------------------- clinical model
def test_upgrade_rate_default_cohort_size():
    profiles = center_profiles()
    assert sum(p.patients for p in profiles) == DEFAULT_PATIENTS == 1435
    labels = np.concatenate([plan_center(i, p, "us", seed=11, difficulty=1.0)["label"] for i, p in enumerate(profiles)])
    assert abs(labels.mean() - 0.26) < 0.035  # 1,435 draws: SE ~0.012, plus the centers' case mix
    pooled = sample_latent_cases(40_000, CaseMix(), np.random.default_rng(0))
    assert abs(pooled["label"].mean() - 0.26) < 0.01


def test_oracle_auc_in_published_range_and_difficulty_orders_it():
    def oracle_auc(difficulty: float) -> float:
        df = sample_latent_cases(16_000, CaseMix(), np.random.default_rng(5), difficulty)
        X, y = oracle_features(df), df["label"].to_numpy()
        model = LogisticRegression(max_iter=3000).fit(X[:8000], y[:8000])
        return roc_auc_score(y[8000:], model.predict_proba(X[8000:])[:, 1])

    default = oracle_auc(1.0)
    assert 0.78 < default < 0.88, default
    assert oracle_auc(0.5) > default + 0.04
    assert oracle_auc(2.0) < default - 0.06


def test_predictors_point_the_published_way():
    df = sample_latent_cases(40_000, CaseMix(), np.random.default_rng(2))
    y = df["label"].to_numpy()

    def odds_ratio(flag) -> float:
        flag = np.asarray(flag, bool)
        a, b = y[flag].mean(), y[~flag].mean()
        return a / (1 - a) / (b / (1 - b))

    for name, flag in {"size>20": df["size_mm"] > 20, "palpable": df["palpable"], "node": df["node"],
                       "grade3": df["grade"] == 3, "mass": df["lesion_type"] == "mass",
                       "shadowing": df["posterior"] == "shadowing"}.items():
        assert odds_ratio(flag) > 1.4, name
    assert odds_ratio(df["lesion_type"] == "calcification") < 0.8  # calcifications only: fewer upgrades
    assert odds_ratio(df["node"]) > 3 * odds_ratio(df["taller_than_wide"])  # single US descriptors are weak
    by_birads = df.groupby("birads")["label"].mean()
    assert by_birads["4a"] < by_birads["4c"] < by_birads["5"]
    # overlap: every category of every feature holds both labels
    for col in ("lesion_type", "margin", "posterior", "birads", "grade"):
        assert (df.groupby(col)["label"].agg(["min", "max"]).to_numpy() == [0, 1]).all(), col


def test_doppler_vascularity_is_more_informative_than_bmode_features():
    df = sample_latent_cases(20_000, CaseMix(), np.random.default_rng(8))
    X = oracle_features(df)
    bmode = X[:, :13]  # size, type, margin, posterior, orientation, halo, calcs
    vasc = np.column_stack([bmode, pd.get_dummies(df["vascularity"]).to_numpy(float)])
    y = df["label"].to_numpy()
    assert _auc_lr(vasc, y) > _auc_lr(bmode, y) + 0.05


def test_readers_senior_beats_junior_in_published_range():
    profiles = center_profiles(patients=6000)
    truth = pd.concat([plan_center(i, p, "us", seed=4, difficulty=1.0) for i, p in enumerate(profiles)])
    reads = simulate_readers(truth, seed=4)
    assert tuple(reads.columns) == READER_COLUMNS
    assert len(reads) == 2 * len(truth) and set(reads["experience"]) == {"senior", "junior"}
    merged = reads.merge(truth[["case_id", "label"]], on="case_id")
    auc = {e: roc_auc_score(g["label"], g["probability"]) for e, g in merged.groupby("experience")}
    assert 0.54 < auc["junior"] < auc["senior"] < 0.72, auc
    assert set(reads["birads"]) <= set(BIRADS_LEVELS) and set(reads["call"]) == {0, 1}


# ------------------------------------------------------------------------------------- rendering
def test_mass_is_hypoechoic_and_mask_aligned():
    profile = center_profiles(size="demo")[0]
    case = UltrasoundCase("mass", 14.0, "circumscribed", "none")
    rng = np.random.default_rng(0)
    anatomy = sample_anatomy(case, profile.rows[0] * profile.spacing_mm, rng)
    frame = render_frame(profile, case, anatomy, 0, profile.rows[0], rng)
    assert frame.mask is not None and frame.mask.shape == frame.gray.shape
    from scipy import ndimage

    ring = ndimage.binary_dilation(frame.mask, iterations=6) & ~ndimage.binary_dilation(frame.mask, iterations=2)
    assert frame.gray[frame.mask].mean() < 0.6 * frame.gray[ring].mean()
    diameter = feret_diameter(frame.mask)[0] * profile.spacing_mm
    assert 0.7 * 14.0 < diameter < 1.3 * 14.0  # cut through the long or short axis of a 14 mm mass


def test_sector_geometry_blanks_outside_the_fan_and_not_visible_has_no_mask():
    profile = next(p for p in center_profiles(size="demo") if p.geometry == "sector")
    case = UltrasoundCase("not_visible", 10.0)
    rng = np.random.default_rng(1)
    frame = render_frame(profile, case, sample_anatomy(case, 30.0, rng), 0, profile.rows[0], rng)
    assert frame.mask is None
    assert frame.gray[-1, 0] == 0 and frame.gray[-1, -1] == 0  # bottom corners lie outside the fan
    assert frame.gray[frame.gray.shape[0] // 2, frame.gray.shape[1] // 2] > 0


def test_doppler_flow_grows_with_vascularity():
    profile = center_profiles(size="demo")[0]
    bright = []
    for grade in (0, 3):
        case = UltrasoundCase("mass", 14.0, "indistinct", "none", vascularity=grade)
        total = 0.0
        for seed in range(4):
            rng = np.random.default_rng(seed)
            frame = render_frame(profile, case, sample_anatomy(case, 30.0, rng), 0, profile.rows[0], rng)
            flow = add_flow(frame.gray, frame.grid, frame.lesion, grade, rng)
            total += ((flow > 0.5) & frame.mask & (frame.gray < 0.35)).sum()
        bright.append(total)
    assert bright[1] > 3 * bright[0] + 20


def test_feret_diameter_of_known_shapes():
    mask = np.zeros((50, 60), bool)
    mask[10:20, 5:45] = True  # 10 x 40 pixels: diagonal of the pixel centres + 1
    d, ends = feret_diameter(mask)
    assert d == pytest.approx(np.hypot(9, 39) + 1)
    assert feret_diameter(np.zeros((5, 5), bool)) == (0.0, None)


# -------------------------------------------------------------------------------- written cohort
def test_layout_and_csv_valid_against_schema(demo):
    tables = _tables(demo)
    assert list(tables) == ["center1", "center2", "center3", "center4"]
    schema = {c.name: c for c in CLINICAL_SCHEMA}
    for center, table in tables.items():
        assert tuple(table.columns) == CSV_COLUMNS
        assert table["file"].is_unique
        assert {parse_label(v) for v in table["label"]} == {0, 1}
        assert set(table["label"]) == {"DCIS", "upgrade"}
        assert set(table["modality"]) <= set(MODALITIES)
        for name, col in schema.items():
            values = table[name][table[name] != ""]
            assert (table[name] == "").mean() < 0.85, name  # center3 rarely records node status
            if col.kind == "category":
                assert set(values) <= set(col.levels), (center, name)
            elif col.kind == "bool":
                assert set(values) <= {"true", "false"}, (center, name)
            else:
                num = values.astype(float)
                assert ((num >= col.low) & (num <= col.high)).all(), (center, name)
        assert (table[list(schema)] == "").to_numpy().any()  # realistic gaps
        assert all(normalize_birads(v) == v for v in table["birads"] if v)
        assert table["lesion_type"][table["lesion_type"] != ""].isin(LESION_TYPES).all()
        for row in table.head(12).itertuples():
            image = Image.open(demo / center / row.file)
            assert image.mode in ("L", "RGB")
            if row.mask:
                mask = Image.open(demo / center / row.mask)
                assert mask.size == image.size and mask.mode == "L"
        per_patient = table.groupby("patient_id")["file"].count()
        assert per_patient.between(1, 3).all() and (per_patient > 1).any()
        assert table.groupby("patient_id")["case_id"].nunique().eq(1).all()
        assert table["patient_id"].str.fullmatch(r"[A-Z0-9-]+").all()
    ids = [set(t["patient_id"]) for t in tables.values()]
    assert sum(len(s) for s in ids) == len(set().union(*ids))  # no patient in two centers
    meta = json.loads((demo / "cohort.json").read_text())
    assert meta["seed"] == 3 and meta["difficulty"] == 1.0 and meta["generator_version"]
    assert [c["name"] for c in meta["centers"]] == list(tables)
    assert meta["images"] == sum(len(t) for t in tables.values())
    reads = pd.read_csv(demo / "readers.csv")
    assert tuple(reads.columns) == READER_COLUMNS and reads["case_id"].nunique() == meta["patients"]


def test_doppler_patients_disjoint_from_bmode(demo):
    for center, table in _tables(demo).items():
        doppler = set(table.loc[table["modality"] == "us_doppler", "patient_id"])
        bmode = set(table.loc[table["modality"] == "us", "patient_id"])
        assert doppler and bmode and not doppler & bmode, center
        assert abs(len(doppler) / (len(doppler) + len(bmode)) - 0.3) < 0.02
        doppler_images = table.loc[table["modality"] == "us_doppler", "file"]
        assert all(Image.open(demo / center / f).mode == "L" for f in doppler_images.head(5))


def test_clinical_size_and_type_agree_with_the_images(demo):
    truth = pd.read_csv(demo / "truth.csv", keep_default_na=False)
    for center, table in _tables(demo).items():
        for case_id, rows in table.groupby("case_id"):
            t = truth[truth["case_id"] == case_id].iloc[0]
            has_mask = rows["mask"] != ""
            if t["lesion_type"] == "not_visible":
                assert not has_mask.any(), case_id
                continue
            assert has_mask.all(), case_id
            if rows["lesion_type"].iloc[0]:
                assert rows["lesion_type"].iloc[0] == t["lesion_type"]
            spacing = float(rows["spacing_mm"].iloc[0])
            widest = max(feret_diameter(np.asarray(Image.open(demo / center / m)) > 0)[0] * spacing
                         for m in rows["mask"])
            if rows["lesion_size_mm"].iloc[0]:
                assert abs(float(rows["lesion_size_mm"].iloc[0]) - widest) < 2.0, case_id


def test_centers_differ(demo):
    stats = {}
    for center, table in _tables(demo).items():
        images = [np.asarray(Image.open(demo / center / f)) for f in table["file"].head(20)]
        gray = [im.mean(axis=2) if im.ndim == 3 else im for im in images]
        stats[center] = (images[0].shape, np.mean([g.mean() for g in gray]), images[0].ndim)
    assert len({s[0] for s in stats.values()}) == len(stats)  # image sizes differ
    assert {s[2] for s in stats.values()} == {2, 3}  # gray and RGB exports
    means = sorted(s[1] for s in stats.values())
    assert means[-1] - means[0] > 5  # brightness differs by scanner settings


def test_label_dependence_is_real_but_far_from_perfect(demo):
    rows = []
    for center, table in _tables(demo).items():
        for _, r in table.drop_duplicates("case_id").iterrows():
            img = np.asarray(Image.open(demo / center / r["file"]).convert("L"), float) / 255
            mask = np.asarray(Image.open(demo / center / r["mask"])) > 0 if r["mask"] else None
            spacing = float(r["spacing_mm"])
            rows.append({
                "y": int(r["label"] == "upgrade"), "mean": img.mean(), "std": img.std(),
                "p99": np.quantile(img, 0.99), "has_mask": float(mask is not None),
                "extent_mm": np.sqrt(mask.sum()) * spacing if mask is not None else 0.0,
                "inside": img[mask].mean() if mask is not None else img.mean()})
    df = pd.DataFrame(rows)
    auc = _auc_lr(df.drop(columns="y").to_numpy(), df["y"].to_numpy())
    assert 0.55 < auc < 0.9, auc


def test_same_seed_same_bytes_and_overwrite_rules(tmp_path):
    kwargs = dict(size="demo", centers=2, patients=10, seed=7, doppler_fraction=0.3)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_cohort(a, **kwargs)
    generate_cohort(b, workers=2, **kwargs)
    assert _tree_digest(a) == _tree_digest(b)
    generate_cohort(c, **{**kwargs, "seed": 8})
    assert _tree_digest(a) != _tree_digest(c)

    before = _tree_digest(a)
    with pytest.raises(ValueError, match="--overwrite"):
        generate_cohort(a, **{**kwargs, "seed": 8})
    assert _tree_digest(a) == before  # refused: nothing touched
    generate_cohort(a, overwrite=True, **{**kwargs, "seed": 8})
    assert _tree_digest(a) == _tree_digest(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left


def test_mammo_default_counts_and_rendered_cases(tmp_path):
    profiles = mammo.center_profiles()
    assert len(profiles) == 2
    truth = pd.concat([plan_center(i, p, "mammo", seed=0, difficulty=1.0) for i, p in enumerate(profiles)])
    assert len(truth) == 294 and (truth["label"] == 0).sum() == 106 and (truth["label"] == 1).sum() == 188
    assert set(truth["lesion_type"]) == {"mass", "calcification"}
    linear = truth["pattern"] == "fine_linear_branching"
    assert truth.loc[linear, "label"].mean() < truth.loc[truth["pattern"] == "punctate_mass", "label"].mean()

    out = tmp_path / "mammo"
    summary = generate_cohort(out, size="demo", modality="mammo", patients=12)
    assert summary.patients == 12
    tables = _tables(out)
    assert list(tables) == ["mammo1", "mammo2"]
    for table in tables.values():
        assert set(table["label"]) <= {"DCIS", "IDC"} and set(table["modality"]) == {"mammo"}
        assert (table["mask"] != "").all()
    assert json.loads((out / "cohort.json").read_text())["label_meaning"] == {"0": "DCIS", "1": "IDC"}


# ------------------------------------------------------------------------------------------- CLI
def test_cli_writes_cohort_and_preview(tmp_path, capsys):
    out, preview = tmp_path / "cohort", tmp_path / "sheet.png"
    assert cli_main(["phantom", "--out", str(out), "--size", "demo", "--centers", "2", "--patients", "12",
                     "--doppler-fraction", "0.3", "--preview", str(preview)]) == 0
    assert "wrote 12 patients" in capsys.readouterr().out
    sheet = Image.open(preview)
    assert sheet.width >= 400 and sheet.height >= 2 * 200  # center x modality rows of tiles
    assert cli_main(["phantom", "--out", str(out), "--size", "demo"]) == 2  # not empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["phantom", "--out", str(tmp_path / "x"), "--doppler-fraction", "1.5"]) == 2
    assert "doppler-fraction" in capsys.readouterr().err
