"""B-mode breast ultrasound from a tissue model, a scatterer field and a point-spread function.

Pipeline for one image (all vectorised, float32):
1. a beam-space grid: depth x lateral samples; for curvilinear probes the samples lie on a fan
   and are scan-converted to the Cartesian output at the end;
2. tissue maps on that grid: backscatter (dB), scatterer density and attenuation (dB/cm/MHz) for
   skin, subcutaneous fat with Cooper's ligaments, glandular tissue with fat lobules, pectoral muscle,
   and the lesion (mass with its margin, halo, posterior features; non-mass region; calcifications);
3. speckle: complex Gaussian scatterers x sqrt(backscatter x round-trip attenuation x TGC), thinned
   by the density map (sparse scatterers give K-distributed, sub-Rayleigh texture), convolved with
   a separable Gaussian PSF whose size follows the wavelength; envelope = magnitude; compounding
   averages several looks;
4. log compression with the center's gain and dynamic range, its gray map and post-filter.
docs/design.md "Ultrasound images from physics" lists the physical values used here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import ndimage

from diffkd.data.phantom.centers import ScannerProfile
from diffkd.data.phantom.fields import sigmoid, smooth_curve, smooth_noise

TOP_DB = 20.0  # display ceiling above glandular tissue: echogenic foci (+15..20 dB) saturate
NOISE_FLOOR_DB = -72.0  # receiver noise relative to glandular echo, before TGC
NOMINAL_ATTENUATION = 0.75  # dB/cm/MHz that TGC is set to compensate
BOUNDARY_SAMPLES = 1024

# tissue: backscatter dB, scatterers per resolution cell, attenuation dB/cm/MHz. Few scatterers per
# cell (glandular tissue) give K-distributed, sub-Rayleigh texture; many give fully developed speckle.
SKIN = (2.0, 20.0, 1.0)
FAT = (-14.0, 12.0, 0.6)
GLAND = (0.0, 2.5, 0.85)
MUSCLE = (-6.0, 5.0, 1.0)
CHEST_WALL = (-12.0, 4.0, 1.2)  # intercostal tissue under the pectoral muscle; the pleura is a bright line
LESION_SCATTERERS = 12.0


# --------------------------------------------------------------------------------------------- grid
@dataclass(frozen=True)
class BeamGrid:
    """Where the echoes are sampled (beam space) and how that maps onto the output pixels."""

    geometry: str
    out_shape: tuple[int, int]
    spacing: float  # output pixel spacing, mm
    depth: np.ndarray  # (n_r,) mm along each beam
    lateral: np.ndarray  # (n_l,) mm along the skin
    X: np.ndarray  # (n_r, n_l) Cartesian position of each sample in the output frame, mm
    Z: np.ndarray
    dr: float
    dl: float  # lateral sample step: mm (linear) or radians (sector)
    radius: float = 0.0
    theta_max: float = 0.0
    out_index: np.ndarray | None = None  # (2, H, W) fractional beam-space indices of each output pixel
    out_valid: np.ndarray | None = None  # (H, W) inside the fan

    @property
    def z_offset(self) -> float:
        return self.radius * np.cos(self.theta_max)

    def to_index(self, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional beam-space (row, col) of Cartesian points (mm)."""
        if self.geometry == "linear":
            return z / self.dr - 0.5, (x - self.lateral[0]) / self.dl
        r = np.hypot(x, z + self.z_offset) - self.radius
        theta = np.arctan2(x, z + self.z_offset)
        return r / self.dr - 0.5, (theta + self.theta_max) / self.dl - 0.5

    def window(self, xmin: float, xmax: float, zmin: float, zmax: float) -> tuple[slice, slice]:
        """Beam-space index window that contains a Cartesian box."""
        xs = np.array([xmin, xmax, xmin, xmax])
        zs = np.array([zmin, zmin, zmax, zmax])
        ri, li = self.to_index(xs, zs)
        if self.geometry == "sector":  # nearest point of the box to the apex bounds the depth from below
            r0, _ = self.to_index(np.array([np.clip(0.0, xmin, xmax)]), np.array([zmin]))
            ri = np.append(ri, r0)
        n_r, n_l = self.X.shape
        rs = slice(int(np.clip(np.floor(ri.min()) - 1, 0, n_r)), int(np.clip(np.ceil(ri.max()) + 2, 0, n_r)))
        ls = slice(int(np.clip(np.floor(li.min()) - 1, 0, n_l)), int(np.clip(np.ceil(li.max()) + 2, 0, n_l)))
        return rs, ls

    def out_coords(self) -> tuple[np.ndarray, np.ndarray]:
        """Cartesian (x, z) of the output pixel centres, as (1, W) and (H, 1) arrays."""
        h, w = self.out_shape
        x = ((np.arange(w) + 0.5 - w / 2) * self.spacing)[None, :]
        z = ((np.arange(h) + 0.5) * self.spacing)[:, None]
        return x.astype(np.float32), z.astype(np.float32)

    def to_output(self, beam_image: np.ndarray, order: int = 1) -> np.ndarray:
        """Scan conversion: beam space -> output pixels (identity for linear probes); outside the fan = 0."""
        if self.geometry == "linear":
            return beam_image
        out = ndimage.map_coordinates(beam_image, self.out_index, order=order, mode="nearest")
        out[~self.out_valid] = 0
        return out


