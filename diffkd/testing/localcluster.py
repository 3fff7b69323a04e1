"""A real multi-node Ray cluster on one machine: a head and worker nodes as separate `ray start` processes.

Ray Train groups workers into nodes by IP (docs/design.md), so several raylets on 127.0.0.1 still look
like one node to it. In ``netns`` mode every worker node gets its own network namespace and address,
joined to the head through veth pairs on a bridge::

    root namespace                          namespace <id>-w1        namespace <id>-w2
    bridge <id>br 198.18.N.1  (head)  <-->  eth0 198.18.N.2          eth0 198.18.N.3

(198.18.0.0/15 is reserved for network benchmarking, so it never clashes with a real network.)
Each node runs ``ray start --block`` under ``unshare --pid --fork --kill-child --mount-proc``: one
SIGKILL to that process ends the node and everything it started. Each node has its own ``--temp-dir``
under the cluster's root directory, removed on teardown (a leftover ``ray_current_cluster`` naming a
dead head breaks later runs). Gloo and NCCL are told which interface to use (``GLOO_SOCKET_IFNAME``),
otherwise the hostname resolves to 127.0.0.1 and the cross-node rendezvous fails.

Where namespaces are not allowed (not root, no CAP_NET_ADMIN) ``ports`` mode starts the same nodes
on 127.0.0.1 with distinct ports: the raylets are separate, but Ray Train sees a single node.

Ray token auth is on by default: a fresh random token per cluster (``auth_token=GENERATE``), printed by
``up`` and kept in the cluster's state file (mode 0600); the dashboard and Jobs API listen on the
head's address, which in ``netns`` mode other processes of this machine can reach. ``auth_token=None``
(``up --no-token``) turns auth off, with a warning.

Command line (also ``cluster/local_multinode.sh``)::

    python -m diffkd.testing.localcluster up [--workers 2] [--mode auto|netns|ports] [--token T | --no-token]
    python -m diffkd.testing.localcluster status
    python -m diffkd.testing.localcluster down
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffkd.runtime.files import atomic_write_text

log = logging.getLogger(__name__)

REGISTRY = Path(tempfile.gettempdir()) / "diffkd-localclusters"  # one JSON state file per live cluster
SUBNET_PREFIX = "198.18"
MODES = ("auto", "netns", "ports")
GENERATE = "generate"  # auth_token default: a fresh random token per cluster


class LocalClusterError(RuntimeError):
    """The local cluster could not be started, reached or torn down."""


@dataclass
class Node:
    name: str  # "head", "w1", "w2", ...
    ip: str
    num_cpus: int
    temp_dir: str
    ifname: str  # interface Gloo/NCCL should use on this node
    netns: str | None = None
    pid: int | None = None  # the `unshare`/`ray start` process that owns the node
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def is_head(self) -> bool:
        return self.name == "head"


@dataclass
class ClusterState:
    cluster_id: str
    mode: str
    root_dir: str
    nodes: list[Node]
    owner_pid: int
    bridge: str | None = None
    veths: list[str] = field(default_factory=list)
    auth_token: str | None = None

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{self.head.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{self.head.ports['dashboard']}"

    def save(self) -> Path:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        path = REGISTRY / f"{self.cluster_id}.json"
        atomic_write_text(path, json.dumps(asdict(self), indent=2), mode=0o600)  # it holds the token
        return path

    @classmethod
    def load(cls, path: Path) -> "ClusterState":
        raw = json.loads(Path(path).read_text())
        raw["nodes"] = [Node(**n) for n in raw["nodes"]]
        return cls(**raw)


def namespaces_available() -> bool:
    """True when this process may create network and PID namespaces (root or CAP_NET_ADMIN+CAP_SYS_ADMIN)."""
    if not (shutil.which("ip") and shutil.which("unshare")):
        return False
    probe = f"dkprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    if not made:
        return False
    return subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "true"],
                          capture_output=True).returncode == 0


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LocalClusterError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}")


def _used_subnets() -> set[str]:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
    used = set()
    for line in out.splitlines():
        addr = line.split()[3]
        used.add(str(ipaddress.ip_interface(addr).network))
    return used


def _pick_subnet() -> int:
    used = _used_subnets()
    for third in range(256):
        if f"{SUBNET_PREFIX}.{third}.0/24" not in used:
            return third
    raise LocalClusterError(f"every {SUBNET_PREFIX}.N.0/24 subnet is in use; "
                            "run `python -m diffkd.testing.localcluster down`")


def _set_parent_death_signal() -> None:
    """In the child before exec: die with the parent, so a killed test run never leaves nodes behind."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _processes_under(root_dir: str) -> list:
    """Live processes whose command line names this cluster's root directory (ours, by construction)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if root_dir in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE and proc.pid != os.getpid():
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


class LocalCluster:
    """Head + worker nodes on this machine; use as a context manager so teardown always happens.

    >>> with LocalCluster(num_workers=2) as cluster:          # doctest: +SKIP
    ...     JobSubmissionClient(cluster.dashboard_url).submit_job(...)
    """

    def __init__(self, num_workers: int = 2, *, head_cpus: int = 1, worker_cpus: int = 2,
                 mode: str = "auto", object_store_mb: int = 200, auth_token: str | None = GENERATE,
                 own_lifetime: bool = True, extra_env: dict[str, str] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if auth_token == GENERATE:
            auth_token = secrets.token_hex(24)
        elif auth_token is None:
            log.warning("local cluster without token auth: any process on this machine that reaches the "
                        "dashboard can run code as you")
        self.num_workers = num_workers
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.requested_mode = mode
        self.object_store_mb = object_store_mb
        self.auth_token = auth_token
        # own_lifetime: nodes die with this process (tests). False for `up`, whose nodes outlive the CLI.
        self.own_lifetime = own_lifetime
        self.extra_env = dict(extra_env or {})
        self.state: ClusterState | None = None
        self._popen: dict[str, subprocess.Popen] = {}  # reaped on teardown, so no zombies linger

    # ---- public ---------------------------------------------------------------------------
    @property
    def dashboard_url(self) -> str:
        return self._require_state().dashboard_url

    @property
    def gcs_address(self) -> str:
        return self._require_state().gcs_address

    @property
    def nodes(self) -> list[Node]:
        return self._require_state().nodes

    def __enter__(self) -> "LocalCluster":
        if self.state is None:  # `with LocalCluster(...).start(timeout=...)` is already up
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 300, start_retries: int = 3) -> "LocalCluster":
        """Bring the cluster up; `timeout` per stage (head, then workers), `start_retries` per node."""
        cleanup_stale()
        mode = self._resolve_mode()
        cluster_id = "dk" + secrets.token_hex(2)
        root_dir = tempfile.mkdtemp(prefix=f"{cluster_id}-", dir="/tmp")  # short: socket paths are length-limited
        self.state = ClusterState(cluster_id=cluster_id, mode=mode, root_dir=root_dir, nodes=[],
                                  owner_pid=os.getpid() if self.own_lifetime else 0, auth_token=self.auth_token)
        if self.own_lifetime:
            atexit.register(self.stop)
        try:
            self._plan_nodes()
            self.state.save()
            if mode == "netns":
                self._make_network()
                self.state.save()
            self._start_head(timeout, start_retries)
            for node in self.state.nodes[1:]:
                self._start_node(node)
            self.state.save()
            self.wait_for_nodes(len(self.state.nodes), timeout, start_retries)
        except BaseException:
            self.stop()
            raise
        log.info("local cluster %s up (%s mode): dashboard %s, GCS %s", cluster_id, mode,
                 self.state.dashboard_url, self.state.gcs_address)
        return self

    def stop(self) -> None:
        """Kill every node, wait until their processes are gone, remove namespaces and temp dirs. Idempotent."""
        if self.state is None:
            return
        try:
            teardown(self.state)
        finally:
            self.state = None
            for proc in self._popen.values():
                proc.poll()
            self._popen.clear()

    def kill_raylet(self, node_name: str) -> int:
        """SIGKILL the raylet of one node (a node failure as Ray sees it); returns its pid."""
        node = self._node(node_name)
        for proc in _processes_under(node.temp_dir):
            if proc.name() == "raylet" or "raylet/raylet" in " ".join(proc.cmdline()[:1]):
                proc.kill()
                return proc.pid
        raise LocalClusterError(f"no raylet found for node {node_name}")

    def kill_node(self, node_name: str) -> None:
        """SIGKILL a whole node and wait until all of its processes are gone."""
        node = self._node(node_name)
        _kill_node(node)

    def restart_node(self, node_name: str, timeout: float = 120) -> None:
        """Bring a (dead) worker node back, as a launcher or KubeRay would replace a lost node."""
        node = self._node(node_name)
        if node.is_head:
            raise LocalClusterError("restarting the head is not supported: stop and start the cluster")
        _kill_node(node)  # whatever is left of it (ray start --block exits once its raylet died)
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        known = {n["node_id"] for n in self.alive_nodes()}
        self._start_node(node)
        self._require_state().save()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # the GCS may still list the dead node: wait for a new node id
            self._check_alive(node)
            if any(n["node_ip"] == node.ip and n["node_id"] not in known for n in self.alive_nodes()):
                return
            time.sleep(1)
        raise LocalClusterError(f"node {node_name} did not rejoin within {timeout:.0f}s; logs: {node.temp_dir}")

    def alive_nodes(self) -> list[dict]:
        """The cluster's ALIVE nodes as the head's state API reports them."""
        import requests

        url = f"{self.dashboard_url}/api/v0/nodes"
        params = {"limit": 100, "filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE",
                  "detail": "1"}
        resp = requests.get(url, params=params, headers=self._auth_headers(), timeout=10)
        resp.raise_for_status()
        return resp.json()["data"]["result"]["result"]

    def _start_head(self, timeout: float, start_retries: int) -> None:
        """Start the head and wait for its dashboard; a head that died while starting is started again
        (on a saturated machine its first GCS round trips can time out)."""
        head = self.state.head
        for retries_left in range(start_retries, -1, -1):
            self._start_node(head)
            try:
                self.wait_for_head(timeout)
                return
            except LocalClusterError:
                if retries_left == 0 or self._popen[head.name].poll() is None:
                    raise
                log.warning("the head exited while starting (code %s); starting it again",
                            self._popen[head.name].returncode)
                _kill_node(head)
                shutil.rmtree(head.temp_dir, ignore_errors=True)

    def wait_for_head(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        url = f"{self.dashboard_url}/api/version"
        while time.monotonic() < deadline:
            self._check_alive(self.state.head)
            try:
                if requests.get(url, headers=self._auth_headers(), timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise LocalClusterError(f"head's dashboard did not answer at {url} within {timeout:.0f}s; "
                                f"logs: {self.state.head.temp_dir}/session_latest/logs")

    def wait_for_nodes(self, count: int, timeout: float, start_retries: int = 3) -> None:
        """Wait until `count` nodes are alive; a worker node that died while starting is started again.

        On a saturated machine a raylet can give up waiting for its own agents; a second start
        usually succeeds.
        """
        deadline = time.monotonic() + timeout
        alive: list = []
        retries = {node.name: start_retries for node in self.nodes}
        while time.monotonic() < deadline:
            self._check_alive(self.state.head)
            for node in self.nodes[1:]:
                proc = self._popen.get(node.name)
                if proc is not None and proc.poll() is not None:
                    if retries[node.name] == 0:
                        self._check_alive(node)  # raises with the node's output
                    retries[node.name] -= 1
                    log.warning("node %s exited while starting (code %s); starting it again",
                                node.name, proc.returncode)
                    _kill_node(node)
                    shutil.rmtree(node.temp_dir, ignore_errors=True)
                    self._start_node(node)
            try:
                alive = self.alive_nodes()
                if len(alive) >= count:
                    return
            except Exception as err:  # the state API answers 5xx while the GCS settles
                log.debug("waiting for nodes: %s", err)
            time.sleep(1)
        raise LocalClusterError(f"only {len(alive)} of {count} nodes alive after {timeout:.0f}s; "
                                f"logs under {self.state.root_dir}")

    # ---- internals --------------------------------------------------------------------------
    def _require_state(self) -> ClusterState:
        if self.state is None:
            raise LocalClusterError("the local cluster is not running")
        return self.state

    def _node(self, name: str) -> Node:
        for node in self._require_state().nodes:
            if node.name == name:
                return node
        raise LocalClusterError(f"no node {name!r}; nodes: {[n.name for n in self.nodes]}")

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.auth_token}"} if self.auth_token else {}

    def _resolve_mode(self) -> str:
        if self.requested_mode == "ports":
            return "ports"
        if namespaces_available():
            return "netns"
        if self.requested_mode == "netns":
            raise LocalClusterError("network namespaces are not allowed here (needs root or CAP_NET_ADMIN); "
                                    "use mode='ports' (one IP, distinct ports)")
        log.warning("network namespaces not allowed: falling back to distinct ports on 127.0.0.1 "
                    "(separate raylets, but Ray Train will count them as ONE node)")
        return "ports"

    def _plan_nodes(self) -> None:
        state = self.state
        names = ["head"] + [f"w{i}" for i in range(1, self.num_workers + 1)]
        if state.mode == "netns":
            third = _pick_subnet()
            state.bridge = f"{state.cluster_id}br"
            ips = [f"{SUBNET_PREFIX}.{third}.{i + 1}" for i in range(len(names))]
            ifnames = [state.bridge] + ["eth0"] * self.num_workers
            netns = [None] + [f"{state.cluster_id}-{n}" for n in names[1:]]
        else:
            ips = ["127.0.0.1"] * len(names)
            ifnames = ["lo"] * len(names)
            netns = [None] * len(names)
        for name, ip, ifname, ns in zip(names, ips, ifnames, netns):
            node = Node(name=name, ip=ip, ifname=ifname, netns=ns,
                        num_cpus=self.head_cpus if name == "head" else self.worker_cpus,
                        temp_dir=os.path.join(state.root_dir, name))
            # Distinct ports for every node: required on one IP, harmless across namespaces.
            probe_host = "127.0.0.1"
            node.ports = {"dashboard_agent_listen": _free_port(probe_host),
                          "dashboard_agent_grpc": _free_port(probe_host),
                          "runtime_env_agent": _free_port(probe_host),
                          "metrics_export": _free_port(probe_host)}
            if name == "head":
                node.ports.update(gcs=_free_port(probe_host), dashboard=_free_port(probe_host),
                                  client_server=_free_port(probe_host))
            state.nodes.append(node)

    def _make_network(self) -> None:
        state = self.state
        head = state.head
        _run(["ip", "link", "add", state.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{head.ip}/24", "dev", state.bridge])
        _run(["ip", "link", "set", state.bridge, "up"])
        for node in state.nodes[1:]:
            veth = f"{state.cluster_id}v{node.name[1:]}"
            peer = f"{veth}p"
            _run(["ip", "netns", "add", node.netns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
            state.veths.append(veth)
            _run(["ip", "link", "set", veth, "master", state.bridge])
            _run(["ip", "link", "set", veth, "up"])
            _run(["ip", "link", "set", peer, "netns", node.netns])
            _run(["ip", "-n", node.netns, "link", "set", peer, "name", node.ifname])
            _run(["ip", "-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", node.ifname])
            _run(["ip", "-n", node.netns, "link", "set", node.ifname, "up"])
            _run(["ip", "-n", node.netns, "link", "set", "lo", "up"])

    def _node_env(self, node: Node) -> dict[str, str]:
        env = dict(os.environ)
        venv_bin = os.path.dirname(sys.executable)  # jobs' `python`/`diffkd` must be this environment's
        env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
        env.update({
            "GLOO_SOCKET_IFNAME": node.ifname,
            "NCCL_SOCKET_IFNAME": node.ifname,
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            # Agents start slowly on a saturated machine; the defaults make the raylet give up.
            "RAY_agent_register_timeout_ms": env.get("RAY_agent_register_timeout_ms", "120000"),
            "RAY_raylet_start_wait_time_s": env.get("RAY_raylet_start_wait_time_s", "120"),
        })
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(var, None)
        # Nodes find the venv's ninja first on PATH; processes without the venv on PATH use the
        # system's, and two ninja versions sharing one torch extension cache rebuild DeepSpeed's JIT
        # ops (minutes each) every time the other one built last. Keep this environment's builds apart.
        env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        if self.auth_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.auth_token)
        else:
            env["RAY_AUTH_MODE"] = "disabled"
            env.pop("RAY_AUTH_TOKEN", None)
        env.update(self.extra_env)
        return env

    def _ray_start_args(self, node: Node) -> list[str]:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        args = [ray, "start", "--block", "--disable-usage-stats",
                f"--node-ip-address={node.ip}", f"--num-cpus={node.num_cpus}", "--num-gpus=0",
                f"--temp-dir={node.temp_dir}",
                f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
                f"--dashboard-agent-listen-port={node.ports['dashboard_agent_listen']}",
                f"--dashboard-agent-grpc-port={node.ports['dashboard_agent_grpc']}",
                f"--runtime-env-agent-port={node.ports['runtime_env_agent']}",
                f"--metrics-export-port={node.ports['metrics_export']}"]
        if node.is_head:
            args += ["--head", f"--port={node.ports['gcs']}", "--include-dashboard=true",
                     f"--dashboard-host={node.ip}", f"--dashboard-port={node.ports['dashboard']}",
                     f"--ray-client-server-port={node.ports['client_server']}"]
        else:
            args += [f"--address={self.state.gcs_address}"]
        return args

    def _start_node(self, node: Node) -> None:
        args = self._ray_start_args(node)
        if self.state.mode == "netns":
            args = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"] + args
            if node.netns:
                args = ["ip", "netns", "exec", node.netns] + args
        os.makedirs(node.temp_dir, exist_ok=True)
        log_path = os.path.join(self.state.root_dir, f"{node.name}.out")
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(args, env=self._node_env(node), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_set_parent_death_signal if self.own_lifetime else None)
        node.pid = proc.pid
        self._popen[node.name] = proc

    def _check_alive(self, node: Node) -> None:
        proc = self._popen.get(node.name)
        if proc is not None and proc.poll() is not None:
            out = Path(self.state.root_dir, f"{node.name}.out")
            tail = out.read_text(errors="replace")[-2000:] if out.exists() else ""
            raise LocalClusterError(f"node {node.name} exited with code {proc.returncode}:\n{tail}")


def _kill_node(node: Node, timeout: float = 60) -> None:
    import psutil

    if node.pid:
        try:
            owner = psutil.Process(node.pid)
            if node.temp_dir in " ".join(owner.cmdline()):  # the pid still belongs to this node
                try:
                    os.killpg(node.pid, signal.SIGKILL)  # the node's session: catches ports-mode children
                except ProcessLookupError:
                    owner.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    deadline = time.monotonic() + timeout
    while True:
        left = _processes_under(node.temp_dir)
        if not left:
            return
        for proc in left:  # stragglers that left the session (identified by this node's own temp dir)
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if time.monotonic() > deadline:
            raise LocalClusterError(f"node {node.name}: processes {[p.pid for p in left]} did not exit")
        time.sleep(0.2)


def teardown(state: ClusterState) -> None:
    """Kill all nodes (workers first), remove namespaces, links, temp dirs and the registry entry.

    With DIFFKD_KEEP_CLUSTER_LOGS=1 the nodes' temp dirs (Ray's logs) stay, for debugging.
    """
    errors = []
    for node in reversed(state.nodes):
        try:
            _kill_node(node)
        except Exception as err:
            errors.append(str(err))
    for node in state.nodes:
        if node.netns:
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
    for veth in state.veths:  # normally gone with its namespace; a half-built network may leave one
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
    if state.bridge:
        subprocess.run(["ip", "link", "del", state.bridge], capture_output=True)
    if os.environ.get("DIFFKD_KEEP_CLUSTER_LOGS") == "1":
        log.warning("kept the logs of local cluster %s in %s", state.cluster_id, state.root_dir)
    else:
        shutil.rmtree(state.root_dir, ignore_errors=True)
    (REGISTRY / f"{state.cluster_id}.json").unlink(missing_ok=True)
    if errors:
        raise LocalClusterError("; ".join(errors))


def registered_clusters() -> list[ClusterState]:
    if not REGISTRY.is_dir():
        return []
    states = []
    for path in sorted(REGISTRY.glob("*.json")):
        try:
            states.append(ClusterState.load(path))
        except (OSError, ValueError, TypeError) as err:
            log.warning("ignoring unreadable cluster state %s: %s", path, err)
    return states


def cleanup_stale() -> None:
    """Tear down clusters whose owning process died (a killed test run) so they cannot linger."""
    import psutil

    for state in registered_clusters():
        if state.owner_pid and not psutil.pid_exists(state.owner_pid):
            log.warning("removing stale local cluster %s (owner %d is gone)", state.cluster_id, state.owner_pid)
            teardown(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffkd.testing.localcluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes; they keep running until `down`")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--head-cpus", type=int, default=1)
    up.add_argument("--worker-cpus", type=int, default=2)
    up.add_argument("--mode", choices=MODES, default="auto")
    token = up.add_mutually_exclusive_group()
    token.add_argument("--token", default=GENERATE, help="the Ray auth token (default: a fresh random one, printed)")
    token.add_argument("--no-token", dest="token", action="store_const", const=None,
                       help="run without token auth (any local process could then submit jobs)")
    sub.add_parser("status", help="list the local clusters started here")
    down = sub.add_parser("down", help="tear down local clusters (all, or --id)")
    down.add_argument("--id", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.action == "up":
        cluster = LocalCluster(args.workers, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus,
                               mode=args.mode, auth_token=args.token, own_lifetime=False)
        cluster.start()
        state = cluster.state
        print(json.dumps({"id": state.cluster_id, "mode": state.mode, "dashboard": state.dashboard_url,
                          "gcs": state.gcs_address, "nodes": {n.name: n.ip for n in state.nodes},
                          "token": state.auth_token}))
        return 0
    if args.action == "status":
        for state in registered_clusters():
            print(json.dumps({"id": state.cluster_id, "mode": state.mode, "dashboard": state.dashboard_url,
                              "nodes": {n.name: n.ip for n in state.nodes}, "root_dir": state.root_dir}))
        return 0
    targets = [s for s in registered_clusters() if args.id in (None, s.cluster_id)]
    if args.id and not targets:
        print(f"no local cluster {args.id}", file=sys.stderr)
        return 1
    for state in targets:
        teardown(state)
        print(f"removed {state.cluster_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
