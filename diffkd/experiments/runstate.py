"""Which stages of a `diffkd run` have finished, so that rerunning the same command resumes.

`OUT/run_state.json` records, per finished stage, its outputs (paths, small JSON results), how long it
took, a token naming that completion, and a key: the fingerprint of the stage's config together
with the tokens of the stages it reads (`after`). A stage is skipped when its recorded key equals the key it would run with now; so
changing a stage's config re-runs that stage and the stages that read its outputs, directly or
through others, and nothing else (changing the baselines does not re-run the students).

While a stage runs, a captured run's output goes to OUT/logs/<stage>.log (`diffkd.runtime.console`).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from diffkd.runtime import console
from diffkd.runtime.digest import fingerprint
from diffkd.runtime.files import atomic_write_json
from diffkd.train.progress import format_duration

STATE_FILE = "run_state.json"

log = logging.getLogger(__name__)


def outputs_current(folder: str, info_file: str, outputs: str, key: str) -> bool:
    """True when `folder` holds finished `outputs` made from exactly what `key` (a fingerprint) describes,
    as recorded in its `info_file`: a trial or fold whose inputs changed is trained again."""
    path = os.path.join(folder, info_file)
    if not (os.path.exists(path) and os.path.exists(os.path.join(folder, outputs))):
        return False
    with open(path) as f:
        return json.load(f).get("key") == key


class StageUnavailable(RuntimeError):
    """A stage cannot run because a stage it reads did not finish in this run."""


@dataclass
class RunState:
    out: Path
    stages: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # stage -> why it did not finish, in this run
    # stages may finish in several threads at once (Pipeline.parallel): one records and saves at a time
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

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

    def key(self, config: Any, after: Iterable[str] = ()) -> str:
        """A stage's key: its config and the keys of the finished stages it reads."""
        after = sorted(set(after))
        missing = [name for name in after if name not in self.stages or name in self.failed]
        if missing:
            raise StageUnavailable(f"needs {', '.join(missing)}, which did not finish")
        if not after:
            return fingerprint(config)
        # a stage that re-ran has a new token, even with the same key: its readers re-run too
        return fingerprint({"config": config, "after": {name: _token(self.stages[name]) for name in after}})

    def run(self, name: str, config: Any, fn: Callable[[], dict], after: Iterable[str] = ()) -> dict:
        """Run stage `name` unless it already finished with the same key; return its recorded result.

        `after` names the stages whose outputs `fn` reads; they must have finished (in this run or
        an earlier one) or StageUnavailable is raised without running anything.
        """
        key = self.key(config, after)
        done = self.stages.get(name)
        if done and done["config"] == key:
            log.info("[%s] already done in %s (%s) - skipping", name, _duration(done["seconds"]), STATE_FILE)
            return done["result"]
        with console.stage(name):
            log.info("[%s] starting%s", name, self._log_note(name))
            started = time.monotonic()
            result = fn()
            seconds = time.monotonic() - started
        with self._lock:
            self.stages[name] = {"config": key, "result": result, "seconds": seconds, "token": secrets.token_hex(8),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            self._save()
        log.info("[%s] done in %s", name, _duration(seconds))
        return result

    def try_run(self, name: str, config: Any, fn: Callable[[], dict], after: Iterable[str] = ()) -> dict | None:
        """`run`, but a stage that fails (or cannot run) is recorded in `failed` and returns None, so
        the stages that do not read it still run and the report covers what finished."""
        try:
            return self.run(name, config, fn, after)
        except StageUnavailable as err:
            self.failed[name] = f"not run: it {err}"
            log.warning("[%s] %s", name, self.failed[name])
        except Exception as err:  # noqa: BLE001 - any failure of one stage; KeyboardInterrupt still ends the run
            where = console.log_path(name)
            if where is not None:  # the traceback, where the stage's other output is
                _append_traceback(where, err)
            else:
                log.debug("[%s] failed", name, exc_info=True)
            self.failed[name] = f"failed: {type(err).__name__}: {err}".splitlines()[0]
            log.error("[%s] %s%s", name, self.failed[name], self._log_note(name, "details in "))
        return None

    def _log_note(self, name: str, lead: str = "") -> str:
        where = console.log_path(name)
        if where is None:
            return ""
        return f" ({lead}{os.path.relpath(where, self.out) if where.is_relative_to(self.out) else where})"

    def _save(self) -> None:
        atomic_write_json(self.out / STATE_FILE, {"stages": self.stages})


def _token(record: dict) -> str:
    """What identifies one completion of a stage (records written before tokens: its finish time)."""
    return record.get("token") or record["finished"]


def _append_traceback(path: Path, err: BaseException) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(traceback.format_exception(err)))


def _duration(seconds: float) -> str:
    return format_duration(seconds)
