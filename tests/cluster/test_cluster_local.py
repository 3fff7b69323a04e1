"""The local cluster's lifetime: nodes never outlive the process that owns them, and leftovers are cleaned."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffkd.testing import localcluster

OWNER = """
import sys, time
from diffkd.testing.localcluster import LocalCluster
cluster = LocalCluster(num_workers=0, head_cpus=1, mode="ports").start()
print("UP", cluster.state.cluster_id, cluster.state.root_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # ~30 s: starts a real head
def test_nodes_die_with_their_owner_and_stale_state_is_cleaned():
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        line = owner.stdout.readline()
        assert line.startswith("UP"), "the owner did not bring its cluster up"
        _, cluster_id, root_dir = line.split()
        assert localcluster._processes_under(root_dir)  # the head is running
        owner.send_signal(signal.SIGKILL)  # no chance to tear anything down itself
        owner.wait(timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
    deadline = time.monotonic() + 60
    while localcluster._processes_under(root_dir):  # the kernel kills them (parent-death signal)
        assert time.monotonic() < deadline, "nodes outlived their owner"
        time.sleep(0.5)
    assert any(s.cluster_id == cluster_id for s in localcluster.registered_clusters())
    localcluster.cleanup_stale()  # what the next LocalCluster.start() does first
    assert not any(s.cluster_id == cluster_id for s in localcluster.registered_clusters())
    assert not Path(root_dir).exists()


def test_distinct_ports_per_node_in_ports_mode():
    cluster = localcluster.LocalCluster(num_workers=2, mode="ports")
    cluster.state = localcluster.ClusterState(cluster_id="dktest", mode="ports", root_dir="/tmp/none", nodes=[],
                                              owner_pid=os.getpid())
    cluster._plan_nodes()
    ports = [p for node in cluster.nodes for p in node.ports.values()]
    assert len(ports) == len(set(ports))  # one IP for all: nothing may collide
    assert [n.ip for n in cluster.nodes] == ["127.0.0.1"] * 3
    assert [n.num_cpus for n in cluster.nodes] == [1, 2, 2]


def test_token_auth_is_on_unless_turned_off(caplog):
    first, second = localcluster.LocalCluster(num_workers=0), localcluster.LocalCluster(num_workers=0)
    assert len(first.auth_token) >= 32 and first.auth_token != second.auth_token  # fresh per cluster
    first.state = localcluster.ClusterState(cluster_id="dktest", mode="ports", root_dir="/tmp/none", nodes=[],
                                            owner_pid=os.getpid())
    first._plan_nodes()
    env = first._node_env(first.nodes[0])
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == first.auth_token
    assert localcluster.LocalCluster(num_workers=0, auth_token=None).auth_token is None
    assert "without token auth" in caplog.text
