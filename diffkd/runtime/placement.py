"""Placement groups that Ray leaves reserved after a stopped Train run, found and removed.

Ray Tune stops trials (ASHA, a trial's last epoch) by killing its driver, and with it the Train
controller that created the trial's worker placement group; the group lives as long as the job, so
its CPUs would stay reserved. `placement_group_sweeper()` is a Tune callback that frees them as a
search runs, `settle_placement_groups()` frees the last ones after it. Both read the GCS placement
group table through Ray's private state API (`ray._private.state`, `gcs_pb2`): Ray offers no public
way to see a group's creator; a Ray upgrade that moves these internals breaks here and nowhere else.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def remove_orphaned_placement_groups() -> tuple[int, int]:
    """Remove this job's placement groups whose creating actor has died.

    Returns (removed, in use): groups removed now, and groups of this job whose creator still lives.

    Why: when ASHA stops a trial (or a trial reaches its last epoch), Tune kills the trial's driver
    and with it the Train controller it owns. A placement group lives as long as its *job*, not its
    creator, so the stopped run's worker CPUs would stay reserved and later trials would wait for
    workers forever. Ray Train's own cleaner watches controllers through the State API, which needs
    the dashboard; diffkd's embedded instance runs without one (and on a host with several Ray
    instances its address lookup fails). Here the GCS table answers directly: a group created by an
    actor that is dead can no longer be used by anyone. Groups created by the driver itself (Tune's
    trial reservations) have no creator actor and are left alone, as are other jobs' groups.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = in_use = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (info.state == gcs_pb2.PlacementGroupTableData.REMOVED or info.is_detached
                or info.creator_job_id.hex() != job or ray.ActorID(info.creator_actor_id).is_nil()):
            continue
        if not info.creator_actor_dead:
            in_use += 1
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(info.placement_group_id)))
        removed += 1
    if removed:
        log.debug("removed %d placement group(s) left by stopped trials", removed)
    return removed, in_use


def placement_group_sweeper(interval_s: float = 5.0):
    """A Tune callback that removes stopped trials' placement groups as the search runs."""
    from ray import tune

    class SweepPlacementGroups(tune.Callback):
        def __init__(self):
            self._last = 0.0

        def on_step_end(self, iteration, trials, **info) -> None:
            if time.monotonic() - self._last >= interval_s:
                self._last = time.monotonic()
                remove_orphaned_placement_groups()

    return SweepPlacementGroups()


def settle_placement_groups(timeout_s: float = 30.0) -> None:
    """After the search: give the last trials' actors time to die, then free what they held."""
    deadline = time.monotonic() + timeout_s
    while remove_orphaned_placement_groups()[1] and time.monotonic() < deadline:
        time.sleep(1.0)
