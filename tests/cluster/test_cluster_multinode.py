"""A real 3-node Ray cluster on this machine (head + 2 workers in network namespaces), jobs submitted
with `diffkd submit`, and nodes killed under running jobs. All slow: `pytest -m slow tests/test_cluster_multinode.py`.
"""
from __future__ import annotations

import ipaddress
import json
import time
import uuid
from pathlib import Path

import pytest

from diffkd.runtime import jobs
from diffkd.cli import main as cli

# DeepSpeed's first start on a node and 2 shared cores make these long; the limit only catches hangs.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

JOB_TIMEOUT_S = 1200
EPOCHS = 6


@pytest.fixture(scope="session")
def cluster():
    """Head (no CPUs: drivers only) + two 2-CPU worker nodes, each at its own address. Always torn down."""
    from diffkd.testing.localcluster import LocalCluster, namespaces_available

    if not namespaces_available():
        pytest.skip("network namespaces are not allowed here: the distinct-ports fallback gives Ray Train "
                    "a single node, so a 2-node test cannot run (needs root / CAP_NET_ADMIN)")
    # 3 logical CPUs per worker node: a pipeline stage's 2-CPU Train worker fits once per node (so
    # its 2 workers land on 2 nodes) and leaves a CPU there for the Ray Data decode tasks.
    local = LocalCluster(num_workers=2, head_cpus=0, worker_cpus=3)
    with local.start(timeout=600, start_retries=5):  # patient: nodes start slowly on a saturated machine
        state = local.state
        yield local
    # Teardown left nothing behind: no node processes, namespaces, links or temp dirs.
    import subprocess

    from diffkd.testing.localcluster import _processes_under

    assert not _processes_under(state.root_dir)
    assert state.cluster_id not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert state.cluster_id not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Path:
    """Storage every node sees at the same path (the nodes share this machine's filesystem)."""
    return tmp_path_factory.mktemp("shared")


def submit(cluster, *command: str) -> str:
    """`diffkd submit --no-wait [options] -- <command>`; leading `--x` options go before `--`; returns the job id."""
    import contextlib
    import io

    options = []
    while command and command[0].startswith("--"):
        options, command = options + list(command[:2]), command[2:]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(["submit", "--address", cluster.dashboard_url, "--no-wait", *options, "--", *command])
    assert code == 0, out.getvalue()
    return out.getvalue().strip().splitlines()[-1]


def wait_ok(cluster, job_id: str) -> str:
    client = jobs.connect(cluster.dashboard_url)
    final = jobs.wait(client, job_id, timeout_s=JOB_TIMEOUT_S)
    logs = jobs.logs(client, job_id)
    assert final == "SUCCEEDED", logs[-6000:]
    return logs


def deepspeed_job(cluster, shared: Path, name: str, epoch_sleep: float = 0.0) -> tuple[str, Path]:
    out = shared / "results" / f"{name}.json"
    job_id = submit(cluster, "python", "tests/cluster/cluster_jobs.py", "deepspeed", "--storage", str(shared / "runs"),
                    "--name", name, "--out", str(out), "--epochs", str(EPOCHS), "--epoch-sleep", str(epoch_sleep))
    return job_id, out


def worker_ips(cluster) -> set[str]:
    return {n.ip for n in cluster.nodes if not n.is_head}


@pytest.fixture(scope="session")
def reference_run(cluster, shared):
    """An uninterrupted 2-node DeepSpeed run: the baseline the fault test must reproduce."""
    started = time.monotonic()
    name = f"ds-ref-{uuid.uuid4().hex[:6]}"
    job_id, out = deepspeed_job(cluster, shared, name)
    logs = wait_ok(cluster, job_id)
    return {"result": json.loads(out.read_text()), "logs": logs, "name": name,
            "seconds": time.monotonic() - started}


def test_cluster_has_three_nodes_at_their_own_addresses(cluster):
    alive = cluster.alive_nodes()
    ips = sorted(n["node_ip"] for n in alive)
    assert len(ips) == 3 and len(set(ips)) == 3
    subnet = ipaddress.ip_network(f"{cluster.nodes[0].ip}/24", strict=False)
    assert all(ipaddress.ip_address(ip) in subnet for ip in ips)


