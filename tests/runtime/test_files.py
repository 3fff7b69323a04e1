"""diffkd.runtime.files: a file or a folder of files is replaced whole, whatever step fails or crashes."""
from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from diffkd.runtime.files import atomic_write_bytes, atomic_write_json, recover_directory, replace_directory, staged_directory


def _folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _write_version(target: Path, version: str) -> None:
    with staged_directory(target) as stage:
        (stage / "index.html").write_text(version)
        (stage / "sub").mkdir()
        (stage / "sub" / "data.bin").write_bytes(version.encode() * 100)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_a_failure_at_every_step_leaves_the_old_or_the_new_folder(tmp_path, fault_injector, error):
    target = tmp_path / "out" / "report"
    _write_version(target, "old")
    old = _folder(target)
    fault_injector.install()
    _write_version(tmp_path / "probe" / "report", "new")
    steps = len(fault_injector.calls)
    fault_injector.remove()
    outcomes = {"old": 0, "new": 0}
    for k in range(steps):
        _write_version(target, "old")
        fault_injector.install(at=k, error=error)
        try:
            _write_version(target, "new")
        except OSError as err:
            assert err.errno == error
        finally:
            fault_injector.remove()
        seen = _folder(target)
        assert seen in (old, _folder(tmp_path / "probe" / "report")), f"step {k}: a mix"
        outcomes["old" if seen == old else "new"] += 1
        assert sorted(os.listdir(target.parent)) == ["report"], f"step {k}: leftovers"
    assert outcomes["old"] and outcomes["new"]
    print(f"FOLDER FAULTS {os.strerror(error)}: {steps} steps, {outcomes}")


def test_a_crash_between_the_two_renames_is_finished_by_the_next_write(tmp_path):
    """Where the atomic swap is not available: the target renamed away, the staging folder not yet in."""
    target = tmp_path / "report"
    _write_version(target, "old")
    target.rename(tmp_path / ".report.retired-1234abcd")
    (tmp_path / ".report.staging-5678abcd").mkdir()
    recover_directory(target)
    assert (target / "index.html").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["report"]


def test_a_crash_at_every_step_of_a_folder_switch(tmp_path, fault_injector):
    target = tmp_path / "out" / "report"
    fault_injector.install()
    _write_version(tmp_path / "probe" / "report", "new")
    steps = len(fault_injector.calls)
    fault_injector.remove()
    for k in range(steps):
        _write_version(target, "old")
        pid = os.fork()
        if pid == 0:
            fault_injector.install(at=k, kill=True)
            _write_version(target, "new")
            os._exit(0)
        deadline = time.monotonic() + 30
        while not (done := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
            time.sleep(0.005)
        assert done[0], f"step {k}: the child hung"
        recover_directory(target)  # what the next write does first
        assert (target / "index.html").read_text() in ("old", "new")
        assert sorted(os.listdir(target.parent)) == ["report"]
    print(f"FOLDER CRASHES: {steps} steps")


def test_atomic_write_leaves_the_old_file_when_a_step_fails(tmp_path, fault_injector):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"v": 1})
    fault_injector.install()
    atomic_write_bytes(tmp_path / "probe", b"x")
    steps = len(fault_injector.calls)
    fault_injector.remove()
    assert [c.split()[0] for c in fault_injector.calls] == ["mkdir", "open", "fsync", "replace", "open", "fsync"]
    for k in range(steps):
        fault_injector.install(at=k)
        try:
            atomic_write_json(path, {"v": 2})
        except OSError:
            pass
        finally:
            fault_injector.remove()
        assert path.read_text() in ('{\n  "v": 1\n}', '{\n  "v": 2\n}')
        assert sorted(os.listdir(tmp_path)) == ["metrics.json", "probe"]
        atomic_write_json(path, {"v": 1})


def test_replace_directory_puts_a_folder_where_there_was_none(tmp_path):
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "a").write_text("a")
    replace_directory(tmp_path / "stage", tmp_path / "final")
    assert _folder(tmp_path / "final") == {"a": b"a"} and not (tmp_path / "stage").exists()


def test_a_fingerprint_is_stable_and_order_free():
    from diffkd.runtime.digest import fingerprint

    assert fingerprint({"a": 1, "b": [2, 3]}) == fingerprint({"b": [2, 3], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2}) and len(fingerprint(None)) == 16
