from __future__ import annotations


def test_data_tasks_run_side_by_side_from_the_start_of_an_execution(ray_local):
    """Ray 2.60 begins every execution with zero resource limits kept for a second, so a short epoch
    ran its tasks one after another; with the fix two 0.4 s tasks overlap in every execution."""
    import time

    import numpy as np
    import ray.data

    from diffkd.runtime.raycompat import refresh_data_limits_until_known

    def stamp(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # nested: shipped by value to the workers
        start = time.time()
        time.sleep(0.4)
        return {"start": np.array([start]), "end": np.array([time.time()])}

    refresh_data_limits_until_known()
    refresh_data_limits_until_known()  # idempotent: the wrapper is not stacked
    ds = ray.data.range(2, override_num_blocks=2).map_batches(
        stamp, batch_size=None, num_cpus=0.5, compute=ray.data.TaskPoolStrategy(size=2))
    ds.take_all()  # the first execution in a Ray session also starts Ray Data's coordinator actor
    for _ in range(2):  # every execution registers with that coordinator anew
        rows = sorted(ds.take_all(), key=lambda r: r["start"])
        assert len(rows) == 2
        assert rows[1]["start"] < rows[0]["end"], rows