def test_two_node_deepspeed_job(reference_run, shared):
    result = reference_run["result"]
    placement = result["placement"]
    assert result["world_size"] == 2
    assert sorted(p["node_rank"] for p in placement) == [0, 1]  # Ray Train sees two nodes
    assert len({p["ip"] for p in placement}) == 2
    history = result["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS)) and {h["attempt"] for h in history} == {0}
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]  # it learned
    assert "FINAL" in reference_run["logs"]
    # ZeRO-2 optimizer shards of both ranks ended up in one checkpoint directory, apart by name.
    run_dir = shared / "runs" / reference_run["name"]
    latest = max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    shards = sorted(p.name for p in (latest / "deepspeed" / "state").glob("*optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    print(f"2-node DeepSpeed job: {reference_run['seconds']:.1f}s")


def _checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.glob("checkpoint_*") if p.is_dir()] if run_dir.is_dir() else []


def test_worker_node_loss_resumes_from_last_checkpoint(cluster, shared, reference_run):
    """Kill a worker node's raylet mid-training; a replacement node joins; the job finishes from its
    last checkpoint and its epoch history equals the uninterrupted run's: nothing lost, nothing redone twice."""
    started = time.monotonic()
    name = f"ds-fault-{uuid.uuid4().hex[:6]}"
    job_id, out = deepspeed_job(cluster, shared, name, epoch_sleep=3.0)
    client = jobs.connect(cluster.dashboard_url)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(_checkpoints(shared / "runs" / name)) < 2:  # two epochs are safely checkpointed
        assert jobs.status(client, job_id) in ("PENDING", "RUNNING"), jobs.logs(client, job_id)[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    cluster.kill_raylet("w2")
    cluster.restart_node("w2")  # what the autoscaler / KubeRay does: a replacement node
    logs = wait_ok(cluster, job_id)

    history = json.loads(out.read_text())["history"]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    attempts = [h["attempt"] for h in history]
    # Resumed from a checkpoint, not from scratch: epoch 0 kept from the first attempt. (The resume
    # point is the last checkpoint Ray Train had committed when the node died; a checkpoint still
    # being reported then is not one.)
    assert attempts[0] == 0 and attempts[-1] >= 1, attempts
    reference = reference_run["result"]["history"]
    for got, want in zip(history, reference):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), (got, want)
    print(f"raylet kill + resume: {time.monotonic() - started:.1f}s; attempts per epoch {attempts}")
    assert "FINAL" in logs


def test_tune_search_survives_losing_a_trials_node(cluster, shared):
    started = time.monotonic()
    name = f"tune-fault-{uuid.uuid4().hex[:6]}"
    out = shared / "results" / f"{name}.json"
    job_id = submit(cluster, "python", "tests/cluster/cluster_jobs.py", "tune", "--storage", str(shared / "runs"),
                    "--name", name, "--out", str(out), "--iterations", "8", "--epoch-sleep", "2")
    client = jobs.connect(cluster.dashboard_url)
    run_dir = shared / "runs" / name
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(run_dir.glob("*/checkpoint_*")):  # some trial has checkpointed
        assert jobs.status(client, job_id) in ("PENDING", "RUNNING"), jobs.logs(client, job_id)[-4000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    cluster.kill_node("w2")
    cluster.restart_node("w2")
    wait_ok(cluster, job_id)
    result = json.loads(out.read_text())
    assert sorted(t["x"] for t in result["trials"]) == [1.0, 2.0, 3.0, 4.0]
    assert all(t["iterations"] == 8 and t["error"] is None for t in result["trials"]), result
    assert any(t["restored"] for t in result["trials"]), result  # some trial came back from its checkpoint
    assert result["best_x"] == 3.0
    print(f"Tune node loss: {time.monotonic() - started:.1f}s")


def test_shared_storage_visible_from_every_node(cluster, shared):
    script = ("import ray; from diffkd.runtime import storage; ray.init(address='auto'); "
              f"print('NODES', storage.check_visible_from_all_nodes({str(shared)!r}))")
    job_id = submit(cluster, "python", "-c", script)
    logs = wait_ok(cluster, job_id)
    assert "NODES 3" in logs


# ---- the pipeline's own stages as 2-node jobs ------------------------------------------------------
# warmup_fraction: DeepSpeed's WarmupCosineLR refuses 0 warmup steps, which the loop's default
# (0.05 of ~6 optimizer steps) rounds to.
STAGE_CONFIG = """\
teacher:
  arch: resnet10t
  clinical: false
  predict_actors: 1
  pipeline: {{image_size: 32, augment: false, batch_size: 8}}
  loop: {{num_workers: 2, cpus_per_worker: 2.0, threads_per_worker: 1, epochs: 2, batch_size: 8,
          warmup_fraction: 0.34, zero_stage: 2, patience: 0, keep_checkpoints: 2, max_failures: 1, storage_path: {runs}}}
diffusion:
  model: {{image_size: 32, block_out_channels: [16, 32], layers_per_block: 1, condition_dim: 32}}
  val_timesteps: 2
diffusion_loop: {{num_workers: 2, cpus_per_worker: 2.0, threads_per_worker: 1, epochs: 2, batch_size: 8,
                 warmup_fraction: 0.34, zero_stage: 2, patience: 0, keep_checkpoints: 2, max_failures: 1, storage_path: {runs}}}
"""


@pytest.fixture(scope="session")
def phantom_dataset(shared) -> dict:
    """A small two-center phantom cohort ingested onto the shared storage, plus a stage config there."""
    phantom, data = shared / "phantom", shared / "data"
    assert cli(["phantom", "--out", str(phantom), "--size", "demo", "--centers", "2", "--patients", "40",
                "--seed", "1"]) == 0
    for center in sorted(p.name for p in phantom.iterdir() if (p / "clinical.csv").exists()):
        assert cli(["ingest", str(phantom / center), "--center", center, "--dataset", str(data),
                    "--clinical", str(phantom / center / "clinical.csv")]) == 0
    config = shared / "stages.yaml"
    config.write_text(STAGE_CONFIG.format(runs=shared / "runs"))
    centers = sorted(json.loads((data / "_manifest.json").read_text())["centers"])
    return {"data": data, "config": config, "external": centers[-1]}


def train_run_placement(cluster, run_name: str) -> set[tuple[str, int]]:
    """(node IP, node rank) of the workers of a Train run's last attempt, from the dashboard's Train API
    (jobs opt in with RAY_TRAIN_ENABLE_STATE_TRACKING=1)."""
    import requests

    runs = requests.get(f"{cluster.dashboard_url}/api/train/v2/runs/v1", timeout=30).json()["train_runs"]
    attempts = [r["attempts"] for r in runs if r["name"] == run_name]
    assert attempts, f"no Train run {run_name!r} in {[r['name'] for r in runs]}"
    return {(w["node_ip"], w["node_rank"]) for w in attempts[-1][-1]["workers"]}


def assert_two_nodes(cluster, run_name: str) -> None:
    placement = train_run_placement(cluster, run_name)
    assert {rank for _, rank in placement} == {0, 1}, placement
    assert {ip for ip, _ in placement} == worker_ips(cluster), placement


def submit_stage(cluster, *command: str) -> str:
    return submit(cluster, "--env", "RAY_TRAIN_ENABLE_STATE_TRACKING=1", *command)


def test_two_node_teacher_job(cluster, shared, phantom_dataset):
    started = time.monotonic()
    out, run_name = shared / "models" / "teacher", f"teacher-{uuid.uuid4().hex[:6]}"
    job_id = submit_stage(cluster, "diffkd", "train", "teacher", "--config", str(phantom_dataset["config"]),
                          "--dataset", str(phantom_dataset["data"]), "--external", phantom_dataset["external"],
                          "--out", str(out), "--run-name", run_name)
    wait_ok(cluster, job_id)
    assert_two_nodes(cluster, run_name)
    info = json.loads((out / "training.json").read_text())
    assert info["metrics"]["epochs_run"] == 2 and len(info["history"]) == 2
    assert info["metrics"]["external"]["n"] > 0
    assert (out / "model.safetensors").is_file() and json.loads((out / "config.json").read_text())
    import pandas as pd

    predictions = pd.read_parquet(out / "predictions.parquet")
    assert set(predictions["split"]) == {"train", "val", "test"} and predictions["prob"].between(0, 1).all()
    print(f"2-node teacher job: {time.monotonic() - started:.1f}s")


def test_two_node_diffusion_job(cluster, shared, phantom_dataset):
    started = time.monotonic()
    out, run_name = shared / "models" / "diffusion", f"diffusion-{uuid.uuid4().hex[:6]}"
    job_id = submit_stage(cluster, "diffkd", "train", "diffusion", "--config", str(phantom_dataset["config"]),
                          "--dataset", str(phantom_dataset["data"]), "--external", phantom_dataset["external"],
                          "--out", str(out), "--run-name", run_name)
    logs = wait_ok(cluster, job_id)
    assert_two_nodes(cluster, run_name)
    assert (out / "model_index.json").is_file() and (out / "unet").is_dir()
    info = json.loads((out / "diffkd_training.json").read_text())
    assert info  # what trained it: split spec and a digest of the training case ids
    assert "best val_loss" in logs
    print(f"2-node diffusion job: {time.monotonic() - started:.1f}s")
