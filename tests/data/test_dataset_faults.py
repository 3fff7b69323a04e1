"""A dataset survives a failure or a crash at every filesystem step of an ingest, a replace and a
synthetic write: reopened, it reads as before or as after, never neither, and the next write succeeds
and leaves no stray file behind."""
from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pytest
from PIL import Image

from diffkd.data.dataset import MANIFEST, ImageDataset, partitioning
from diffkd.data.ingest import ingest

SALT = bytes(range(32))


def _source(root: Path, prefix: str, seed: int, n: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = root / ("DCIS" if i % 2 else "upgrade") / f"{prefix}{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8)).save(path)
    return root


def state(ds_path: Path) -> dict[str, list[str]]:
    """What a reader sees: each center's images (by sha256), real and synthetic."""
    ds = ImageDataset(ds_path)
    out = {}
    for synthetic in (False, True):
        table = ds.read_table(synthetic=synthetic, columns=["center", "sha256"]).to_pylist()
        for row in table:
            out.setdefault(f"{'syn:' if synthetic else ''}{row['center']}", []).append(row["sha256"])
    return {k: sorted(v) for k, v in out.items()}


def assert_tidy(ds_path: Path) -> None:
    """Only the manifest and the files it names; a plain directory read returns the manifest's rows."""
    ds = ImageDataset(ds_path)
    named = {os.path.abspath(p) for s in (False, True) for p in ds.files(synthetic=s)}
    on_disk = {str(p) for p in ds_path.rglob("*") if p.is_file()} - {str(ds_path / MANIFEST)}
    assert on_disk == named
    assert not [p for p in ds_path.parent.iterdir() if ".staging-" in p.name or ".retired-" in p.name]
    plain = pds.dataset(str(ds_path), format="parquet", partitioning=partitioning()).count_rows()
    assert plain == sum(e["rows"] for e in ds.manifest["centers"].values())


OPERATIONS = {
    "ingest a new center": lambda w, ds: ingest(w / "b", "B", ds, salt=SALT),
    "replace a center": lambda w, ds: ingest(w / "a2", "A", ds, salt=SALT, replace=True),
    "add a synthetic run": lambda w, ds: ImageDataset(ds).write_synthetic("A", _as_synthetic(ds), run_id="r1"),
    "delete synthetic runs": lambda w, ds: ImageDataset(ds).delete_synthetic(),
}


def _as_synthetic(ds) -> pa.Table:
    table = ImageDataset(ds).read_table(["A"])
    return table.set_column(table.schema.get_field_index("synthetic"), "synthetic", pa.array([True] * len(table)))


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    _source(work / "a", "a", 0)
    _source(work / "a2", "a2_", 1)
    _source(work / "b", "b", 2)
    ingest(work / "a", "A", work / "before" / "ds", salt=SALT)
    # a template with one synthetic run, for the deletion
    shutil.copytree(work / "before", work / "with-synthetic")
    OPERATIONS["add a synthetic run"](work, work / "with-synthetic" / "ds")
    return work


def _fresh(template: Path, tmp_path: Path, name: str = "") -> Path:
    shutil.copytree(template / ("with-synthetic" if name.startswith("delete") else "before"), tmp_path / "d")
    return tmp_path / "d" / "ds"


def _expected(template, tmp_path, name):
    ds = _fresh(template, tmp_path / "expected", name)
    before = state(ds)
    OPERATIONS[name](template, ds)
    return before, state(ds)


@pytest.mark.parametrize("name", OPERATIONS)
@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_failure_at_every_step_leaves_the_old_or_the_new_dataset(template, tmp_path, fault_injector, name, error):
    before, after = _expected(template, tmp_path, name)
    assert before != after
    steps = _count_steps(template, tmp_path, name, fault_injector)
    assert steps >= 8, fault_injector.calls
    outcomes = {"before": 0, "after": 0}
    for k in range(steps):
        ds = _fresh(template, tmp_path / f"k{k}", name)
        fault_injector.install(at=k, error=error)
        try:
            OPERATIONS[name](template, ds)
        except OSError as err:
            assert err.errno == error
        finally:
            fault_injector.remove()
        outcomes[_recovered(template, ds, name, before, after, f"step {k} ({fault_injector.calls[k]})")] += 1
    assert outcomes["before"] and outcomes["after"]
    print(f"FAULTS {name} {os.strerror(error)}: {steps} steps, {outcomes}")


def _count_steps(template: Path, tmp_path: Path, name: str, injector) -> int:
    """Filesystem steps the operation takes undisturbed (the injector records them)."""
    probe = _fresh(template, tmp_path / "probe", name)
    injector.install()
    OPERATIONS[name](template, probe)
    injector.remove()
    return len(injector.calls)


def _recovered(template: Path, ds: Path, name: str, before, after, where: str) -> str:
    """After an interrupted write: the dataset reads as `before` or `after` (which one is returned), and
    the next writes bring it to exactly `after` with nothing stray left."""
    seen = state(ds)
    assert seen in (before, after), f"{where}: the dataset reads neither"
    _next_writes(template, ds, name, seen == before)
    assert state(ds) == after  # the same dataset as an undisturbed write gives
    assert_tidy(ds)
    return "before" if seen == before else "after"


def _next_writes(template: Path, ds: Path, name: str, again: bool) -> None:
    """The write again where it did not happen, then an ingest that changes nothing (re-ingesting A):
    both succeed, and the ingest clears whatever the interrupted write left."""
    if again:
        OPERATIONS[name](template, ds)
    report = ingest(template / ("a2" if name == "replace a center" else "a"), "A", ds, salt=SALT)
    assert not report.written and report.already_present == 3


def _run_killed_at(k: int, template: Path, ds: Path, name: str, injector) -> int:
    pid = os.fork()
    if pid == 0:  # the child: crash (no cleanup of any kind) at step k
        try:
            injector.install(at=k, kill=True)
            OPERATIONS[name](template, ds)
            os._exit(0)
        except BaseException:
            os._exit(1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    raise AssertionError(f"the child killed at step {k} hung")


@pytest.mark.parametrize("name", ["ingest a new center", "replace a center"])
def test_a_crash_at_every_step_leaves_the_old_or_the_new_dataset(template, tmp_path, fault_injector, name):
    before, after = _expected(template, tmp_path, name)
    steps = _count_steps(template, tmp_path, name, fault_injector)
    outcomes = {"before": 0, "after": 0}
    for k in range(steps):
        ds = _fresh(template, tmp_path / f"k{k}", name)
        assert _run_killed_at(k, template, ds, name, fault_injector) == 75
        outcomes[_recovered(template, ds, name, before, after, f"killed at step {k}")] += 1
    assert outcomes["before"] and outcomes["after"]
    print(f"CRASHES {name}: {steps} steps, {outcomes}")


def test_a_partition_an_earlier_diffkd_had_renamed_away_is_restored(template, tmp_path):
    """The old writer renamed the center's folder to `.retired-*` before the manifest switch; a failed
    switch left a manifest naming a file that was no longer in place. The next write restores it."""
    ds = _fresh(template, tmp_path)
    before = state(ds)
    (ds / "center=A").rename(ds / ".retired-0badc0de")
    ingest(template / "b", "B", ds, salt=SALT)
    assert state(ds)["A"] == before["A"] and "B" in state(ds)
    assert_tidy(ds)


def test_an_object_store_dataset_is_written_from_one_machine(tmp_path, monkeypatch):
    """No locks on object stores: the first writer's host is recorded and another host's write refused
    until the role is taken over explicitly. (A SubTreeFileSystem stands in for s3://: not local.)"""
    import socket

    import pyarrow.fs as pafs

    from diffkd.data.dataset import DatasetError

    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    table = ImageDataset(_fresh_local_copy(tmp_path)).read_table()
    ds = ImageDataset("ds", filesystem=store)
    ds.write_center("A", table)
    assert (tmp_path / "ds" / "_writer.json").exists() and state_of(ds) == sorted(table.column("sha256").to_pylist())
    monkeypatch.setattr(socket, "gethostname", lambda: "another-machine")
    with pytest.raises(DatasetError, match="written from .* only.*DIFFKD_DATASET_WRITER=take-over"):
        ds.write_center("A", table.slice(0, 2))
    assert state_of(ds) == sorted(table.column("sha256").to_pylist())  # nothing changed
    monkeypatch.setenv("DIFFKD_DATASET_WRITER", "take-over")
    ds.write_center("A", table.slice(0, 2))
    assert len(state_of(ds)) == 2 and len(list((tmp_path / "ds" / "center=A").iterdir())) == 1


def _fresh_local_copy(tmp_path):
    work = tmp_path / "src-data"
    _source(work / "a", "a", 0)
    ingest(work / "a", "A", work / "ds", salt=SALT)
    return work / "ds"


def state_of(ds: ImageDataset) -> list[str]:
    return sorted(ds.read_table(columns=["sha256"]).column("sha256").to_pylist())
