"""Where a command's output goes: diffkd's own lines on the console, everything else in OUT/logs/.

A `diffkd run` drives Ray, Ray Data, DeepSpeed, Parquet readers and torch, each with its own log
lines, warnings and progress bars, printed by this process (Python and C++) and by Ray workers
(forwarded to this process's stdout and stderr). `capture(logs_dir)` redirects the process's file
descriptors 1 and 2 into `logs_dir/<stage>.log`, so all of that lands in the stage's log file whatever
wrote it; the console keeps a duplicate of the original stdout and receives only:

- diffkd's log records (INFO and above; warnings once each, as "warning: ...");
- lines that Ray workers mark for it: epoch lines and heartbeats of the training loop
  (`diffkd.train.progress`) and diffkd's warnings raised inside workers. A worker marks a line by
  starting it with `WORKER_TAG` (or `WORKER_STATUS_TAG` for a heartbeat that a terminal redraws in
  place); the driver strips the tag, shows the line, and keeps it in the log file too.

`-v` (verbose) keeps every library's output on the console as before; the log files then receive
diffkd's log records only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator, TextIO

WORKER_TAG = "[diffkd] "  # a worker's line meant for the console
WORKER_STATUS_TAG = "[diffkd status] "  # the same, a transient status (a terminal redraws it in place)
RAY_PRINT_HANDLER = "ray_print_logs"  # the name Ray's driver gives its worker-output printer
RAY_COLOR_ENV = "RAY_COLOR_PREFIX"  # "0": Ray prefixes worker lines without terminal colour codes

_lock = threading.RLock()
_active: "Console | None" = None


class Console:
    """The terminal (or pipe) a user watches. Permanent lines, plus one redrawable status line on a TTY."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.is_tty = stream.isatty()
        self._status_shown = False
        self._warned: set[str] = set()

    def line(self, text: str) -> None:
        with _lock:
            self._clear_status()
            self.stream.write(text + "\n")
            self.stream.flush()

    def status(self, text: str) -> None:
        """A heartbeat: redrawn in place on a terminal, a plain line in a pipe or file."""
        if not self.is_tty:
            self.line(text)
            return
        with _lock:
            width = os.get_terminal_size(self.stream.fileno()).columns if self.is_tty else 200
            self.stream.write("\r\x1b[K" + text[: max(20, width - 1)])
            self.stream.flush()
            self._status_shown = True

    def warning_once(self, text: str) -> None:
        with _lock:
            if text in self._warned:
                return
            self._warned.add(text)
        self.line(f"warning: {text}")

    def _clear_status(self) -> None:
        if self._status_shown:
            self.stream.write("\r\x1b[K")
            self._status_shown = False


class ConsoleHandler(logging.Handler):
    """diffkd's log records as plain lines: INFO as the message, warnings once each, errors as 'error: '."""

    def __init__(self, console: Console, level: int = logging.INFO):
        super().__init__(level)
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                self.console.line(f"error: {text}")
            elif record.levelno >= logging.WARNING:
                self.console.warning_once(text)
            else:
                self.console.line(text)
        except Exception:  # a console that cannot be written must not end the run
            self.handleError(record)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a captured run points file descriptor 2 at a log)."""

    def __init__(self, level: int = logging.NOTSET):
        super().__init__()
        self.setLevel(level)
        self.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # logging.StreamHandler assigns it; sys.stderr is always read anew
        pass


def configure(verbose: bool = False, stream: TextIO | None = None) -> Console | None:
    """Logging for a command. Default: diffkd's records as plain lines on the console (`stream`,
    default stdout), other libraries' warnings on stderr. Verbose: every record, DEBUG and up, on
    stderr in full format, as the libraries themselves would print them.

    Idempotent (`diffkd demo` runs several commands in one process). Python warnings become log
    records of `py.warnings`, so a captured run files them with the rest.
    """
    global _active
    diffkd_log, root = logging.getLogger("diffkd"), logging.getLogger()
    for logger in (diffkd_log, root):
        for handler in [h for h in logger.handlers if isinstance(h, (ConsoleHandler, _StderrHandler))]:
            logger.removeHandler(handler)
    root.addHandler(_StderrHandler())
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.captureWarnings(True)
    if verbose:
        diffkd_log.setLevel(logging.DEBUG)
        diffkd_log.propagate = True
        _active = None
    else:
        _active = Console(stream or sys.stdout)
        diffkd_log.addHandler(ConsoleHandler(_active))
        diffkd_log.setLevel(logging.INFO)
        diffkd_log.propagate = False  # shown once, plainly, by the console handler
    return _active


def active() -> Console | None:
    """The console diffkd's lines go to; None in verbose mode (everything is printed as it comes)."""
    return _active


