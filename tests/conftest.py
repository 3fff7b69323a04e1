import os
import shutil
import tempfile

import pytest

import diffkd  # noqa: F401  (before any test imports timm: see diffkd/_torchvision_compat.py)

# Keep CPU-bound libraries from oversubscribing the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray instance for the whole test session, with its own short temp dir.

    4 logical CPUs on a 2-core machine leave room for Ray Data tasks beside Train workers
    (docs/design.md: with num_cpus=2 a second concurrent trial never got a CPU).
    """
    import ray

    from diffkd.raycompat import init_local

    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    init_local(num_cpus=4, temp_dir=temp_dir)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
