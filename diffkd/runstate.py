"""Which stages of a `diffkd run` have finished, so that rerunning the same command resumes.

`OUT/run_state.json` records, per finished stage, its outputs (paths, small JSON results) and how
long it took. A stage is skipped when it is recorded as done with the same config fingerprint;
changing a stage's config section re-runs that stage and everything after it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from diffkd.files import atomic_write_json

STATE_FILE = "run_state.json"


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class RunState:
    out: Path
    stages: dict[str, dict] = field(default_factory=dict)
    _invalidated: bool = False  # once a stage re-runs, every later stage re-runs too

    @classmethod
    def load(cls, out: str | os.PathLike) -> "RunState":
        out = Path(out)
        path = out / STATE_FILE
        if not path.exists():
            return cls(out)
        try:
            stages = json.loads(path.read_text())["stages"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path} is damaged ({err}); delete it to rerun every stage") from err
        return cls(out, stages)

    def run(self, name: str, config: Any, fn: Callable[[], dict], log: Callable[[str], None] = print) -> dict:
        """Run stage `name` unless it already finished with the same config; return its recorded result."""
        key = fingerprint(config)
        done = self.stages.get(name)
        if done and done["config"] == key and not self._invalidated:
            log(f"[{name}] already done in {done['seconds']:.0f} s (run_state.json) - skipping")
            return done["result"]
        self._invalidated = True
        log(f"[{name}] starting")
        started = time.monotonic()
        result = fn()
        seconds = time.monotonic() - started
        self.stages[name] = {"config": key, "result": result, "seconds": seconds,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self._save()
        log(f"[{name}] done in {seconds:.0f} s")
        return result

    def _save(self) -> None:
        atomic_write_json(self.out / STATE_FILE, {"stages": self.stages})
