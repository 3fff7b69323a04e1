"""Per-center scanner profiles: what makes one hospital's images look unlike another's.

Centers differ in transducer frequency (speckle size), beam quality, pixel spacing, dynamic range,
gain, TGC error, compounding, gray map, post-filtering, linear vs curvilinear geometry, image size,
RGB vs gray export, JPEG quality, burned-in text and calipers, and case mix (docs/design.md).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from diffkd.data.phantom.clinical import CaseMix

SIZES = ("demo", "paper")
DEMO_LONG_SIDE = 256  # demo images: the longer side in pixels (field of view in mm is kept)


@dataclass(frozen=True)
class ScannerProfile:
    name: str
    model_text: str  # burned-in system / probe label
    geometry: str  # "linear" | "sector" (curvilinear probe, scan-converted)
    frequency_mhz: float
    spacing_mm: float
    rows: tuple[int, ...]  # image height in pixels; several values = the sonographer's depth settings
    cols: int
    psf_axial_wavelengths: float  # axial PSF sigma in wavelengths (pulse length)
    psf_lateral_wavelengths: float  # lateral PSF sigma in wavelengths (F-number / focusing)
    dynamic_range_db: float
    gain_db: float
    tgc_error_db_cm_mhz: float  # + : TGC under-compensates attenuation, deep tissue darker
    focal_depth_mm: float
    compounding: int  # number of compounded speckle looks (1 = none)
    gamma: float  # gray map: v ** gamma
    smoothing_px: float  # vendor speckle-reduction blur, 0 = none
    rgb: bool
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gray map for RGB exports
    overlay_color: tuple[int, int, int] = (255, 255, 255)
    jpeg_quality: int | None = None
    ui_margins: tuple[int, int, int, int] = (0, 0, 0, 0)  # black frame: top, bottom, left, right (px)
    text_overlay: bool = True
    caliper_rate: float = 0.0  # share of images with burned-in calipers
    sector_radius_mm: float = 0.0  # curvilinear probe radius (sector geometry only)
    patients: int = 100
    mix: CaseMix = field(default_factory=CaseMix)

    def __post_init__(self) -> None:
        if self.geometry not in ("linear", "sector"):
            raise ValueError(f"center {self.name}: geometry must be 'linear' or 'sector', not {self.geometry!r}")
        if self.geometry == "sector" and self.sector_radius_mm <= 0:
            raise ValueError(f"center {self.name}: sector geometry needs sector_radius_mm > 0")

    @property
    def wavelength_mm(self) -> float:
        return 1.54 / self.frequency_mhz  # speed of sound 1540 m/s

    def scaled(self, long_side: int) -> "ScannerProfile":
        """The same scanner with images resampled so the longer side has `long_side` pixels (same mm)."""
        factor = long_side / max(max(self.rows), self.cols)
        return dataclasses.replace(
            self, spacing_mm=round(self.spacing_mm / factor, 5), rows=tuple(int(round(r * factor)) for r in self.rows),
            cols=int(round(self.cols * factor)), ui_margins=tuple(int(round(m * factor)) for m in self.ui_margins),
            smoothing_px=self.smoothing_px * factor)

    def summary(self) -> dict:
        out = dataclasses.asdict(self)
        out["mix"] = dataclasses.asdict(self.mix)
        return out


# Four hand-made centers for the default cohort (1,435 patients as in DiffKD-DCIS), two more for
# --centers 5/6; beyond that, profiles are drawn at random around these.
BASE_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="center1", model_text="LOGIQ E9  ML6-15  BREAST", geometry="linear", frequency_mhz=12.0,
        spacing_mm=0.075, rows=(440,), cols=600, psf_axial_wavelengths=0.55, psf_lateral_wavelengths=1.6,
        dynamic_range_db=60, gain_db=0.0, tgc_error_db_cm_mhz=0.10, focal_depth_mm=15, compounding=2, gamma=1.0,
        smoothing_px=0.0, rgb=False, jpeg_quality=None, caliper_rate=0.35, patients=520,
        mix=CaseMix()),
    ScannerProfile(
        name="center2", model_text="ACUSON S2000 9L4", geometry="linear", frequency_mhz=9.0, spacing_mm=0.10,
        rows=(400,), cols=470, psf_axial_wavelengths=0.45, psf_lateral_wavelengths=1.3, dynamic_range_db=50,
        gain_db=4.0, tgc_error_db_cm_mhz=-0.08, focal_depth_mm=20, compounding=1, gamma=0.8, smoothing_px=0.0,
        rgb=True, tint=(1.0, 0.95, 0.82), overlay_color=(255, 230, 0), jpeg_quality=70,
        ui_margins=(44, 30, 24, 56), caliper_rate=0.5, patients=390,
        mix=CaseMix(aggressiveness_shift=0.15, type_shift=0.25, age_mean=58.0, views=(0.2, 0.5, 0.3),
                    missing_scale=1.5)),
    ScannerProfile(
        name="center3", model_text="C5-2  ABDO/BREAST", geometry="sector", frequency_mhz=7.0, spacing_mm=0.12,
        rows=(420,), cols=560, psf_axial_wavelengths=0.6, psf_lateral_wavelengths=1.9, dynamic_range_db=66,
        gain_db=-2.0, tgc_error_db_cm_mhz=0.20, focal_depth_mm=25, compounding=1, gamma=1.25, smoothing_px=0.0,
        rgb=False, jpeg_quality=85, caliper_rate=0.1, sector_radius_mm=45.0, patients=300,
        mix=CaseMix(aggressiveness_shift=-0.2, type_shift=-0.35, size_scale=0.9, age_mean=54.0,
                    views=(0.45, 0.4, 0.15), node_missing=0.6)),
    ScannerProfile(
        name="center4", model_text="EPIQ 7  eL18-4", geometry="linear", frequency_mhz=14.0, spacing_mm=0.06,
        rows=(500, 583, 667), cols=720, psf_axial_wavelengths=0.5, psf_lateral_wavelengths=1.4,
        dynamic_range_db=55, gain_db=1.0, tgc_error_db_cm_mhz=0.0, focal_depth_mm=12, compounding=3, gamma=1.0,
        smoothing_px=1.0, rgb=True, overlay_color=(0, 255, 120), jpeg_quality=92, ui_margins=(36, 0, 0, 0),
        caliper_rate=0.6, patients=225,
        mix=CaseMix(aggressiveness_shift=0.05, age_mean=57.0, views=(0.3, 0.4, 0.3), missing_scale=0.6)),
    ScannerProfile(
        name="center5", model_text="ARIETTA 850  L64", geometry="linear", frequency_mhz=10.0, spacing_mm=0.085,
        rows=(420,), cols=540, psf_axial_wavelengths=0.5, psf_lateral_wavelengths=1.5, dynamic_range_db=65,
        gain_db=-1.0, tgc_error_db_cm_mhz=0.05, focal_depth_mm=18, compounding=2, gamma=1.1, smoothing_px=0.6,
        rgb=False, jpeg_quality=80, ui_margins=(30, 20, 0, 40), caliper_rate=0.3, patients=260,
        mix=CaseMix(aggressiveness_shift=-0.05, type_shift=0.1, age_mean=52.0)),
    ScannerProfile(
        name="center6", model_text="Aplio i800  i18LX5", geometry="linear", frequency_mhz=13.0, spacing_mm=0.07,
        rows=(480,), cols=640, psf_axial_wavelengths=0.5, psf_lateral_wavelengths=1.7, dynamic_range_db=58,
        gain_db=2.0, tgc_error_db_cm_mhz=0.12, focal_depth_mm=14, compounding=2, gamma=0.9, smoothing_px=0.0,
        rgb=True, tint=(0.92, 0.96, 1.0), overlay_color=(120, 200, 255), jpeg_quality=75, caliper_rate=0.25,
        patients=240, mix=CaseMix(aggressiveness_shift=0.1, age_mean=59.0, missing_scale=1.2)),
)
DEFAULT_CENTERS = 4
DEFAULT_PATIENTS = sum(p.patients for p in BASE_PROFILES[:DEFAULT_CENTERS])  # 1,435


def _random_profile(index: int, rng: np.random.Generator) -> ScannerProfile:
    base = BASE_PROFILES[index % len(BASE_PROFILES)]
    freq = float(rng.uniform(7.0, 15.0))
    return dataclasses.replace(
        base, name=f"center{index + 1}", frequency_mhz=round(freq, 1),
        spacing_mm=round(float(rng.uniform(0.05, 0.12)), 3),
        dynamic_range_db=round(float(rng.uniform(45, 70)), 0), gain_db=round(float(rng.uniform(-4, 4)), 1),
        tgc_error_db_cm_mhz=round(float(rng.uniform(-0.15, 0.25)), 2), compounding=int(rng.integers(1, 4)),
        gamma=round(float(rng.uniform(0.8, 1.3)), 2), rgb=bool(rng.random() < 0.5),
        jpeg_quality=None if rng.random() < 0.2 else int(rng.integers(60, 96)),
        caliper_rate=round(float(rng.uniform(0, 0.6)), 2),
        mix=dataclasses.replace(base.mix, aggressiveness_shift=round(float(rng.normal(0, 0.15)), 2),
                                type_shift=round(float(rng.normal(0, 0.2)), 2)))


def center_profiles(n_centers: int = DEFAULT_CENTERS, size: str = "paper", patients: int | None = None,
                    seed: int = 0) -> list[ScannerProfile]:
    """Profiles for n centers at the given size preset; `patients` (total) is split by the default weights."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, not {size!r}")
    if n_centers < 1:
        raise ValueError(f"--centers must be >= 1, got {n_centers}")
    rng = np.random.default_rng([seed, 9173])
    profiles = [BASE_PROFILES[i] if i < len(BASE_PROFILES) else _random_profile(i, rng) for i in range(n_centers)]
    weights = np.array([p.patients for p in profiles], float)
    if patients is None:
        counts = (np.clip(np.round(weights * 0.18), 60, 100) if size == "demo" else weights).astype(int)
    else:
        if patients < n_centers:
            raise ValueError(f"--patients {patients} is fewer than one per center ({n_centers} centers)")
        counts = _split(patients, weights)
    out = []
    for prof, count in zip(profiles, counts):
        prof = dataclasses.replace(prof, patients=int(count))
        out.append(prof.scaled(DEMO_LONG_SIDE) if size == "demo" else prof)
    return out


def _split(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts proportional to weights that sum exactly to total (largest remainder), each >= 1."""
    raw = total * weights / weights.sum()
    counts = np.maximum(np.floor(raw).astype(int), 1)
    for i in np.argsort(-(raw - np.floor(raw)), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    while counts.sum() > total:
        counts[np.argmax(counts)] -= 1
    return counts
