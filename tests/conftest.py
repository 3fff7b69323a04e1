"""Fixtures every test folder may use: the session's Ray instance and small datasets built on the fly.

The dataset builders are handed out as fixtures (factories: call them with a folder), so that a test
asks for what it uses by name and no helper module is imported from a test.
"""
import hashlib
import io
import os
import shutil
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from diffkd.data.dataset import ImageDataset
from diffkd.data.schema import arrow_schema

# Keep CPU-bound libraries from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance for the whole test session, with its own short temp dir.

    4 logical CPUs on a 2-core machine leave room for Ray Data tasks beside Train workers
    (docs/design.md: with num_cpus=2 a second concurrent trial never got a CPU).
    """
    import ray

    from diffkd.runtime.raycompat import init_local

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    init_local(num_cpus=4, temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def private_config_home(tmp_path_factory, monkeypatch):
    """Salt files (default ~/.config/diffkd/salts/) go to a fresh folder per test, never the real home."""
    home = tmp_path_factory.mktemp("config")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


@pytest.fixture
def rows_by_file():
    """rows_by_file(dataset, src, layout, salt=None) -> {path relative to src (+ "#frame=K"): stored row}.

    The dataset stores a salted hash of each file's path as `source`; this maps them back through the
    dataset's salt, for tests that check what became of one file."""
    from pathlib import Path

    from diffkd.data.ingest import pseudonymizer_for

    def rows(dataset, src, layout: str, salt=None) -> dict[str, dict]:
        pseudo = pseudonymizer_for(dataset, salt)
        files = {f"{layout}:{pseudo.text(p.relative_to(src).as_posix())}": p.relative_to(src).as_posix()
                 for p in Path(src).rglob("*") if p.is_file()}
        out = {}
        for row in ImageDataset(dataset).read_table().to_pylist():
            stem, _, frame = row["source"].partition("#")
            out[files[stem] + (f"#{frame}" if frame else "")] = row
        return out

    return rows


class FaultInjector:
    """Counts the calls diffkd's writers make to the filesystem and makes call number `at` fail.

    Every step of a write goes through one of these (creating, flushing, renaming, deleting files and
    folders, and the atomic folder swap), so failing each call in turn fails every step in turn.
    `kill=True` ends the process at that call (`os._exit`: no cleanup runs, as after a crash); use it
    in a forked child only.
    """

    FUNCTIONS = ("open", "fsync", "replace", "rename", "unlink", "rmdir", "mkdir")

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.calls: list[str] = []
        self.at: int | None = None
        self.error = 0
        self.kill = False

    def install(self, at: int | None = None, error: int = 28, kill: bool = False) -> "FaultInjector":
        import diffkd.runtime.files

        self.calls, self.at, self.error, self.kill = [], at, error, kill
        for name in self.FUNCTIONS:
            self.monkeypatch.setattr(os, name, self._wrap(name, getattr(os, name)))
        self.monkeypatch.setattr(diffkd.runtime.files, "_exchange", self._wrap("exchange", diffkd.runtime.files._exchange))
        return self

    def remove(self) -> None:
        self.monkeypatch.undo()

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            self.calls.append(f"{name} {os.path.basename(str(args[0])) if args else ''}")
            if self.at is not None and len(self.calls) - 1 == self.at:
                if self.kill:
                    os._exit(75)
                raise OSError(self.error, os.strerror(self.error), str(args[0]) if args else None)
            return real(*args, **kwargs)
        return call


@pytest.fixture
def fault_injector():
    """A `FaultInjector`; `install(at=K, error=errno.ENOSPC)` arms it, `remove()` restores the real functions."""
    injector = FaultInjector(pytest.MonkeyPatch())
    yield injector
    injector.remove()


# ---- shared helpers -----------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _table(rows: list[dict]) -> pa.Table:
    """Rows as a table in the dataset schema, the columns a builder leaves out as nulls."""
    table = pa.Table.from_pylist(rows)
    for f in arrow_schema():
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(len(table), f.type))
    return table


# ---- ramp datasets (the data pipeline) ----------------------------------------------------------

# Every image is a depth ramp (brighter with depth, textured across) at one of several sizes and
# aspect ratios; every 4th image of a center can be a 16-bit PNG; odd rows carry a lesion mask.

