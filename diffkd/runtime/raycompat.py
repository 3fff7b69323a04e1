"""Starting or joining Ray the way diffkd needs it.

`ray.init()` with no address joins whatever cluster Ray's temp dir recorded last, even a dead one
(docs/design.md "Never a bare ray.init()"), so diffkd never calls it bare: it either joins an explicit address or starts its own
local instance.
"""
from __future__ import annotations

import logging
import os
import time

from diffkd.runtime.console import attach_ray_workers, configure_worker

log = logging.getLogger(__name__)

AUTH_ENV = "RAY_AUTH_MODE"


def configure_local_auth() -> str:
    """Decide token auth for an embedded local instance, deliberately.

    The embedded instance listens on 127.0.0.1 only and lives as long as this process, so the
    network exposure Ray's token auth guards against does not exist; we disable it explicitly
    unless the user chose a mode. Remote clusters keep whatever their operators configured, and
    `diffkd submit --token` / RAY_AUTH_TOKEN authenticate against them.
    """
    mode = os.environ.setdefault(AUTH_ENV, "disabled")
    return mode


# The embedded instance has no dashboard to show metrics or the task timeline, yet every Ray process
# would still collect and report them each second. On a 2-core machine running two Train workers that
# background work took ~0.22 of a core (11% of the machine: raylet, idle workers and each of Ray Train's
# helper actors); without it ~0.09. Clusters started with `ray start` keep Ray's defaults.
LOCAL_SYSTEM_CONFIG = {"enable_metrics_collection": False, "task_events_report_interval_ms": 0}


LIMITS_RETRY_S = 2.0  # how long an execution asks again for unknown limits before Ray's 1 s cache applies


def refresh_data_limits_until_known() -> None:
    """Make Ray Data ask again for its resource limits, instead of a second later, until it has them.

    Ray 2.60's streaming executor learns what it may use from an autoscaling-coordinator actor, by an
    RPC it answers asynchronously, and caches the answer for one second. Every execution (every epoch)
    registers anew, so its first answer is "nothing yet" and it is kept for a second: one task runs
    while its siblings wait. Epochs of a second or two then decoded on one core of two (measured in
    bench/data_feed.py: 480 images/s, 765 with this). The executor's own limits are unchanged; only an
    answer without any object store (which the coordinator always grants once it has answered) is not
    cached, during an execution's first `LIMITS_RETRY_S`. Idempotent; a Ray without these internals is
    left alone.
    """
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        return
    original = getattr(ResourceManager, "get_global_limits", None)
    if original is None or getattr(original, "refreshes_until_known", False):
        return

    def get_global_limits(self):
        limits = original(self)
        if limits.object_store_memory == 0 and hasattr(self, "_global_limits_last_update_time"):
            unknown_since = self.__dict__.setdefault("_diffkd_limits_unknown_since", time.monotonic())
            if time.monotonic() - unknown_since < LIMITS_RETRY_S:  # never a busy loop of RPCs
                self._global_limits_last_update_time = 0  # unknown yet: ask again on the next scheduling step
        return limits

    get_global_limits.refreshes_until_known = True
    ResourceManager.get_global_limits = get_global_limits


def init_local(num_cpus: int | None = None, num_gpus: int | None = None, temp_dir: str | None = None,
               **kwargs) -> None:
    """Start a private local Ray instance (never joins a recorded cluster). No-op if already initialised."""
    import ray

    if ray.is_initialized():
        return
    configure_local_auth()
    logical_cpus = num_cpus or max(4, os.cpu_count() or 1)
    runtime_env = {"worker_process_setup_hook": "diffkd.runtime.raycompat.setup_worker",
                   **kwargs.pop("runtime_env", {})}
    system_config = {**LOCAL_SYSTEM_CONFIG, **kwargs.pop("_system_config", {})}
    ray.init(address="local", num_cpus=logical_cpus, num_gpus=num_gpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", _temp_dir=temp_dir, log_to_driver=True, runtime_env=runtime_env,
             _system_config=system_config, **kwargs)
    attach_console()
    log.info("started a local Ray instance with %s logical CPUs", logical_cpus)


# Ray Train's placement-group cleaner asks the State API, which lives in the dashboard, whether a run's
# controller is alive; the embedded instance has no dashboard, so the question fails every few seconds
# with a warning. diffkd frees stopped runs' placement groups itself (`diffkd.runtime.placement`), so the warning
# says nothing a user can act on.
DASHBOARDLESS_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def setup_worker() -> None:
    """Worker setup hook of the embedded instance: diffkd's logging in the worker (its warnings reach
    the driver's console, the rest its log files); drop the warnings that only mean 'no dashboard'."""
    configure_worker()
    for name in DASHBOARDLESS_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def attach_console() -> None:
    """Workers' lines marked for the console reach it (`diffkd.runtime.console`); the rest go where Ray prints."""
    attach_ray_workers()


# Set by Ray's job supervisor for a submitted job's entrypoint (beside RAY_ADDRESS = the cluster's GCS).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Settings that size a private instance; a cluster being joined already has its own.
LOCAL_ONLY_KWARGS = ("num_cpus", "num_gpus", "temp_dir")


def submitted_job_address() -> str | None:
    """The cluster this process runs on as a submitted job (`diffkd submit`), else None."""
    if JOB_CONFIG_ENV in os.environ:
        return os.environ.get("RAY_ADDRESS") or "auto"
    return None


def init(address: str | None = None, **kwargs) -> None:
    """Join `address` ("auto", "ray://...", "host:port") when given, or the cluster a submitted job runs
    on; otherwise start a private local instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or submitted_job_address()
    if address:
        ignored = sorted(k for k in kwargs if k in LOCAL_ONLY_KWARGS and kwargs[k] is not None)
        if ignored:
            log.info("joining the Ray cluster at %s: its own resources apply (ignoring %s)", address,
                     ", ".join(ignored))
        ray.init(address=address, **{k: v for k, v in kwargs.items() if k not in LOCAL_ONLY_KWARGS})
        attach_console()
    else:
        init_local(**kwargs)