@lru_cache(maxsize=32)
def beam_grid(geometry: str, rows: int, cols: int, spacing: float, radius: float = 0.0) -> BeamGrid:
    h, w = rows, cols
    if geometry == "linear":
        depth = ((np.arange(h) + 0.5) * spacing).astype(np.float32)
        lateral = ((np.arange(w) + 0.5 - w / 2) * spacing).astype(np.float32)
        X, Z = np.broadcast_arrays(lateral[None, :], depth[:, None])
        return BeamGrid(geometry, (h, w), spacing, depth, lateral, X, Z, spacing, spacing)
    # Curvilinear probe: apex `radius` above the skin; the fan fills the output width.
    theta = 0.5
    for _ in range(4):  # depth and opening angle depend on each other through the fan's sagitta
        beam_len = h * spacing - radius * (1 - np.cos(theta)) - spacing
        theta = float(np.arcsin(min(0.97 * w * spacing / (2 * (radius + beam_len)), 0.95)))
    n_r = int(round(beam_len / spacing))
    n_l = int(round(2 * theta * (radius + beam_len / 2) / spacing))
    dr, dth = beam_len / n_r, 2 * theta / n_l
    depth = ((np.arange(n_r) + 0.5) * dr).astype(np.float32)
    th = ((np.arange(n_l) + 0.5) * dth - theta).astype(np.float32)
    z_off = radius * np.cos(theta)
    X = ((radius + depth[:, None]) * np.sin(th[None, :])).astype(np.float32)
    Z = ((radius + depth[:, None]) * np.cos(th[None, :]) - z_off).astype(np.float32)
    grid = BeamGrid(geometry, (h, w), spacing, depth, (radius * th).astype(np.float32), X, Z, dr, dth,
                    radius=radius, theta_max=theta)
    x, z = grid.out_coords()
    x, z = np.broadcast_arrays(x, z)
    ri, li = grid.to_index(x, z)
    valid = (ri >= -0.5) & (ri <= n_r - 0.5) & (li >= -0.5) & (li <= n_l - 0.5)
    return BeamGrid(geometry, (h, w), spacing, depth, grid.lateral, X, Z, dr, dth, radius=radius,
                    theta_max=theta, out_index=np.stack([ri, li]).astype(np.float32), out_valid=valid)


def profile_grid(profile: ScannerProfile, rows: int) -> BeamGrid:
    return beam_grid(profile.geometry, rows, profile.cols, profile.spacing_mm, profile.sector_radius_mm)