# ---- capturing a run's output into per-stage log files ---------------------------------------------------

class _Capture:
    def __init__(self, logs_dir: Path, verbose: bool):
        self.logs_dir = logs_dir
        self.verbose = verbose
        self.saved_fds: tuple[int, int] | None = None  # the original stdout and stderr
        self.current: str | None = None
        self.record_handler: logging.Handler | None = None  # diffkd's records, in full, into the stage log


_capture: _Capture | None = None


@contextlib.contextmanager
def capture(logs_dir: str | os.PathLike, verbose: bool = False) -> Iterator[Console | None]:
    """Send this process's stdout and stderr (and its Ray workers' forwarded output) to
    `logs_dir/<stage>.log` while the block runs; the console keeps only diffkd's lines.

    `verbose` leaves stdout and stderr alone (everything stays on the console) and writes diffkd's
    log records to the stage files.
    """
    global _capture
    logs = Path(logs_dir)
    logs.mkdir(parents=True, exist_ok=True)
    state = _Capture(logs, verbose)
    console = active()
    previous_stream = console.stream if console is not None else None
    colors = os.environ.get(RAY_COLOR_ENV)
    if not verbose:
        os.environ.setdefault(RAY_COLOR_ENV, "0")  # plain text in the log files (read as Ray prints)
        _flush_std()
        state.saved_fds = (os.dup(1), os.dup(2))
        console = configure(verbose=False, stream=open(os.dup(state.saved_fds[0]), "w", buffering=1,
                                                        encoding="utf-8", errors="replace"))
        logging.getLogger("diffkd").setLevel(logging.DEBUG)  # the logs get diffkd's details; the console INFO up
    _capture = state
    try:
        switch_stage("run")
        attach_ray_workers()
        yield console
    finally:
        _flush_std()
        if state.record_handler is not None:
            logging.getLogger("diffkd").removeHandler(state.record_handler)
            state.record_handler.close()
        if state.saved_fds is not None:
            for saved, fd in zip(state.saved_fds, (1, 2)):
                os.dup2(saved, fd)
                os.close(saved)
            console.stream.close()
            configure(verbose=False, stream=previous_stream)
        _capture = None
        if colors is None:
            os.environ.pop(RAY_COLOR_ENV, None)
        attach_ray_workers()  # worker lines print as Ray prints them again


def log_path(stage: str) -> Path | None:
    """The log file a captured run writes `stage`'s output to; None when nothing is captured."""
    return _capture.logs_dir / f"{stage}.log" if _capture is not None else None


def switch_stage(stage: str) -> None:
    """Point the captured output at `logs/<stage>.log` (appending: a resumed stage keeps its history)."""
    state = _capture
    if state is None or state.current == stage:
        return
    path = state.logs_dir / f"{stage}.log"
    _flush_std()
    diffkd_log = logging.getLogger("diffkd")
    if state.record_handler is not None:
        diffkd_log.removeHandler(state.record_handler)
        state.record_handler.close()
    if state.verbose:  # the terminal shows everything; the file gets diffkd's records
        state.record_handler = logging.FileHandler(path, encoding="utf-8")
        state.record_handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        state.record_handler = _StderrHandler()  # fd 2 is the stage's log now
    diffkd_log.addHandler(state.record_handler)
    state.current = stage


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Output of the block goes to `logs/<name>.log` (when captured); then back to the previous file.

    Off the main thread (stages running at once) the process's output cannot be split by stage: it
    stays in the current file, and `logs/<name>.log` receives diffkd's records of this thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        with _thread_records(name):
            yield
        return
    previous = _capture.current if _capture is not None else None
    switch_stage(name)
    try:
        yield
    finally:
        if previous is not None:
            switch_stage(previous)


