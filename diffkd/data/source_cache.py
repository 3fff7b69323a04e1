"""Decoded source images shared by every training run of one job, and a count of PNG decodes.

A search, an ablation or `diffkd run` trains many models on the same rows. Each run's pipeline
caches a small split's decoded images in Ray's object store (`pipeline.cache_decision`), but those
objects belong to the process that decoded them (a Tune trial), so every trial decoded the whole set
again. `shared_source_cache()`, opened by the job's driver around its trials, starts a named actor
that decodes the real rows of a set of Parquet files once and owns the result for the rest of the
job: a trial asking for the same files gets the decoded blocks back (borrowed, no copy, no decode)
and picks its own rows out of them by case id and modality. The driver owns the actor, so it and
everything it holds go away when the job ends (or when the context closes).

An entry is every real row of one Parquet file, keyed by the file's path, size and modification
time (a rewritten center is a new entry). A run gets the entries of the centers it reads, so a
search's trials, which read only internal centers, never hold external rows, and leave-one-center-
out folds share every center but their own. The total stays within the budget of the pipeline
asking (`cache_fraction` of the object store or `cache_budget_mb`), least recently used first out;
a run still iterating an evicted entry keeps its blocks alive through its own references.

Decode counting: with `DIFFKD_DECODE_LOG` set to a file path, every process that decodes PNGs
appends one line per decoded batch, `<unix time> <rows> <real|synthetic>`, to that file (one
O_APPEND write each, so concurrent processes never interleave a line); `bench/ablate.py` sums them
per trial. Unset, nothing is written.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Iterator

from diffkd.runtime.digest import fingerprint

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

ACTOR_NAME = "diffkd-shared-source-cache"
DECODE_LOG_ENV = "DIFFKD_DECODE_LOG"


def record_decodes(rows: int, synthetic: bool) -> None:
    """Append `rows` PNG decodes to the decode log named by $DIFFKD_DECODE_LOG (when set)."""
    path = os.environ.get(DECODE_LOG_ENV)
    if not path or not rows:
        return
    line = f"{time.time():.3f} {rows} {'synthetic' if synthetic else 'real'}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_decode_log(path: str) -> list[tuple[float, int, str]]:
    """(time, rows, kind) of every line of a decode log; [] when nothing was decoded."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(float(t), int(n), kind) for t, n, kind in (line.split() for line in f if line.strip())]


def file_keys(dataset, files: list[str]) -> list[str]:
    """What each file's entry depends on: the dataset, the file's path, size and modification time."""
    return [fingerprint({"dataset": str(dataset.uri), "file": [i.path, i.size, i.mtime_ns]})
            for i in dataset.fs.get_file_info(list(files))]


def _cache_actor_class():
    import ray

    @ray.remote(num_cpus=0)
    class SharedSourceCache:
        """Owns the decoded entries, one per Parquet file; one request at a time, so concurrent
        trials wanting the same files decode them once (the second waits for the first's entries)."""

        def __init__(self) -> None:
            self._entries: OrderedDict[str, tuple["ray.data.MaterializedDataset", int]] = OrderedDict()
            self.hits = self.misses = 0

        def get(self, keys: list[str], sizes: list[int], budget_bytes: int, parallel: int,
                build: Callable[[int], "ray.data.MaterializedDataset"]) -> "list[ray.data.MaterializedDataset] | None":
            """The entries `keys` (file i's decoded rows, about `sizes[i]` bytes), the missing ones
            built by `build(i)`, `parallel` at a time; None when they cannot fit the budget together."""
            if sum(sizes) > budget_bytes:
                return None
            missing = [i for i, key in enumerate(keys) if key not in self._entries]
            kept = set(keys)
            while self._entries and self._bytes() + sum(sizes[i] for i in missing) > budget_bytes:
                victim = next((k for k in self._entries if k not in kept), None)
                if victim is None:
                    break
                del self._entries[victim]  # a run still reading it keeps its blocks alive
            with ThreadPoolExecutor(max(1, parallel)) as pool:
                for i, built in zip(missing, pool.map(build, missing)):
                    self._entries[keys[i]] = (built, sizes[i])
            self.misses += len(missing)
            self.hits += len(keys) - len(missing)
            for key in keys:
                self._entries.move_to_end(key)
            return [self._entries[key][0] for key in keys]

        def _bytes(self) -> int:
            return sum(size for _, size in self._entries.values())

        def stats(self) -> dict[str, int]:
            return {"entries": len(self._entries), "hits": self.hits, "misses": self.misses, "bytes": self._bytes()}

    return SharedSourceCache


def start_shared_source_cache():
    """Open a shared cache for the rest of this process's Ray job; returns the handle that keeps it
    (a named actor lives while a handle to it does), or None when one is open already.

    For a driver that runs its stages itself (`diffkd run`): hold the handle as long as they run.
    """
    if _lookup() is not None:
        return None
    return _cache_actor_class().options(name=ACTOR_NAME).remote()


@contextlib.contextmanager
def shared_source_cache() -> Iterator[None]:
    """Share decoded source images between the runs this block starts (Ray must be initialised), and
    free them when it ends. Reentrant: inside a block that shares already (a search inside
    `diffkd run`) it adds nothing."""
    import ray

    actor = start_shared_source_cache()
    try:
        yield
    finally:
        if actor is not None:
            with contextlib.suppress(Exception):  # the job may be tearing Ray down already
                log.info("shared source cache: %s", ray.get(actor.stats.remote(), timeout=10))
                ray.kill(actor)


def shared_cache_open() -> bool:
    """Whether this process's Ray job has a shared cache open."""
    return _lookup() is not None


def _lookup():
    import ray

    if not ray.is_initialized():
        return None
    try:
        return ray.get_actor(ACTOR_NAME)
    except ValueError:  # no such actor: nobody opened a shared cache
        return None


def shared_sources(keys: list[str], sizes: list[int], budget_bytes: int, parallel: int,
                   build: Callable[[int], "ray.data.MaterializedDataset"]) -> "list[ray.data.MaterializedDataset] | None":
    """The shared entries `keys` (see `SharedSourceCache.get`), or None when no shared cache is open
    or they cannot fit its budget."""
    import ray

    actor = _lookup()
    if actor is None:
        return None
    return ray.get(actor.get.remote(keys, sizes, budget_bytes, parallel, build))
