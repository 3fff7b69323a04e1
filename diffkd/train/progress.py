"""Progress lines a user sees while a stage trains: one per epoch, and a heartbeat inside long epochs.

Rank 0 of the training job prints them; Ray forwards worker output to the driver as it happens,
and the lines carry `diffkd.runtime.console`'s tag so that the driver shows them on its console (heartbeats
as a status line a terminal redraws in place) while other worker output goes to the stage's log.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from diffkd.runtime.console import worker_line


# bookkeeping, in the history only
_NOT_SHOWN = ("epoch", "samples_per_s", "global_step", "lr", "train_cpu_s", "train_s", "data_wait_s", "first_batch_s",
              "started_at", "selection_score", "val_auc_se", "val_s", "startup_s")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def bar(fraction: float, width: int = 20) -> str:
    """A text progress bar: `[#######.............]`."""
    done = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * done + "." * (width - done) + "]"


def _format_value(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


class Progress:
    """Per-epoch lines (loss, validation metrics, samples/s, time left) and heartbeats every `interval_s`."""

    def __init__(self, stage: str, total_epochs: int, batches_per_epoch: int | None = None,
                 interval_s: float = 30.0, out: TextIO | None = None):
        self.stage = stage
        self.total_epochs = total_epochs
        self.batches_per_epoch = batches_per_epoch
        self.interval_s = interval_s
        self.out = out or sys.stdout
        self._epoch_seconds: list[float] = []
        self._epoch = 0
        self._epoch_start = self._last_beat = time.monotonic()
        self._batches = self._samples = 0
        self._loss_sum = 0.0

    def start_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._epoch_start = self._last_beat = time.monotonic()
        self._batches = self._samples = 0
        self._loss_sum = 0.0

    def step(self, num_samples: int, loss: float) -> None:
        """Count a batch of this worker; prints a heartbeat when `interval_s` passed since the last line."""
        self._batches += 1
        self._samples += num_samples
        self._loss_sum += loss
        now = time.monotonic()
        if now - self._last_beat >= self.interval_s:
            self._last_beat = now
            self._print(self.heartbeat_line(now - self._epoch_start), transient=True)

    def heartbeat_line(self, elapsed: float) -> str:
        rate = self._samples / elapsed if elapsed > 0 else 0.0
        steps = f"step {self._batches}"
        left = ""
        if self.batches_per_epoch:
            steps = f"{bar(self._batches / self.batches_per_epoch)} {steps}/{self.batches_per_epoch}"
            remaining = max(0, self.batches_per_epoch - self._batches) * elapsed / max(1, self._batches)
            left = f"  epoch ends in {format_duration(remaining)}"
        loss = self._loss_sum / max(1, self._batches)
        return (f"[{self.stage}] epoch {self._epoch}/{self.total_epochs}  {steps}  loss {_format_value(loss)}"
                f"  {rate:.1f} samples/s per worker{left}")

    def end_epoch(self, metrics: dict[str, float], improved: bool, objective: str) -> str:
        """Print and return the epoch line; `metrics` holds loss, samples_per_s and validation metrics."""
        self._epoch_seconds.append(time.monotonic() - self._epoch_start)
        parts = [f"[{self.stage}] epoch {self._epoch}/{self.total_epochs}"]
        for key in sorted(metrics, key=lambda k: (k != "loss", not k.startswith("val_"), k)):
            if key in _NOT_SHOWN or not isinstance(metrics[key], (int, float)):
                continue
            mark = "*" if improved and key == objective else ""
            parts.append(f"{key} {_format_value(float(metrics[key]))}{mark}")
        if "samples_per_s" in metrics:
            parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
        mean_epoch = sum(self._epoch_seconds) / len(self._epoch_seconds)
        parts.append(f"epoch {format_duration(self._epoch_seconds[-1])}")
        parts.append(f"ETA {format_duration(mean_epoch * (self.total_epochs - self._epoch))}")
        line = "  ".join(parts)
        self._print(line)
        return line

    def message(self, text: str) -> None:
        self._print(f"[{self.stage}] {text}")

    def _print(self, line: str, transient: bool = False) -> None:
        # Written, not print()ed: Ray Train patches print() into its logger, which would echo it twice.
        self.out.write(worker_line(line, transient) + "\n")
        self.out.flush()
