"""Fixtures shared by the loop, engine and checkpoint tests."""
from __future__ import annotations

import os
import socket

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def process_group():
    """A one-process gloo group, as Ray Train would set up for a single worker.

    One per session: DeepSpeed caches the group it first sees, so a second group created after the
    first was destroyed fails in DeepSpeed with "Group ... is not registered".
    """
    import torch.distributed as dist

    from diffkd.train.deepspeed_config import prepare_deepspeed

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    prepare_deepspeed(use_gpu=False)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