def _depth_ramp(height: int, width: int, dtype=np.uint8) -> np.ndarray:
    """Brightness rising with depth (row), plus texture: what augmentation must never turn upside down."""
    full = 255 if dtype == np.uint8 else 65535
    rows = np.linspace(0.1, 0.9, height)[:, None] * np.ones((1, width))
    texture = 0.05 * np.sin(np.arange(width) / 3.0)[None, :]
    return np.clip((rows + texture) * full, 0, full).astype(dtype)


def _ramp_rows(center: str, n: int, *, synthetic: bool = False, modality: str = "us", start: int = 0,
               sixteen_bit_every: int = 0) -> pa.Table:
    rows = []
    for i in range(start, start + n):
        h, w = 40 + 8 * (i % 3), 60 - 6 * (i % 2)  # several sizes and aspect ratios
        sixteen = sixteen_bit_every and i % sixteen_bit_every == 0
        image = _png(_depth_ramp(h, w, np.uint16 if sixteen else np.uint8))
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2] = 1
        prefix = "syn" if synthetic else "real"
        rows.append(dict(case_id=f"{prefix}-{center}-{i}", patient_id=f"p{center}{i}", center=center,
                         modality=modality, label=i % 2, image=image, mask=_png(mask) if i % 2 else None,
                         height=h, width=w, spacing_mm=0.1, synthetic=synthetic, source=f"test:{i}",
                         sha256=hashlib.sha256(image).hexdigest(), age=40.0 + i, birads="4b" if i % 2 else None,
                         palpable=bool(i % 3)))
    return _table(rows)


def _ramp_dataset(root) -> ImageDataset:
    """Centers A (24 rows, some 16-bit), B (16), C (8 us + 4 mammo); 40 synthetic rows for A."""
    ds = ImageDataset(root)
    ds.write_center("A", _ramp_rows("A", 24, sixteen_bit_every=4))
    ds.write_center("B", _ramp_rows("B", 16))
    ds.write_center("C", pa.concat_tables([_ramp_rows("C", 8), _ramp_rows("C", 4, modality="mammo", start=100)]))
    ds.write_synthetic("A", _ramp_rows("A", 40, synthetic=True), run_id="r1")
    return ds


@pytest.fixture(scope="session")
def ramp_dataset():
    """Factory: root -> centers A (24 rows, some 16-bit), B (16), C (8 us + 4 mammo), 40 synthetic A rows."""
    return _ramp_dataset


@pytest.fixture(scope="session")
def ramp_rows():
    """Factory: (center, n, *, synthetic, modality, start, sixteen_bit_every) -> rows of depth ramps."""
    return _ramp_rows


@pytest.fixture(scope="session")
def depth_ramp():
    """Factory: (height, width, dtype) -> an image brighter with depth."""
    return _depth_ramp


# ---- two-modality datasets (teacher, student, tune) ---------------------------------------------

# Centers A, B (internal) and C (external). Each center images some patients with B-mode (`us`) and
# *other* patients with Doppler (`us_doppler`), so teacher and student views share no patient. Label 1
# carries a bright disc, label 0 a dark square; the Doppler rendering adds a bright flow blob beside the
# upgraded lesions, which makes it the more informative modality, as in the PaGKD setting.

TWO_MODALITY_CENTERS = ("A", "B", "C")


