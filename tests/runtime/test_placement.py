"""Placement groups left by stopped Train runs: removed when their creator died, never otherwise."""
import time

from diffkd.runtime.placement import remove_orphaned_placement_groups


def test_placement_groups_of_dead_actors_are_removed_and_no_others(ray_local):
    """What frees a stopped trial's CPUs: its Train controller (an actor) created the group, then died."""
    ray = ray_local
    from ray.util.placement_group import placement_group, remove_placement_group

    @ray.remote(num_cpus=0)
    class Creator:
        def create(self):
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready())
            return group.id.hex()

    alive, doomed = Creator.remote(), Creator.remote()
    alive_group, doomed_group = ray.get([alive.create.remote(), doomed.create.remote()])
    driver_group = placement_group([{"CPU": 0.01}])  # what Tune reserves for a trial: created by the driver
    ray.get(driver_group.ready())
    ray.kill(doomed)
    deadline = time.monotonic() + 60
    while ray.util.placement_group_table()[doomed_group]["state"] != "REMOVED" and time.monotonic() < deadline:
        remove_orphaned_placement_groups()
        time.sleep(0.5)
    table = ray.util.placement_group_table()
    assert table[doomed_group]["state"] == "REMOVED"
    assert table[alive_group]["state"] == "CREATED" and table[driver_group.id.hex()]["state"] == "CREATED"
    removed, in_use = remove_orphaned_placement_groups()
    assert removed == 0 and in_use >= 1  # the live actor's group is counted as in use
    remove_placement_group(driver_group)
    ray.kill(alive)
