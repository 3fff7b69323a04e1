"""Mammography microcalcification phantom: the DCIS-vs-IDC design of An et al. 2025 (label 1 = invasive).

Two centers, 294 cases (106 DCIS / 188 IDC) by default, one or two views (CC, MLO) per case.
An image is a detector-resolution region of interest around the finding:
- parenchyma: power-law (1/f^3) Gaussian texture, the standard model of breast anatomical noise,
  with a fibrous component elongated toward the nipple, mapped to fatty (dark) / dense (bright);
- calcifications: fine linear / branching casts along a segmental duct tree, fine pleomorphic
  clusters, amorphous clusters, or round punctate calcifications inside an irregular, often spiculated
  mass. Patterns follow the hidden aggressiveness as probabilities (DCIS leans to linear/branching,
  IDC to punctate-with-mass), so they overlap between the labels;
- quantum noise, detector blur and the vendor's processing curve; burned-in view labels; JPEG.
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.special import ndtri

from diffkd.data.phantom.clinical import CaseMix, cut, effective_coupling, readout
from diffkd.data.phantom.display import Exported, overlay_font
from diffkd.data.phantom.fields import feret_diameter, sigmoid
from diffkd.data.phantom.ultrasound import LesionView, margin_boundary

LABEL_NAMES = {0: "DCIS", 1: "IDC"}
DEFAULT_CENTERS = 2
# ordered from the least to the most invasive-looking, with their pooled rates
PATTERN_RATES = {"amorphous": 0.15, "fine_linear_branching": 0.30, "fine_pleomorphic": 0.25, "punctate_mass": 0.30}
COUPLING = {"pattern": 0.50, "size": 0.35, "palpable": 0.35, "node": 0.55, "grade": 0.30, "age": 0.10,
            "spiculation": 0.30}
SEPARATION = 2.49  # label shift of the aggressiveness at difficulty 1: AUC(a) = Phi(2.49 / sqrt 2) = 0.96
PATTERN_BIRADS = {"amorphous": -0.9, "fine_linear_branching": 0.6, "fine_pleomorphic": 0.2, "punctate_mass": 0.7}


@dataclass(frozen=True)
class MammoProfile:
    name: str
    model_text: str
    spacing_mm: float
    rows: int
    cols: int
    noise: float  # quantum noise at unit signal
    blur_px: float  # detector MTF
    gamma: float
    contrast: float  # processing: how far dense tissue is pushed from fat
    jpeg_quality: int | None
    dcis: int
    idc: int
    views: tuple[float, float] = (0.3, 0.7)  # P(1, 2 views)
    mix: CaseMix = field(default_factory=CaseMix)

    @property
    def patients(self) -> int:
        return self.dcis + self.idc

    def summary(self) -> dict:
        out = dataclasses.asdict(self)
        out["mix"] = dataclasses.asdict(self.mix)
        return out


BASE_PROFILES = (
    MammoProfile("mammo1", "Selenia Dimensions  L-CC/MLO", spacing_mm=0.07, rows=512, cols=512, noise=0.025,
                 blur_px=0.7, gamma=1.0, contrast=1.0, jpeg_quality=None, dcis=72, idc=128,
                 mix=CaseMix(age_mean=55.0)),
    MammoProfile("mammo2", "Senographe Pristina", spacing_mm=0.1, rows=400, cols=400, noise=0.04, blur_px=1.0,
                 gamma=1.3, contrast=0.85, jpeg_quality=88, dcis=34, idc=60, views=(0.5, 0.5),
                 mix=CaseMix(age_mean=52.0, missing_scale=1.5)),
)


def center_profiles(size: str = "paper", n_centers: int = DEFAULT_CENTERS, patients: int | None = None
                    ) -> list[MammoProfile]:
    if size not in ("demo", "paper"):
        raise ValueError(f"size must be demo or paper, not {size!r}")
    if n_centers < 1:
        raise ValueError(f"--centers must be >= 1, got {n_centers}")
    profiles = []
    for i in range(n_centers):
        base = BASE_PROFILES[i % len(BASE_PROFILES)]
        if i >= len(BASE_PROFILES):
            base = dataclasses.replace(base, name=f"mammo{i + 1}", noise=base.noise * (1 + 0.2 * i))
        profiles.append(base)
    if patients is not None or n_centers != DEFAULT_CENTERS:
        total = patients if patients is not None else sum(p.patients for p in profiles)
        if total < 2 * n_centers:
            raise ValueError(f"--patients {total} is too few for {n_centers} mammography centers")
        share = np.array([p.patients for p in profiles], float)
        counts = np.floor(total * share / share.sum()).astype(int)
        counts[: total - counts.sum()] += 1
        dcis_rate = 106 / 294
        dcis = [max(1, int(round(int(c) * dcis_rate))) for c in counts]
        profiles = [dataclasses.replace(p, dcis=d, idc=int(c) - d) for p, c, d in zip(profiles, counts, dcis)]
    if size == "demo":
        profiles = [dataclasses.replace(p, spacing_mm=round(p.spacing_mm * p.rows / 256, 5), rows=256, cols=256,
                                        blur_px=p.blur_px * 256 / p.rows) for p in profiles]
    return profiles


# ------------------------------------------------------------------------------------------- cases
def sample_cases(profile: MammoProfile, rng: np.random.Generator, difficulty: float = 1.0) -> pd.DataFrame:
    """Exactly profile.dcis DCIS and profile.idc IDC cases, with patterns and clinical findings."""
    n = profile.patients
    label = rng.permutation(np.r_[np.zeros(profile.dcis, np.int8), np.ones(profile.idc, np.int8)])
    sep = SEPARATION / max(difficulty, 1e-3)
    p = profile.idc / n
    a = sep * label + rng.standard_normal(n)
    a_std = (a - sep * p) / np.sqrt(1.0 + sep * sep * p * (1 - p))
    read = {k: readout(a_std, effective_coupling(r, difficulty), rng) for k, r in COUPLING.items()}
    pattern = cut(read["pattern"], PATTERN_RATES)
    mass = (pattern == "punctate_mass") | ((pattern == "fine_pleomorphic") & (rng.random(n) < 0.15))
    margin = np.where(mass, np.where(read["spiculation"] > 0.0, "spiculated", "indistinct"), None)
    size = 15.0 * np.exp(0.35 * read["size"]) * np.where(pattern == "fine_linear_branching", 1.3, 1.0)
    size = np.clip(size, 5.0, 26.0)
    score = (np.vectorize(PATTERN_BIRADS.get)(pattern) + 0.6 * np.log(size / 15.0) + 0.3 * (margin == "spiculated")
             + 0.6 * rng.standard_normal(n))
    birads = np.asarray(["4a", "4b", "4c", "5"], dtype=object)[np.searchsorted([-0.7, 0.0, 0.8], score)]
    # P(IDC | a) from the two normal components
    log_lr = sep * a - 0.5 * sep * sep
    label_probability = 1.0 / (1.0 + (1 - p) / p * np.exp(-log_lr))
    return pd.DataFrame({
        "aggressiveness": a, "label": label, "label_probability": label_probability, "pattern": pattern,
        "lesion_type": np.where(mass, "mass", "calcification"), "margin": margin, "calcs": True,
        "size_mm": size, "palpable": read["palpable"] > ndtri(1 - 0.15), "node": read["node"] > ndtri(1 - 0.08),
        "grade": cut(read["grade"], {1: 0.2, 2: 0.45, 3: 0.35}).astype(int),
        "age": np.clip(profile.mix.age_mean + 10.0 * read["age"], 28, 90).round(0), "birads": birads,
        "n_views": rng.choice(2, size=n, p=np.asarray(profile.views) / sum(profile.views)) + 1,
    })


def imaging_suspicion(cases: pd.DataFrame) -> np.ndarray:
    """What a reader sees on the mammogram: the morphology, extent and a mass, never the label."""
    base = cases["pattern"].map({"amorphous": -0.6, "fine_linear_branching": 0.1, "fine_pleomorphic": 0.3,
                                 "punctate_mass": 0.9}).to_numpy(float)
    return base + 0.5 * np.log(cases["size_mm"].to_numpy(float) / 15.0) + 0.4 * (cases["margin"] == "spiculated")


# ------------------------------------------------------------------------------------------ render
@dataclass
class Finding:
    """The lesion in its own millimetre frame (origin at its centre, x toward the nipple)."""

    calcs: np.ndarray  # (n, 5): x, y, length, width, angle (mm, mm, mm, mm, rad)
    contrast: np.ndarray  # (n,)
    mass: tuple[float, float, np.ndarray, float] | None  # half_w, half_h, boundary, edge


def _duct_tree(size: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Polylines of a segmental duct tree fanning out from a root, about `size` mm long."""
    paths, stack = [], [(np.array([-size / 2, 0.0]), rng.normal(0, 0.15), size * rng.uniform(0.7, 1.0), 0)]
    while stack and len(paths) < 9:
        start, angle, length, depth = stack.pop()
        steps = max(int(length / 0.6), 2)
        turns = angle + np.cumsum(rng.normal(0, 0.08, steps))
        pts = start + np.cumsum(0.6 * np.column_stack([np.cos(turns), np.sin(turns)]), axis=0)
        paths.append(np.vstack([start, pts]))
        if depth < 2:
            for _ in range(int(rng.integers(1, 3))):
                k = int(rng.integers(steps // 4, max(steps // 4 + 1, 3 * steps // 4)))
                stack.append((pts[k], turns[k] + rng.choice([-1, 1]) * rng.uniform(0.35, 0.8),
                              length * rng.uniform(0.35, 0.6), depth + 1))
    return paths


def make_finding(case: dict, rng: np.random.Generator) -> Finding:
    size = float(case["size_mm"])
    pattern = case["pattern"]
    mass = None
    if pattern == "fine_linear_branching":
        rows = []
        for path in _duct_tree(size, rng):
            seg = np.diff(path, axis=0)
            for i in range(0, len(seg), int(rng.integers(1, 3))):
                if rng.random() < 0.75:
                    ang = np.arctan2(seg[i, 1], seg[i, 0])
                    rows.append([*path[i], rng.uniform(0.3, 1.1), rng.uniform(0.1, 0.18), ang])
        calcs = np.array(rows) if rows else np.zeros((0, 5))
        contrast = rng.uniform(0.5, 0.9, len(calcs))
    else:
        n = {"amorphous": (20, 45), "fine_pleomorphic": (12, 35), "punctate_mass": (5, 20)}[pattern]
        n = int(rng.integers(*n))
        radius = size / 2 * (0.85 if pattern == "punctate_mass" else 1.0)
        r = radius * np.sqrt(rng.random(n)) * (0.6 if pattern == "punctate_mass" else 1.0)
        t = rng.uniform(0, 2 * np.pi, n)
        if pattern == "amorphous":
            length, width, contrast = rng.uniform(0.08, 0.15, n), rng.uniform(0.08, 0.12, n), rng.uniform(0.2, 0.4, n)
        elif pattern == "fine_pleomorphic":
            length, width = rng.uniform(0.12, 0.5, n), rng.uniform(0.1, 0.25, n)
            contrast = rng.uniform(0.45, 0.9, n)
        else:
            length = rng.uniform(0.12, 0.3, n)
            width, contrast = length, rng.uniform(0.5, 0.9, n)
        calcs = np.column_stack([r * np.cos(t), 0.7 * r * np.sin(t), length, width, rng.uniform(0, np.pi, n)])
    if case["lesion_type"] == "mass":
        half = size / 2 * rng.uniform(0.75, 0.95)
        boundary, edge = margin_boundary(case["margin"] or "indistinct", rng, half)
        if case["margin"] == "spiculated":  # mammographic spicules: long thin radiating lines
            boundary = 1.0 + (boundary - 1.0) * 1.4
        mass = (half, half * rng.uniform(0.7, 1.0), boundary.astype(np.float32), edge)
    return Finding(calcs.astype(np.float32), np.asarray(contrast, np.float32), mass)


@lru_cache(maxsize=8)
def _spectrum(shape: tuple[int, int], spacing: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ky = np.fft.fftfreq(shape[0], spacing)[:, None]
    kx = np.fft.rfftfreq(shape[1], spacing)[None, :]
    k = np.sqrt(kx * kx + ky * ky)
    return kx.astype(np.float32), ky.astype(np.float32), np.maximum(k, 0.02).astype(np.float32)


def parenchyma(shape: tuple[int, int], spacing: float, nipple_angle: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance power-law texture (P(f) ~ f^-3) with fibres elongated toward the nipple."""
    kx, ky, k = _spectrum(shape, spacing)
    along = kx * np.cos(nipple_angle) + ky * np.sin(nipple_angle)  # frequency along the fibres
    amp = k ** -1.5 * (1.0 + 1.0 * np.exp(-((along / 0.15) ** 2)) * (k > 0.3))
    noise = rng.standard_normal((2, *amp.shape), dtype=np.float32)
    field = np.fft.irfft2(amp * (noise[0] + 1j * noise[1]), s=shape).astype(np.float32)
    return (field - field.mean()) / (field.std() + 1e-9)


def render_view(profile: MammoProfile, finding: Finding, view: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
    """One view: gray image in [0, 1] and the lesion mask."""
    h, w, s = profile.rows, profile.cols, profile.spacing_mm
    nipple = rng.uniform(-0.4, 0.4) + (0.0 if view == 0 else rng.choice([-0.7, 0.7]))
    tex = parenchyma((h, w), s, nipple, rng)
    density = sigmoid((tex + rng.normal(0.0, 0.7)) * 1.2)
    img = 0.25 + 0.4 * profile.contrast * density
    # place the finding, rotated with the view, near the ROI centre
    cx, cy = w / 2 + rng.normal(0, 0.05 * w), h / 2 + rng.normal(0, 0.05 * h)
    rot = nipple + rng.normal(0, 0.1)
    cr, sr = np.cos(rot), np.sin(rot)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    X, Y = (xx + 0.5 - cx) * s, (yy + 0.5 - cy) * s  # mm from the finding's centre
    mask = np.zeros((h, w), bool)
    if finding.mass is not None:
        half_w, half_h, boundary, edge = finding.mass
        lesion = LesionView("mass", 0.0, 0.0, half_w, half_h, rot, boundary, edge, echo_db=0.0)
        weight, _, _ = lesion.fields(X, Y)
        img = img + rng.uniform(0.12, 0.2) * profile.contrast * weight
        mask |= weight > 0.5
    calcs = finding.calcs
    px = cx + (calcs[:, 0] * cr - calcs[:, 1] * sr) / s
    py = cy + (calcs[:, 0] * sr + calcs[:, 1] * cr) / s
    for x, y, (length, width, ang), c in zip(px, py, calcs[:, 2:], finding.contrast):
        k = int(np.ceil(max(length, width) / s)) + 2
        x0, y0 = int(x) - k, int(y) - k
        if x0 < 0 or y0 < 0 or x0 + 2 * k >= w or y0 + 2 * k >= h:
            continue
        dx, dy = xx[y0:y0 + 2 * k, x0:x0 + 2 * k] - x, yy[y0:y0 + 2 * k, x0:x0 + 2 * k] - y
        a = ang + rot
        p, q = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        sl, sw = max(length / s / 2, 0.6), max(width / s / 2, 0.6)
        img[y0:y0 + 2 * k, x0:x0 + 2 * k] += c * np.exp(-((p / sl) ** 2 + (q / sw) ** 2))
    if len(calcs):
        mask |= _hull_mask((h, w), px, py, 1.0 / s)
    img = np.clip(img, 1e-3, None)
    img = img + profile.noise * np.sqrt(img) * rng.standard_normal((h, w), dtype=np.float32)
    img = ndimage.gaussian_filter(img, profile.blur_px)
    img = np.clip((img - 0.15) / 0.85, 0, 1) ** profile.gamma
    return img.astype(np.float32), mask


def _hull_mask(shape: tuple[int, int], xs: np.ndarray, ys: np.ndarray, grow_px: float) -> np.ndarray:
    """The calcification cluster's extent: convex hull of the calcifications grown by `grow_px`."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.column_stack([xs, ys])
    img = Image.new("L", (shape[1], shape[0]), 0)
    try:
        hull = pts[ConvexHull(pts).vertices]
    except (QhullError, ValueError):
        hull = pts
    centre = hull.mean(axis=0)
    vec = hull - centre
    norm = np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-6)
    grown = hull + vec / norm * grow_px
    if len(grown) >= 3:
        ImageDraw.Draw(img).polygon([tuple(p) for p in grown], fill=255)
    else:
        for x, y in grown:
            ImageDraw.Draw(img).ellipse([x - grow_px, y - grow_px, x + grow_px, y + grow_px], fill=255)
    return np.asarray(img) > 0


def render_case(profile: MammoProfile, case: dict, seed_words: list[int]) -> list[Exported]:
    finding = make_finding(case, np.random.default_rng(seed_words))
    side = "R" if np.random.default_rng([*seed_words, 99]).random() < 0.5 else "L"
    out = []
    for v in range(int(case["n_views"])):
        rng = np.random.default_rng([*seed_words, 1 + v])
        gray, mask = render_view(profile, finding, v, rng)
        out.append(_export(gray, mask, profile, f"{side} {'CC' if v == 0 else 'MLO'}"))
    return out


def _export(gray: np.ndarray, mask: np.ndarray, profile: MammoProfile, view_text: str) -> Exported:
    img = Image.fromarray(np.round(gray * 255).astype(np.uint8), "L")
    draw = ImageDraw.Draw(img)
    font_px = max(8, profile.rows // 28)
    draw.text((4, 3), view_text, fill=250, font=overlay_font(font_px))
    draw.text((4, profile.rows - font_px - 4), profile.model_text, fill=200, font=overlay_font(max(7, font_px * 2 // 3)))
    if profile.jpeg_quality:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=profile.jpeg_quality)
        img = Image.open(io.BytesIO(buf.getvalue()))
        img.load()
    diameter_px, ends = feret_diameter(mask)
    return Exported(np.asarray(img), mask if ends is not None else None,
                    diameter_px * profile.spacing_mm if ends is not None else None)