def _draw_two_modality(label: int, doppler: bool, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + rng.uniform(-0.1, 0.1, 2)
    image = np.full((size, size), 0.35)
    weak = rng.uniform(0.3, 1.0)  # lesion contrast varies: B-mode alone is not perfectly separable
    if label:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.18 ** 2] = 0.35 + 0.5 * weak
    else:
        image[(abs(yy - cy) < 0.16) & (abs(xx - cx) < 0.16)] = 0.35 - 0.3 * weak
    if doppler and label:
        image[(yy - cy + 0.25) ** 2 + (xx - cx) ** 2 < 0.08 ** 2] = 1.0
    image += rng.normal(0, 0.08, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _two_modality_rows(center: str, n_us: int, n_doppler: int, size: int, seed: int) -> pa.Table:
    rng = np.random.default_rng([seed, ord(center)])
    rows = []
    for i in range(n_us + n_doppler):
        doppler = i >= n_us
        label = int(rng.random() < 0.5)
        image = _png(_draw_two_modality(label, doppler, rng, size))
        rows.append(dict(case_id=f"{center}-{i:03d}", patient_id=f"p-{center}-{i:03d}", center=center,
                         modality="us_doppler" if doppler else "us", label=label, image=image, mask=None,
                         height=size, width=size, spacing_mm=0.1, synthetic=False, source=f"fixture:{center}:{i}",
                         sha256=hashlib.sha256(image).hexdigest(), age=float(40 + i % 30),
                         lesion_size_mm=float(8 + i % 20), birads="4c" if label else "4a"))
    return _table(rows)


def _two_modality_dataset(root, n_us: int = 24, n_doppler: int = 16, size: int = 32, seed: int = 0) -> ImageDataset:
    ds = ImageDataset(root)
    for center in TWO_MODALITY_CENTERS:
        ds.write_center(center, _two_modality_rows(center, n_us, n_doppler, size, seed))
    return ds


def _two_modality_splits(ds: ImageDataset) -> pd.DataFrame:
    from diffkd.data.splits import make_splits

    return make_splits(ds.metadata().to_pandas(), external=["C"], val_fraction=0.3, seed=0)


@pytest.fixture(scope="session")
def two_modality_dataset():
    """Factory: (root, n_us=24, n_doppler=16, size=32, seed=0) -> centers A, B, C in B-mode and Doppler."""
    return _two_modality_dataset


@pytest.fixture(scope="session")
def two_modality_rows():
    """Factory: (center, n_us, n_doppler, size, seed) -> rows of one center."""
    return _two_modality_rows


@pytest.fixture(scope="session")
def two_modality_splits():
    """Factory: dataset -> its splits table (C external, 30% internal validation)."""
    return _two_modality_splits


# ---- tiny diffusion datasets (diffusion, synth) -------------------------------------------------

# Images say their center and label plainly: center A has a dark background, center B a bright one;
# label 1 carries a bright disc, label 0 a dark square. Each row is its own patient with its own noise,
# so no two images are equal.

TINY_BACKGROUND = {"A": 0.25, "B": 0.65}
TINY_NEW_CENTER_BACKGROUND = {"C": 0.45}  # a center added after the generator was trained


def _draw_tiny(center: str, label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    cy, cx = 0.5 + rng.uniform(-0.1, 0.1, 2)
    image = np.full((size, size), {**TINY_BACKGROUND, **TINY_NEW_CENTER_BACKGROUND}[center])
    if label:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 0.2 ** 2] = 0.95
    else:
        image[(abs(yy - cy) < 0.18) & (abs(xx - cx) < 0.18)] = 0.05
    image += rng.normal(0, 0.04, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _tiny_rows(center: str, n: int, size: int = 32, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng([seed, ord(center)])
    rows = []
    for i in range(n):
        label = i % 2
        image = _png(_draw_tiny(center, label, rng, size))
        rows.append(dict(case_id=f"{center}-{i:03d}", patient_id=f"p-{center}-{i:03d}", center=center, modality="us",
                         label=label, image=image, mask=None, height=size, width=size, spacing_mm=0.1,
                         synthetic=False, source=f"fixture:{center}:{i}", sha256=hashlib.sha256(image).hexdigest(),
                         age=float(40 + 2 * i % 40), lesion_size_mm=float(8 + i % 20),
                         birads="4c" if label else "4a", palpable=bool(i % 3 == 0)))
    return _table(rows)


def _tiny_dataset(root, per_center: int = 24, size: int = 32) -> ImageDataset:
    ds = ImageDataset(root)
    for center in TINY_BACKGROUND:
        ds.write_center(center, _tiny_rows(center, per_center, size))
    return ds


@pytest.fixture(scope="session")
def tiny_dataset():
    """Factory: (root, per_center=24, size=32) -> centers A (dark) and B (bright)."""
    return _tiny_dataset


@pytest.fixture(scope="session")
def tiny_rows():
    """Factory: (center, n, size=32, seed=0) -> rows of one center (A, B, or C added later)."""
    return _tiny_rows
