"""Every file in cluster/ is checked against what will read it.

- the Ray cluster launcher YAML against Ray's own schema (``ray/autoscaler/ray-schema.json``, via
  ``prepare_config`` + ``validate_config``, exactly what ``ray up`` runs before touching a cloud);
- the KubeRay manifests for ``apiVersion: ray.io/v1``, their kinds and required fields;
- every job entrypoint they name exists in ``jobs/`` and its preset exists in ``configs/``;
- the runtime env file is one ``ray job submit --runtime-env`` accepts.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _entrypoints() -> list[tuple[str, str]]:
    found = []
    for path in KUBERAY:
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") == "RayJob":
            found.append((path.name, doc["spec"]["entrypoint"]))
    return found


def _launcher_config() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def test_launcher_config_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_launcher_config())
    validate_config(config)  # raises jsonschema.ValidationError naming the offending key
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    # One GPU node type for captioning and one for training, both able to scale to zero.
    assert {"gpu_caption", "gpu_train"} <= set(node_types)
    assert all(node_types[name]["min_workers"] == 0 for name in ("gpu_caption", "gpu_train"))
    # S3 through an instance role: no key material anywhere in the file.
    text = (CLUSTER / "aws.yaml").read_text()
    assert "IamInstanceProfile" in text
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"):
        assert secret not in text
    # The project is installed with its [vllm] extra on every node.
    assert any("[vllm]" in cmd for cmd in config["setup_commands"])
    # Fresh cloud nodes run no Ray yet; the start commands must not stop clusters.
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" not in cmd


def test_launcher_schema_rejects_a_broken_config():
    """The check above is a real one: a misspelt key is caught."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher_config()
    config["max_workerz"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_workerz"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_shape(path: Path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] in {"RayCluster", "RayJob"}
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    if doc["kind"] == "RayCluster":
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        head_containers = head["template"]["spec"]["containers"]
        assert head_containers and head_containers[0]["image"]
        groups = spec["workerGroupSpecs"]
        assert groups
        for group in groups:
            for key in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
                assert key in group, f"{path.name}: worker group lacks {key}"
            container = group["template"]["spec"]["containers"][0]
            assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert spec["rayVersion"].split(".")[:2] == ["2", "60"]
    else:
        assert spec["entrypoint"].strip()
        # Either a selector of the RayCluster above or a cluster spec of its own.
        assert "clusterSelector" in spec or "rayClusterSpec" in spec
        if "clusterSelector" in spec:
            cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
            assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        yaml.safe_load(spec.get("runtimeEnvYAML", "{}"))


def test_rayjobs_cover_caption_train_and_tune():
    scripts = {shlex.split(entry)[1] for _, entry in _entrypoints()}
    assert {"jobs/caption.py", "jobs/train.py", "jobs/tune.py"} <= scripts


@pytest.mark.parametrize("name,entrypoint", _entrypoints(), ids=lambda v: v if v.endswith(".yaml") else "")
def test_entrypoint_names_an_existing_job_and_preset(name: str, entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[0] == "python", f"{name}: entrypoint should run python, got {argv[0]}"
    script = REPO / argv[1]
    assert script.is_file(), f"{name}: {argv[1]} does not exist"
    # The job's own parser resolves the preset, flags and overrides and prints the config, so a
    # misspelt flag, preset or key in a manifest fails here rather than on the cluster.
    result = subprocess.run(
        [sys.executable, str(script), *argv[2:], "--print-config"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"{name}: {result.stderr}"
    assert yaml.safe_load(result.stdout)


def test_runtime_env_file_is_accepted_by_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields or bad types
    assert ".git" in env["excludes"]