# ---------------------------------------------------------------------------------------- case model
@dataclass(frozen=True)
class UltrasoundCase:
    """What the renderer needs from a case's latent truth (see clinical.sample_latent_cases)."""

    lesion_type: str
    size_mm: float
    margin: str | None = None
    posterior: str = "none"
    taller_than_wide: bool = False
    halo: bool = False
    calcs_on_us: bool = False
    vascularity: int = 0

    @classmethod
    def from_row(cls, row) -> "UltrasoundCase":
        margin = row["margin"] if isinstance(row["margin"], str) else None
        return cls(str(row["lesion_type"]), float(row["size_mm"]), margin, str(row["posterior"]),
                   bool(row["taller_than_wide"]), bool(row["halo"]), bool(row["calcs_on_us"]),
                   int(row["vascularity"]))


@dataclass(frozen=True)
class Anatomy:
    """One patient's breast: layer depths (mm) and texture seeds, shared by all of her views."""

    skin: float
    fat: float  # depth of the fat/gland interface
    gland: float  # depth of the pectoral fascia
    muscle: float  # pectoral muscle thickness
    undulation: float
    muscle_angle: float
    lesion_depth_frac: float
    lesion_x_frac: float
    long_axis: float  # lesion long-axis azimuth, radians
    dims: tuple[float, float, float]  # lesion 3-D extent (long, short, depth), mm


def sample_anatomy(case: UltrasoundCase, fov_depth: float, rng: np.random.Generator) -> Anatomy:
    skin = rng.uniform(1.2, 2.2)
    fat = skin + rng.uniform(2.5, 9.0)
    gland = min(fat + rng.uniform(12.0, 26.0), fov_depth * rng.uniform(0.72, 0.92))
    size = case.size_mm
    if case.lesion_type == "mass":
        if case.taller_than_wide:
            dims = (size * rng.uniform(0.65, 0.85), size * rng.uniform(0.55, 0.8), size)
        else:
            dims = (size, size * rng.uniform(0.6, 0.95), size * rng.uniform(0.4, 0.72))
    elif case.lesion_type == "non_mass":
        dims = (size, size * rng.uniform(0.4, 0.8), size * rng.uniform(0.18, 0.32))
    else:  # calcification cluster (and the extent of an invisible lesion)
        dims = (size, size * rng.uniform(0.5, 0.9), size * rng.uniform(0.3, 0.5))
    return Anatomy(skin=skin, fat=fat, gland=gland, muscle=rng.uniform(4.0, 10.0), undulation=rng.uniform(0.5, 2.5),
                   muscle_angle=rng.uniform(-0.35, 0.35), lesion_depth_frac=rng.uniform(0.2, 0.8),
                   lesion_x_frac=rng.uniform(-0.18, 0.18), long_axis=rng.uniform(0, np.pi), dims=dims)


