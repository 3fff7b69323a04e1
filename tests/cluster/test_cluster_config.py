"""ray_cluster.yaml passes Ray's own launcher validation; cluster/ manifests agree on versions and names."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

import diffkd

ROOT = Path(__file__).resolve().parents[2]


def launcher_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: fill defaults, then validate against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def launcher_config() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_ray_launcher_validation(launcher_config):
    prepared = launcher_validate(launcher_config)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    gpu_instances = {t["node_config"]["InstanceType"] for name, t in types.items() if name.startswith("gpu.")}
    assert {"p5.48xlarge", "p4d.24xlarge"} <= gpu_instances
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]


@pytest.mark.parametrize("where", ["top", "node_type", "docker", "negative_gpus"])
def test_launcher_validation_rejects_a_bad_config(launcher_config, where):
    bad = copy.deepcopy(launcher_config)
    if where == "top":
        bad["max_worker"] = 3  # a typo of max_workers
    elif where == "node_type":
        bad["available_node_types"]["gpu.h100x8"]["min_worker"] = 1
    elif where == "docker":
        bad["docker"]["imag"] = "x"
    else:
        bad["available_node_types"]["gpu.a100x8"]["resources"] = {"GPU": -1}
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        launcher_validate(bad)


def test_launcher_config_pins_this_diffkd_and_this_ray(launcher_config):
    wheel = f"diffkd-{diffkd.__version__}-py3-none-any.whl"
    assert any(wheel in cmd for cmd in launcher_config["setup_commands"])
    assert launcher_config["file_mounts"]["~/diffkd-dist"] == "./dist"
    for key in ("image", "head_image"):
        assert launcher_config["docker"][key].startswith(f"rayproject/ray:{ray.__version__}-")
    assert all("RAY_AUTH_MODE=token" in " ".join(cmds) for cmds in
               (launcher_config["head_start_ray_commands"], launcher_config["worker_start_ray_commands"]))


def test_dockerfile_pins_versions_and_keeps_context_small():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"ARG RAY_IMAGE=rayproject/ray:{re.escape(ray.__version__)}-py311-gpu", dockerfile)
    assert f"ARG DIFFKD_VERSION={diffkd.__version__}" in dockerfile
    assert f"ray.__version__ == '{ray.__version__}'" in dockerfile
    ignore = (ROOT / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:3] == ["!pyproject.toml", "!README.md", "!diffkd/"]


def test_kuberay_manifests_agree():
    kuberay = ROOT / "cluster" / "kuberay"
    cluster = yaml.safe_load((kuberay / "raycluster.yaml").read_text())
    job = yaml.safe_load((kuberay / "rayjob.yaml").read_text())
    pvc = yaml.safe_load((kuberay / "storage.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    assert cluster["spec"]["authOptions"]["mode"] == "token"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("diffkd ")

    pod_specs = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]
    for spec in pod_specs:
        assert all(c["image"].endswith(f"/diffkd:{diffkd.__version__}") for c in spec["containers"])
        claims = {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {pvc["metadata"]["name"]}
    gpu_groups = [g for g in cluster["spec"]["workerGroupSpecs"]
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in gpu_groups)


def test_every_node_type_has_its_own_security_group_so_ray_opens_no_ssh_to_the_world(launcher_config):
    """Ray's AWS set-up creates a group with SSH from 0.0.0.0/0 for any node type that names none."""
    groups = {name: t["node_config"].get("SecurityGroupIds") for name, t in
              launcher_config["available_node_types"].items()}
    assert all(groups.values()), groups


@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0", "203.0.113.7"])
def test_the_security_group_script_refuses_an_open_or_malformed_range(cidr):
    import subprocess

    done = subprocess.run(["bash", str(ROOT / "cluster" / "aws_security_group.sh"), cidr],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 2 and cidr in done.stderr  # refused before any aws call


def test_kuberay_pods_run_as_non_root_without_privileges_behind_a_network_policy():
    kuberay = ROOT / "cluster" / "kuberay"
    cluster = yaml.safe_load((kuberay / "raycluster.yaml").read_text())
    job = yaml.safe_load((kuberay / "rayjob.yaml").read_text())
    policy = yaml.safe_load((kuberay / "networkpolicy.yaml").read_text())
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"], job["spec"]["submitterPodTemplate"]["spec"]]
    pods += [group["template"]["spec"] for group in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context.get("privileged", False) is False
    assert (policy["apiVersion"], policy["kind"]) == ("networking.k8s.io/v1", "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    outside = [rule for rule in policy["spec"]["ingress"] if "ports" in rule]
    assert {p["port"] for rule in outside for p in rule["ports"]} == {8265, 10001}
    client = outside[0]["from"][0]["podSelector"]["matchLabels"]
    assert job["spec"]["submitterPodTemplate"]["metadata"]["labels"].items() >= client.items()