@contextlib.contextmanager
def _thread_records(stage_name: str) -> Iterator[None]:
    path = log_path(stage_name)
    if path is None:
        yield
        return
    thread = threading.get_ident()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(lambda record: record.thread == thread)
    diffkd_log = logging.getLogger("diffkd")
    diffkd_log.addHandler(handler)
    try:
        yield
    finally:
        diffkd_log.removeHandler(handler)
        handler.close()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# ---- Ray workers' forwarded output ------------------------------------------------------------------------

def split_worker_lines(lines: list[str]) -> tuple[list[str], list[tuple[str, bool]]]:
    """Lines of a worker's output batch -> (all lines with tags stripped, [(console line, transient)])."""
    kept, shown = [], []
    for line in lines:
        if line.startswith(WORKER_STATUS_TAG):
            text = line[len(WORKER_STATUS_TAG):]
            shown.append((text, True))
        elif line.startswith(WORKER_TAG):
            text = line[len(WORKER_TAG):]
            shown.append((text, False))
        else:
            text = line
        kept.append(text)
    return kept, shown


def attach_ray_workers() -> None:
    """Route Ray workers' tagged lines to the console, the rest (tags stripped) to Ray's own printer.

    Ray's driver hands every batch of forwarded worker output to the handlers of its
    `global_worker_stdstream_dispatcher`; its printer ("ray_print_logs") writes them to sys.stdout or
    sys.stderr, which a captured run points at the stage's log. Called after `ray.init` (raycompat)
    and when a capture starts; a no-op without a console or a connected Ray, and idempotent.
    """
    console = _active
    if "ray" not in sys.modules:
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without the dispatcher: tagged lines stay in the log with their tags
        return
    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    original = next((h for n, h in handlers if n == RAY_PRINT_HANDLER), None)
    if original is None or (hasattr(original, "_diffkd_inner") and original._diffkd_console is console):
        return
    inner = getattr(original, "_diffkd_inner", original)

    def route(data: dict, inner: Callable = inner, console: Console | None = console) -> None:
        kept, shown = split_worker_lines(list(data.get("lines", ())))
        if console is not None:  # verbose: Ray prints them (tags stripped) with everything else
            for text, transient in shown:
                (console.status if transient else console.line)(text)
        inner({**data, "lines": kept})

    route._diffkd_console = console  # type: ignore[attr-defined]
    route._diffkd_inner = inner  # type: ignore[attr-defined]
    dispatcher.remove_handler(RAY_PRINT_HANDLER)
    dispatcher.add_handler(RAY_PRINT_HANDLER, route)


def worker_line(text: str, transient: bool = False) -> str:
    """`text` marked for the driver's console (see the module docstring)."""
    return (WORKER_STATUS_TAG if transient else WORKER_TAG) + text


class WorkerWarningHandler(logging.Handler):
    """In a Ray worker: diffkd's warnings as tagged stdout lines, so the driver's console shows them."""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "error: " if record.levelno >= logging.ERROR else "warning: "
            sys.stdout.write(worker_line(prefix + record.getMessage()) + "\n")
            sys.stdout.flush()
        except Exception:
            self.handleError(record)


def configure_worker() -> None:
    """Logging inside a Ray worker of a diffkd run: diffkd's records in the worker's log (forwarded to
    the stage's log file), its warnings also on the driver's console."""
    diffkd_log = logging.getLogger("diffkd")
    if any(isinstance(h, WorkerWarningHandler) for h in diffkd_log.handlers):
        return
    full = logging.StreamHandler(sys.stderr)
    full.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    diffkd_log.addHandler(full)
    diffkd_log.addHandler(WorkerWarningHandler())
    diffkd_log.setLevel(logging.INFO)
    diffkd_log.propagate = False