@dataclass
class LesionView:
    """The lesion as cut by one imaging plane, in output-frame millimetres."""

    kind: str  # mass | non_mass | calcification
    x0: float
    z0: float
    half_w: float
    half_h: float
    tilt: float
    boundary: np.ndarray  # B(phi) on BOUNDARY_SAMPLES angles: relative radius of the edge
    edge: float  # width of the edge transition, relative units (indistinct margins are soft)
    echo_db: float  # relative to glandular tissue
    halo_db: float = 0.0
    posterior_db: float = 0.0  # extra round-trip loss behind the lesion: + shadowing, - enhancement
    foci: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))  # (x, z, radius) mm

    @property
    def reach(self) -> float:
        """Radius (mm) of a circle around (x0, z0) that holds the lesion, its spikes and its halo."""
        return float(max(self.half_w, self.half_h) * (self.boundary.max() + 3 * self.edge + 0.4)) + 1.0

    def fields(self, X: np.ndarray, Z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lesion weight (0..1), halo weight and relative radius on the given coordinates."""
        dx, dz = X - self.x0, Z - self.z0
        c, s = float(np.cos(self.tilt)), float(np.sin(self.tilt))
        pn = (dx * c + dz * s) / self.half_w
        qn = (-dx * s + dz * c) / self.half_h
        rho = np.hypot(pn, qn)
        phi = np.arctan2(qn, pn)
        idx = ((phi + np.pi) * (BOUNDARY_SAMPLES / (2 * np.pi))).astype(np.int32) % BOUNDARY_SAMPLES
        edge_r = self.boundary[idx]
        weight = sigmoid((edge_r - rho) / self.edge)
        halo = np.zeros_like(weight)
        if self.halo_db:
            band = 0.35
            halo = np.exp(-(((rho - edge_r - band * 0.6) / band) ** 2)).astype(np.float32) * (1 - weight)
        return weight.astype(np.float32), halo, rho


def margin_boundary(margin: str, rng: np.random.Generator, mean_radius_mm: float) -> tuple[np.ndarray, float]:
    """Relative edge radius B(phi) for each margin type, and the edge softness."""
    phi = np.linspace(-np.pi, np.pi, BOUNDARY_SAMPLES, endpoint=False)
    low = sum(rng.uniform(0.01, 0.04) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    if margin == "circumscribed":
        return 1.0 + low, 0.03
    if margin == "microlobulated":
        lobules = max(5, int(2 * np.pi * mean_radius_mm / rng.uniform(1.8, 3.2)))
        jitter = 1.2 * smooth_curve(BOUNDARY_SAMPLES, 120, rng)  # irregular lobule spacing
        size = np.clip(0.7 + 0.3 * smooth_curve(BOUNDARY_SAMPLES, 90, rng), 0.2, 1.2)
        ripple = np.abs(np.cos(0.5 * lobules * phi + rng.uniform(0, np.pi) + jitter)) ** 0.7
        return 0.9 + low + 0.2 * size * ripple, 0.03
    if margin == "angular":
        n = int(rng.integers(5, 9))
        ang = np.sort(rng.uniform(-np.pi, np.pi, n))
        rad = np.where(np.arange(n) % 2 == 0, rng.uniform(1.05, 1.35, n), rng.uniform(0.8, 0.95, n))
        return np.interp(phi, ang, rad, period=2 * np.pi) + 0.5 * low, 0.025
    if margin == "spiculated":
        b = 0.95 + 1.5 * low
        for _ in range(int(rng.integers(6, 15))):
            center = rng.uniform(-np.pi, np.pi)
            width = rng.uniform(0.05, 0.12)
            d = np.abs((phi - center + np.pi) % (2 * np.pi) - np.pi)
            b = b + rng.uniform(0.3, 0.9) * np.clip(1 - d / width, 0, None) ** 1.2
        return b, 0.035
    if margin in ("indistinct", "non_mass"):
        b = 1.0 + 2.5 * low + 0.06 * smooth_curve(BOUNDARY_SAMPLES, 40, rng)
        return b, 0.14
    return 1.0 + 0.3 * low, 0.05  # calcification cluster envelope


def lesion_for_view(case: UltrasoundCase, anatomy: Anatomy, view: int, grid: BeamGrid,
                    rng: np.random.Generator) -> LesionView | None:
    if case.lesion_type == "not_visible":
        return None
    azimuth = anatomy.long_axis + (0.0, np.pi / 2, np.pi / 4)[view % 3]
    long_, short, depth = anatomy.dims
    half_w = 0.5 * float(np.hypot(long_ * np.cos(azimuth), short * np.sin(azimuth)))
    half_h = 0.5 * depth
    h_mm = grid.out_shape[0] * grid.spacing
    w_mm = grid.out_shape[1] * grid.spacing
    if grid.geometry == "sector":
        w_mm = 2 * (grid.radius + grid.depth[-1] * 0.4) * np.sin(grid.theta_max)  # the fan narrows upwards
    top = anatomy.fat - (0.3 * half_h if case.lesion_type == "mass" else 0.0)
    bottom = min(anatomy.gland, h_mm - 2.0)
    z_lo, z_hi = top + half_h, bottom - half_h
    z0 = z_lo + anatomy.lesion_depth_frac * (z_hi - z_lo) if z_hi > z_lo else 0.5 * (top + bottom)
    z0 = float(np.clip(z0, anatomy.skin + half_h + 0.5, h_mm - half_h - 1.0))
    x0 = float(np.clip(anatomy.lesion_x_frac * w_mm + rng.normal(0, 1.0), -0.5 * w_mm + half_w + 1,
                       0.5 * w_mm - half_w - 1)) if w_mm > 2 * half_w + 2 else 0.0
    if grid.geometry == "sector":
        z0 += grid.radius * (1 - np.cos(grid.theta_max))  # skin at the centre of the fan lies lower
    tilt = float(rng.normal(0, 0.12))
    kind = case.lesion_type
    if kind == "mass":
        boundary, edge = margin_boundary(case.margin or "circumscribed", rng, 0.5 * (half_w + half_h))
        lesion = LesionView(kind, x0, z0, half_w, half_h, tilt, boundary.astype(np.float32), edge,
                            echo_db=float(rng.uniform(-26, -16)), halo_db=8.0 if case.halo else 0.0,
                            posterior_db=_posterior_db(case.posterior, rng))
    elif kind == "non_mass":
        boundary, edge = margin_boundary("non_mass", rng, half_w)
        lesion = LesionView(kind, x0, z0, half_w, half_h, float(rng.normal(0, 0.1)), boundary.astype(np.float32),
                            edge, echo_db=float(rng.uniform(-14, -8)),
                            posterior_db=0.5 * _posterior_db(case.posterior, rng))
    else:  # calcification-only cluster in otherwise normal tissue
        boundary, edge = margin_boundary("cluster", rng, half_w)
        lesion = LesionView(kind, x0, z0, half_w, half_h, tilt, boundary.astype(np.float32), edge, echo_db=0.0)
    if case.calcs_on_us:
        lesion.foci = _foci(lesion, rng, grid.spacing)
    return lesion


def _posterior_db(posterior: str, rng: np.random.Generator) -> float:
    if posterior == "shadowing":
        return float(rng.uniform(10, 20))
    if posterior == "enhancement":
        return -float(rng.uniform(5, 10))
    return 0.0


def _foci(lesion: LesionView, rng: np.random.Generator, spacing: float) -> np.ndarray:
    n = int(rng.integers(6, 20) if lesion.kind == "calcification" else rng.integers(2, 10))
    spread = 0.95 if lesion.kind == "calcification" else 0.7
    r = spread * np.sqrt(rng.random(n))
    a = rng.uniform(0, 2 * np.pi, n)
    p, q = r * np.cos(a) * lesion.half_w, r * np.sin(a) * lesion.half_h
    c, s = np.cos(lesion.tilt), np.sin(lesion.tilt)
    x = lesion.x0 + p * c - q * s
    z = lesion.z0 + p * s + q * c
    rad = np.maximum(rng.uniform(0.08, 0.22, n), 0.6 * spacing)
    return np.column_stack([x, z, rad]).astype(np.float32)


# -------------------------------------------------------------------------------------- tissue maps
def tissue_maps(grid: BeamGrid, anatomy: Anatomy, lesion: LesionView | None, frequency_mhz: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backscatter (dB), scatterers per resolution cell and attenuation (dB/cm/MHz) on the beam grid."""
    n_r, n_l = grid.X.shape
    mm = grid.dr  # beam-space samples are ~1 output pixel apart in both directions
    cell = lambda size_mm: size_mm / mm  # noqa: E731 - correlation length in samples
    r = grid.depth[:, None]
    u = grid.lateral[None, :]
    und = anatomy.undulation
    skin_d = anatomy.skin + 0.15 * smooth_curve(n_l, cell(8), rng)[None, :]
    fat_d = anatomy.fat + und * smooth_curve(n_l, cell(12), rng)[None, :]
    gland_d = anatomy.gland + 1.5 * und * smooth_curve(n_l, cell(18), rng)[None, :] + anatomy.muscle_angle * u * 0.3

    in_skin = r < skin_d
    in_fat = (~in_skin) & (r < fat_d)
    chest_d = gland_d + anatomy.muscle
    in_chest = r >= chest_d
    in_muscle = (r >= gland_d) & ~in_chest
    layer = np.select([in_skin, in_fat, in_muscle, in_chest], [0, 1, 3, 4], 2).astype(np.int8)
    table = np.array([SKIN, FAT, GLAND, MUSCLE, CHEST_WALL], np.float32)
    bs = table[layer, 0]
    density = table[layer, 1]
    alpha = table[layer, 2]

    # glandular texture: soft-edged fat lobules, fibroglandular streaks; Cooper's ligaments (broken
    # curvilinear septa, stretched along the skin) through the fat and the upper gland
    gland = layer == 2
    streaks = smooth_noise((n_r, n_l), (cell(0.8), cell(4.0)), rng)
    tex = smooth_noise((n_r, n_l), (cell(1.6), cell(2.4)), rng)
    bs = np.where(gland, bs + 2.0 * tex + 2.0 * streaks, bs)
    lobules = smooth_noise((n_r, n_l), (cell(2.2), cell(3.5)), rng)
    fatty = gland * sigmoid((lobules - 0.8) * 5.0)
    bs = bs * (1 - fatty) + (FAT[0] + 1.5 * tex) * fatty
    density = density * (1 - fatty) + FAT[1] * fatty
    lig = smooth_noise((n_r, n_l), (cell(2.0), cell(7.0)), rng)
    breaks = smooth_noise((n_r, n_l), (cell(3.0), cell(3.0)), rng)
    septa = np.exp(-((lig / 0.15) ** 2)) * sigmoid((breaks + 0.2) * 4.0) * ((layer == 1) | (gland & (r < fat_d + 4)))
    bs = bs + 10.0 * septa
    # fascia lines at the fat/gland interface and on the pectoral muscle
    bs = bs + 5.0 * np.exp(-(((r - fat_d) / 0.3) ** 2)) + 8.0 * np.exp(-(((r - gland_d) / 0.35) ** 2))
    bs = bs + 14.0 * np.exp(-(((r - chest_d) / 0.3) ** 2))
    # muscle: oblique, broken striations
    stri = np.sin(2 * np.pi * (r * np.cos(0.35 + anatomy.muscle_angle) + u * 0.35) / 1.8 + 2.0 * tex)
    bs = np.where(in_muscle & (stri > 0.75), bs + 6.0 * sigmoid(breaks * 3.0), bs)
    bs = bs.astype(np.float32)

    if lesion is not None:
        _add_lesion(bs, density, alpha, grid, lesion, frequency_mhz, rng)
    return bs, density.astype(np.float32), alpha.astype(np.float32)


def _add_lesion(bs: np.ndarray, density: np.ndarray, alpha: np.ndarray, grid: BeamGrid,
                lesion: LesionView, frequency_mhz: float, rng: np.random.Generator) -> None:
    reach = lesion.reach
    rs, ls = grid.window(lesion.x0 - reach, lesion.x0 + reach, lesion.z0 - reach, lesion.z0 + reach)
    X, Z = grid.X[rs, ls], grid.Z[rs, ls]
    if X.size == 0:
        return
    w, halo, rho = lesion.fields(X, Z)
    shape = X.shape
    sub_bs, sub_den, sub_alpha = bs[rs, ls], density[rs, ls], alpha[rs, ls]
    if lesion.kind == "mass":
        inner = lesion.echo_db + 3.0 * smooth_noise(shape, max(1.0 / grid.dr, 1.0) * 1.2, rng)
        sub_bs[...] = (1 - w) * sub_bs + w * inner + lesion.halo_db * halo * (
            0.6 + 0.4 * np.abs(smooth_noise(shape, 0.8 / grid.dr, rng)))
        sub_den[...] = (1 - w) * sub_den + w * LESION_SCATTERERS
    elif lesion.kind == "non_mass":
        patches = smooth_noise(shape, 1.2 / grid.dr, rng)
        hypo = w * sigmoid((patches + 0.2) * 4.0)
        sub_bs[...] = sub_bs + hypo * (lesion.echo_db - sub_bs.clip(-20, 5) * 0.5)
        # one to three dilated ducts running along the segment
        c, s = np.cos(lesion.tilt), np.sin(lesion.tilt)
        p = ((X - lesion.x0) * c + (Z - lesion.z0) * s)
        q = (-(X - lesion.x0) * s + (Z - lesion.z0) * c)
        for _ in range(int(rng.integers(1, 4))):
            off = rng.uniform(-0.5, 0.5) * lesion.half_h
            wav = rng.uniform(0.2, 0.6) * lesion.half_h * np.sin(p / rng.uniform(3, 8) + rng.uniform(0, 6))
            width = rng.uniform(0.35, 0.8)
            dist = np.abs(q - off - wav)
            lumen = w * np.exp(-((dist / width) ** 4))
            wall = w * np.exp(-(((dist - width * 1.2) / 0.25) ** 2))
            sub_bs[...] = sub_bs * (1 - lumen) + lumen * -24.0 + 4.0 * wall
    if lesion.posterior_db:
        # spread the extra loss over the lesion's depth so that the central column loses posterior_db
        delta = lesion.posterior_db / (2.0 * frequency_mhz * (2.0 * lesion.half_h / 10.0))
        sub_alpha[...] = np.maximum(sub_alpha + delta * w, 0.05)
    if len(lesion.foci):
        fi, fj = grid.to_index(lesion.foci[:, 0], lesion.foci[:, 1])
        for i, j, rad in zip(fi, fj, lesion.foci[:, 2]):
            rr = max(rad / grid.dr, 0.6)
            i0, j0 = int(round(i)), int(round(j))
            k = int(np.ceil(rr))
            ii, jj = np.ogrid[max(i0 - k, 0):i0 + k + 1, max(j0 - k, 0):j0 + k + 1]
            lateral_scale = 1.0 if grid.geometry == "linear" else grid.dl * (grid.radius + i * grid.dr) / grid.dr
            disk = ((ii - i) ** 2 + ((jj - j) * lateral_scale) ** 2) <= rr * rr
            if disk.size == 0:
                continue
            bs[ii, jj] = np.where(disk, np.float32(rng.uniform(15, 20)), bs[ii, jj])
            density[ii, jj] = np.where(disk, 1e3, density[ii, jj])  # a strong reflector fills its cell


# ----------------------------------------------------------------------------------------- speckle
@lru_cache(maxsize=64)
def _kernel_energy(sigma: float) -> float:
    """Sum of squares of scipy's discrete Gaussian kernel: the variance gain of white noise."""
    delta = np.zeros(64, np.float64)
    delta[32] = 1.0
    return float((ndimage.gaussian_filter1d(delta, sigma, truncate=3.0) ** 2).sum())


def envelope_db(bs_db: np.ndarray, density: np.ndarray, alpha: np.ndarray, grid: BeamGrid,
                profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Echo amplitude in dB (0 dB = mean glandular echo at the nominal gain) on the beam grid."""
    f = profile.frequency_mhz
    dr_cm = grid.dr / 10.0
    attenuation = np.cumsum(alpha, axis=0)
    attenuation *= np.float32(2.0 * f * dr_cm)  # round trip, dB
    depth_cm = grid.depth[:, None] / 10.0
    tgc = 2.0 * f * depth_cm * (NOMINAL_ATTENUATION - profile.tgc_error_db_cm_mhz)
    focus = 2.5 * np.exp(-(((grid.depth[:, None] - profile.focal_depth_mm) / 8.0) ** 2))
    gain = tgc + focus + profile.gain_db
    sig_a = max(profile.psf_axial_wavelengths * profile.wavelength_mm / grid.dr, 0.6)
    lat_mm = grid.dl if grid.geometry == "linear" else grid.dl * (grid.radius + grid.depth[len(grid.depth) // 2])
    sig_l = max(profile.psf_lateral_wavelengths * profile.wavelength_mm / lat_mm, 0.8)
    norm = np.float32(1.0 / np.sqrt(_kernel_energy(sig_a) * _kernel_energy(sig_l)))
    # Scatterers per resolution cell -> chance that a sample holds one; the same tissue then has the
    # same texture statistics at any pixel spacing.
    p_sample = np.minimum(density / np.float32(2 * np.pi * sig_a * sig_l), 1.0)
    echo = 10.0 ** (0.1 * (bs_db - attenuation)) / p_sample
    echo *= rng.random(bs_db.shape, dtype=np.float32) < p_sample
    echo += np.float32(10.0 ** (0.1 * NOISE_FLOOR_DB))
    echo *= (0.5 * 10.0 ** (0.1 * gain)).astype(np.float32)
    amp = np.sqrt(echo, out=echo)

    looks = max(int(profile.compounding), 1)
    env = np.zeros(bs_db.shape, np.float32)
    for _ in range(looks):
        iq = rng.standard_normal((2, *bs_db.shape), dtype=np.float32)
        iq *= amp
        iq = ndimage.gaussian_filter1d(ndimage.gaussian_filter1d(iq, sig_a, axis=1, truncate=3.0), sig_l, axis=2,
                                       truncate=3.0)
        env += np.hypot(iq[0], iq[1])
    env *= norm / looks
    env += np.float32(1e-6)
    return 20.0 * np.log10(env)


def display_gray(db: np.ndarray, profile: ScannerProfile) -> np.ndarray:
    """Log-compressed, gray-mapped image in [0, 1]."""
    v = (db - (TOP_DB - profile.dynamic_range_db)) / profile.dynamic_range_db
    v = np.clip(v, 0.0, 1.0) ** profile.gamma
    if profile.smoothing_px > 0:
        v = ndimage.gaussian_filter(v, profile.smoothing_px, truncate=2.0)
    return v.astype(np.float32)


# ------------------------------------------------------------------------------------------ render
@dataclass
class UltrasoundFrame:
    """A rendered view before the display overlays: gray image in [0, 1] and the lesion mask."""

    gray: np.ndarray  # (H, W) float32 in the output frame
    mask: np.ndarray | None  # (H, W) bool, None when no lesion is visible
    lesion: LesionView | None
    grid: BeamGrid


def lesion_mask(grid: BeamGrid, lesion: LesionView | None) -> np.ndarray | None:
    if lesion is None:
        return None
    x, z = grid.out_coords()
    h, w = grid.out_shape
    reach = lesion.reach
    c0 = int(np.clip((lesion.x0 - reach) / grid.spacing + w / 2, 0, w))
    c1 = int(np.clip((lesion.x0 + reach) / grid.spacing + w / 2 + 1, 0, w))
    r0 = int(np.clip((lesion.z0 - reach) / grid.spacing, 0, h))
    r1 = int(np.clip((lesion.z0 + reach) / grid.spacing + 1, 0, h))
    mask = np.zeros((h, w), bool)
    weight, _, _ = lesion.fields(x[:, c0:c1], z[r0:r1, :])
    mask[r0:r1, c0:c1] = weight > 0.5
    if grid.out_valid is not None:
        mask &= grid.out_valid
    return mask if mask.any() else None


def render_frame(profile: ScannerProfile, case: UltrasoundCase, anatomy: Anatomy, view: int, rows: int,
                 rng: np.random.Generator) -> UltrasoundFrame:
    grid = profile_grid(profile, rows)
    lesion = lesion_for_view(case, anatomy, view, grid, rng)
    bs, density, alpha = tissue_maps(grid, anatomy, lesion, profile.frequency_mhz, rng)
    gray = display_gray(envelope_db(bs, density, alpha, grid, profile, rng), profile)
    return UltrasoundFrame(grid.to_output(gray), lesion_mask(grid, lesion), lesion, grid)
