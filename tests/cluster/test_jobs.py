"""`diffkd submit` / `diffkd jobs` against a real Ray head with the Jobs API and token auth on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest

from diffkd.runtime import jobs
from diffkd.cli import main as cli

TOKEN = "diffkd-test-token-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def head():
    """A one-node cluster of our own (the session `ray_local` has no dashboard, so no Jobs API)."""
    from diffkd.testing.localcluster import LocalCluster

    with LocalCluster(num_workers=0, head_cpus=2, mode="ports", auth_token=TOKEN) as cluster:
        yield cluster


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


# ---- errors a user must be able to read ----------------------------------------------------------
def test_unreachable_address_is_one_clear_line(capsys):
    code, out, err = run_cli(capsys, "jobs", "list", "--address", f"http://127.0.0.1:{closed_port()}")
    assert code == 2
    assert err.count("\n") == 1 and "cannot reach the Ray cluster" in err and "Traceback" not in err


def test_refused_token_is_one_clear_line(head, capsys):
    code, _, err = run_cli(capsys, "jobs", "list", "--address", head.dashboard_url, "--token", "wrong")
    assert code == 2
    assert err.count("\n") == 1 and "refused the token" in err


def test_missing_token_says_how_to_pass_one(head, capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    code, _, err = run_cli(capsys, "jobs", "list", "--address", head.dashboard_url)
    assert code == 2
    assert "requires a token" in err and "RAY_AUTH_TOKEN" in err


def test_address_needs_the_jobs_api_url(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(jobs.JobsError, match="no cluster address"):
        jobs.resolve_address(None)
    with pytest.raises(jobs.JobsError, match="dashboard URL"):
        jobs.resolve_address("ray://head:10001")
    assert jobs.resolve_address("head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "https://h:443/")
    assert jobs.resolve_address(None) == "https://h:443"


def test_token_from_file(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    (tmp_path / "tok").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert jobs.resolve_token(None) == "abc"
    assert jobs.resolve_token("explicit") == "explicit"


# ---- the package: code travels, data does not ----------------------------------------------------
def make_project(root):
    (root / "diffkd" / "data").mkdir(parents=True)
    (root / "diffkd" / "data" / "dataset.py").write_text("CODE = 1\n")
    (root / "pyproject.toml").write_text("[project]\nname='x'\n")
    (root / "data" / "center=A").mkdir(parents=True)
    (root / "data" / "center=A" / "part-0.parquet").write_bytes(os.urandom(4096))
    (root / "demo_out" / "models").mkdir(parents=True)
    (root / "demo_out" / "models" / "model.safetensors").write_bytes(os.urandom(4096))
    (root / "stray.parquet").write_bytes(b"x" * 100)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref\n")
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").write_text("#!\n")
    return root


def test_package_keeps_code_and_drops_data_venv_git(tmp_path):
    project = make_project(tmp_path / "proj")
    package = jobs.build_package(project, tmp_path)
    names = set(zipfile.ZipFile(package).namelist())
    assert "diffkd/data/dataset.py" in names and "pyproject.toml" in names
    leaked = [n for n in names if n.startswith(("data/", "demo_out/", ".git/", ".venv/")) or n.endswith(".parquet")]
    assert leaked == []


def test_package_over_the_limit_is_refused_naming_the_culprit(tmp_path):
    project = make_project(tmp_path / "proj")
    (project / "notes").mkdir()
    (project / "notes" / "big.raw").write_bytes(os.urandom(200_000))  # incompressible
    with pytest.raises(jobs.JobsError, match=r"over the .* upload limit.*notes/big.raw"):
        jobs.build_package(project, tmp_path, limit_bytes=100_000)
    assert not list(tmp_path.glob("*.zip"))  # the refused package is not left behind


def test_entrypoint_runs_the_submitted_code_and_ids_are_unique(tmp_path):
    spec = jobs.JobSpec(command=["diffkd", "train", "teacher", "--out", "s3://b/run 1"])
    assert spec.entrypoint() == "python -m diffkd.cli train teacher --out 's3://b/run 1'"
    ids = {jobs.new_submission_id(spec.command) for _ in range(50)}
    assert len(ids) == 50 and all(i.startswith("diffkd-train-teacher-") for i in ids)
    with pytest.raises(jobs.JobsError, match="KEY=VALUE"):
        jobs.parse_env(["NOEQUALS"])
    with pytest.raises(jobs.JobsError, match="--image cannot be combined"):
        jobs.JobSpec(command=["diffkd"], image="img:1", pip=["x==1"]).runtime_env(tmp_path)
    assert jobs.JobSpec(command=["diffkd"], image="img:1", env={"A": "1"}).runtime_env(tmp_path) == {
        "env_vars": {"A": "1"}, "image_uri": "img:1"}


# ---- against the live head -----------------------------------------------------------------------
JOB_SCRIPT = (
    "import os, diffkd.runtime.jobs; "
    "print('MARK', os.environ['DIFFKD_MARK'], sorted(os.listdir('.')), "
    "os.path.dirname(diffkd.runtime.jobs.__file__) == os.path.abspath('diffkd/runtime'))"
)


def test_submit_follow_status_list(head, capsys):
    code, out, _ = run_cli(capsys, "submit", "--address", head.dashboard_url, "--token", TOKEN,
                           "--env", "DIFFKD_MARK=hello", "--", "python", "-c", JOB_SCRIPT)
    assert code == 0, out
    job_id, logs = out.split("\n", 1)
    assert job_id.startswith("diffkd-python-")
    mark = next(line for line in logs.splitlines() if line.startswith("MARK"))
    assert mark.startswith("MARK hello") and mark.endswith("True")  # the uploaded copy of diffkd runs
    assert "'diffkd'" in mark and "'.git'" not in mark and "'.venv'" not in mark

    code, out, _ = run_cli(capsys, "jobs", "status", job_id, "--address", head.dashboard_url, "--token", TOKEN)
    assert code == 0 and f"{job_id}: SUCCEEDED" in out
    code, out, _ = run_cli(capsys, "jobs", "list", "--address", head.dashboard_url, "--token", TOKEN)
    assert code == 0 and job_id in out


def test_diffkd_code_in_a_job_joins_the_cluster_not_a_private_instance(head, capsys):
    """raycompat.init() inside a submitted job must use the cluster the job runs on."""
    script = ("from diffkd.runtime import raycompat; raycompat.init(num_cpus=7); import ray; "
              "print('GCS', ray.get_runtime_context().gcs_address, 'CPUS', ray.cluster_resources()['CPU'])")
    code, out, _ = run_cli(capsys, "submit", "--address", head.dashboard_url, "--token", TOKEN, "--",
                           "python", "-c", script)
    assert code == 0, out
    _, gcs, _, cpus = next(line for line in out.splitlines() if line.startswith("GCS")).split()
    # The head's GCS port and CPU count; a private instance would have its own port and 7 CPUs.
    assert gcs.rsplit(":", 1)[1] == head.gcs_address.rsplit(":", 1)[1] and float(cpus) == head.head_cpus


def test_failed_job_exits_nonzero(head, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", TOKEN)  # the token from the environment this time
    code, out, err = run_cli(capsys, "submit", "--address", head.dashboard_url, "--",
                             "python", "-c", "raise SystemExit(3)")
    assert code == 1 and "FAILED" in err


def test_killed_client_job_runs_on_and_logs_reattach(head, capsys):
    """Kill the submitting `diffkd submit` process mid-job: the job finishes and the logs come back whole."""
    script = "import time\nfor i in range(6):\n    print('tick', i, flush=True); time.sleep(1)\n"
    env = dict(os.environ, RAY_AUTH_TOKEN=TOKEN)
    client = subprocess.Popen([sys.executable, "-m", "diffkd.cli", "submit", "--address", head.dashboard_url,
                               "--", "python", "-c", script],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        job_id = client.stdout.readline().strip()
        assert job_id.startswith("diffkd-"), client.stderr.read()
        while "tick 0" not in client.stdout.readline():  # the job is running and being followed
            pass
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
    ray_client = jobs.connect(head.dashboard_url, TOKEN)
    assert jobs.status(ray_client, job_id) in ("PENDING", "RUNNING")  # it outlived its client
    code, out, _ = run_cli(capsys, "jobs", "logs", "--follow", job_id, "--address", head.dashboard_url,
                           "--token", TOKEN)
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("tick")] == [f"tick {i}" for i in range(6)]


def test_stop(head, capsys):
    ray_client = jobs.connect(head.dashboard_url, TOKEN)
    job_id = jobs.submit(ray_client, jobs.JobSpec(command=["python", "-c", "import time; time.sleep(120)"]))
    deadline = time.monotonic() + 60
    while jobs.status(ray_client, job_id) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.5)
    code, out, _ = run_cli(capsys, "jobs", "stop", job_id, "--wait", "--address", head.dashboard_url,
                           "--token", TOKEN)
    assert code == 0 and f"{job_id}: STOPPED" in out
    code, _, err = run_cli(capsys, "jobs", "status", "no-such-job", "--address", head.dashboard_url,
                           "--token", TOKEN)
    assert code == 2 and "no job 'no-such-job'" in err
