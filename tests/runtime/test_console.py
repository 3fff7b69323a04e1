"""The console shows diffkd's lines; everything else a run prints lands in OUT/logs/<stage>.log."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

from diffkd.runtime import console

ROOT = Path(__file__).resolve().parents[2]


def test_worker_lines_marked_for_the_console_are_picked_and_untagged():
    kept, shown = console.split_worker_lines([
        console.worker_line("[teacher] epoch 1/2  loss 0.6"), "Setting accelerator to CPU",
        console.worker_line("[teacher] epoch 1/2  step 3/9", transient=True)])
    assert kept == ["[teacher] epoch 1/2  loss 0.6", "Setting accelerator to CPU", "[teacher] epoch 1/2  step 3/9"]
    assert shown == [("[teacher] epoch 1/2  loss 0.6", False), ("[teacher] epoch 1/2  step 3/9", True)]


def test_ray_worker_output_is_split_between_the_console_and_rays_printer(monkeypatch):
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    monkeypatch.setattr(dispatcher, "handlers", [(console.RAY_PRINT_HANDLER, printed.append)])
    screen = io.StringIO()
    monkeypatch.setattr(console, "_active", console.Console(screen))
    console.attach_ray_workers()
    console.attach_ray_workers()  # idempotent: one wrapper, not two
    assert len(dispatcher.handlers) == 1
    dispatcher.emit({"lines": ["[2026] [WARNING] Setting accelerator to CPU",
                               console.worker_line("[student] epoch 2/3  val_auc 0.71")], "is_err": False})
    assert screen.getvalue() == "[student] epoch 2/3  val_auc 0.71\n"
    assert printed[0]["lines"] == ["[2026] [WARNING] Setting accelerator to CPU", "[student] epoch 2/3  val_auc 0.71"]


def test_warnings_are_shown_once_and_a_terminal_redraws_status_lines():
    screen = io.StringIO()
    shown = console.Console(screen)
    shown.warning_once("the search stopped early")
    shown.warning_once("the search stopped early")
    shown.status("[teacher] epoch 1/2  step 3/9")  # not a terminal: a plain line
    assert screen.getvalue() == "warning: the search stopped early\n[teacher] epoch 1/2  step 3/9\n"


CAPTURED_RUN = textwrap.dedent("""
    import logging, os, sys, warnings
    from diffkd.runtime import console

    verbose = sys.argv[2:] == ["-v"]
    console.configure(verbose=verbose)
    log = logging.getLogger("diffkd.run")
    with console.capture(sys.argv[1], verbose=verbose):
        log.info("[teacher] starting")
        with console.stage("teacher"):
            print("Parquet dataset sampling: 100%")            # a library's print
            os.write(2, b"E core_worker.cc: PreemptionWatcher\\n")  # C++ writing to the file descriptor
            logging.getLogger("ray.data").warning("Progress bars disabled")
            warnings.warn("RayDeprecationWarning: exclude_resources", DeprecationWarning)
            log.warning("the best checkpoint is gone")
            log.warning("the best checkpoint is gone")
            log.debug("caching 28 rows")
        log.info("[teacher] done")
    print("final table")
""")


def test_a_captured_run_files_library_output_per_stage_and_shows_diffkd_lines(tmp_path):
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-c", CAPTURED_RUN, str(logs)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[teacher] starting", "warning: the best checkpoint is gone",
                                        "[teacher] done", "final table"]
    assert proc.stderr == ""
    teacher = (logs / "teacher.log").read_text()
    for line in ("Parquet dataset sampling", "PreemptionWatcher", "Progress bars disabled", "RayDeprecationWarning",
                 "WARNING diffkd.run: the best checkpoint is gone", "DEBUG diffkd.run: caching 28 rows"):
        assert line in teacher
    run = (logs / "run.log").read_text()
    assert "INFO diffkd.run: [teacher] starting" in run and "[teacher] done" in run
    assert "Parquet" not in run


def test_training_progress_lines_are_marked_for_the_console():
    from diffkd.train.progress import Progress

    written = io.StringIO()
    progress = Progress("teacher", total_epochs=2, batches_per_epoch=4, interval_s=0.0, out=written)
    progress.start_epoch(1)
    progress.step(8, 0.7)  # interval 0: a heartbeat at every step
    progress.end_epoch({"loss": 0.7, "val_auc": 0.61, "samples_per_s": 40.0}, improved=True, objective="val_auc")
    kept, shown = console.split_worker_lines(written.getvalue().splitlines())
    (heartbeat, transient), (epoch, permanent) = shown
    assert transient and heartbeat.startswith("[teacher] epoch 1/2  [#####...............] step 1/4  loss 0.7000")
    assert not permanent and epoch.startswith("[teacher] epoch 1/2  loss 0.7000  val_auc 0.6100*")
    assert "40.0 samples/s" in epoch and "ETA" in epoch


def test_verbose_keeps_everything_on_the_console_and_diffkd_records_in_the_log(tmp_path):
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-c", CAPTURED_RUN, str(logs), "-v"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "Parquet dataset sampling" in proc.stdout and "PreemptionWatcher" in proc.stderr
    assert "Progress bars disabled" in proc.stderr and "the best checkpoint is gone" in proc.stderr
    teacher = (logs / "teacher.log").read_text()
    assert "WARNING diffkd.run: the best checkpoint is gone" in teacher and "Parquet" not in teacher
