"""Every file in cluster/ is checked against what will read it.

- the Ray cluster launcher YAML against Ray's own schema (``ray/autoscaler/ray-schema.json``, via
  ``prepare_config`` + ``validate_config``, exactly what ``ray up`` runs before touching a cloud);
- the KubeRay manifests for ``apiVersion: ray.io/v1``, their kinds and required fields;
- every job entrypoint they name exists in ``jobs/`` and its preset exists in ``configs/``;
- the runtime env file is one ``ray job submit --runtime-env`` accepts;
- the images are pinned, the head can launch workers (IAM policy in cluster/iam/), and the sizes add
  up: the arithmetic in cluster/aws.yaml's comments is redone here from the instance types' published
  specs and the presets, so a preset or node type changed alone fails a test.
"""

from __future__ import annotations

import json
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
    # The project is installed with its [vllm] extra on every node, after the pinned torch.
    assert any("[vllm]" in cmd for cmd in config["setup_commands"])
    assert any("torch==2.13.0" in cmd for cmd in config["setup_commands"])
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


# Published specs of the instance types the configs name (AWS instance type pages): vCPUs, memory
# GiB, GPUs, GPU memory GiB (usable, as nvidia-smi reports it), GPU model as GPU Feature Discovery labels it.
INSTANCE_SPECS = {
    "m6i.4xlarge": (16, 64, 0, 0, None),
    "g6.xlarge": (4, 16, 1, 22.5, "NVIDIA-L4"),
    "g5.12xlarge": (48, 192, 4, 22.5, "NVIDIA-A10G"),
}
OBJECT_STORE_FRACTION = 0.3  # Ray's default object store share of a node's memory
QWEN25_VL_7B_WEIGHTS_GIB = 16.6e9 / 2**30  # 8.3B parameters in bf16
QWEN25_VL_7B_KV_BYTES_PER_TOKEN = 28 * 2 * 4 * 128 * 2  # layers x (K, V) x KV heads x head dim x bf16
CAPTION_TOKENS = 1650 + 300  # prompt (text + at most 1280 image tokens) + a typical 3-field answer
PROFILING_GIB = 1.5  # vLLM's activation/profiling reserve for a 7B VLM at max_model_len 8192


def _preset(job: str, name: str) -> dict:
    result = subprocess.run([sys.executable, str(REPO / "jobs" / f"{job}.py"), "--preset", name, "--print-config"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_every_node_type_boots_a_pinned_image_the_wheels_can_run_on():
    config = _launcher_config()
    image = config["docker"]["image"]
    name, _, tag = image.partition(":")
    assert name == "rayproject/ray" and tag.startswith("2.60.0-py311"), "Ray 2.60 with Python 3.11 (the wheels need >= 3.11)"
    for node_type, spec in config["available_node_types"].items():
        ami = spec["node_config"].get("ImageId", "")
        # Without an ImageId Ray picks its default DLAMI (Ubuntu 18.04, old driver): never again.
        assert ami.startswith(("ami-", "resolve:ssm:/aws/service/deeplearning/")), node_type
        if INSTANCE_SPECS[spec["node_config"]["InstanceType"]][2]:
            check = " ".join(spec.get("initialization_commands", []))
            assert "driver_version" in check and "580" in check, f"{node_type}: GPU nodes check the driver first"
    assert "rayproject/ray:2.60.0-py311" in (CLUSTER / "Dockerfile").read_text()


def test_head_role_can_launch_the_workers_and_pass_only_their_role():
    config = _launcher_config()
    types = config["available_node_types"]
    head_profile = types[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    worker_profiles = {t["node_config"]["IamInstanceProfile"]["Name"] for k, t in types.items() if k != config["head_node_type"]}
    assert worker_profiles and head_profile not in worker_profiles, "workers get no EC2 rights"
    policy = json.loads((CLUSTER / "iam" / "head-policy.json").read_text())
    allowed = {a for st in policy["Statement"] if st["Effect"] == "Allow"
               for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    # What ray's AWSNodeProvider calls with cache_stopped_nodes: false, and what RunInstances needs.
    assert config["provider"]["cache_stopped_nodes"] is False
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "ec2:CreateTags", "ec2:DescribeInstances",
            "iam:PassRole", "ssm:GetParameters"} <= allowed
    passed = [st["Resource"] for st in policy["Statement"] if st["Action"] == "iam:PassRole"]
    assert passed == [f"arn:aws:iam::*:role/{name}" for name in sorted(worker_profiles)]
    bucket = json.loads((CLUSTER / "iam" / "bucket-policy.json").read_text())
    actions = {a for st in bucket["Statement"] for a in st["Action"]}
    assert {"s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject"} <= actions
    assert not any(a.startswith(("ec2:", "iam:")) for a in actions)


def _node(config: dict, name: str) -> tuple[dict, tuple]:
    spec = config["available_node_types"][name]
    return spec, INSTANCE_SPECS[spec["node_config"]["InstanceType"]]


def test_caption_node_and_preset_add_up():
    """cluster/aws.yaml's gpu_caption arithmetic, redone: KV cache vs sequences, object store vs
    batches in flight, CPUs for the engine vs CPU stages (which must fit on the head)."""
    config, qwen = _launcher_config(), _preset("caption", "paper-qwen")
    v, a = qwen["vllm"], qwen["actors"]
    caption, (cpus, mem_gib, gpus, gpu_gib, _) = _node(config, "gpu_caption")
    assert gpus == 1 and caption["resources"]["caption_node"] == gpus == v["tensor_parallel_size"]
    assert v["replica_resources"] == {"caption_node": 1}
    # KV cache: what is left of the GPU after weights and profiling, in whole captions.
    kv_gib = v["gpu_memory_utilization"] * gpu_gib - QWEN25_VL_7B_WEIGHTS_GIB - PROFILING_GIB
    concurrent = kv_gib * 2**30 / (QWEN25_VL_7B_KV_BYTES_PER_TOKEN * CAPTION_TOKENS)
    assert 0.8 * concurrent <= v["max_num_seqs"] <= concurrent, (kv_gib, concurrent)
    # The engine is kept full (requests in its queue >= what it runs), and not much more.
    in_engine = v["max_concurrent_batches"] * a["batch_size"]
    assert v["max_num_seqs"] <= in_engine <= 2.5 * v["max_num_seqs"]
    # Ray submits 2 x max_concurrent_batches batches to a replica; each row holds a decoded image.
    decoded_bytes = 2 * in_engine * v["max_pixels"] * 3
    assert decoded_bytes <= 0.1 * OBJECT_STORE_FRACTION * mem_gib * 2**30
    # CPUs: Ray sees exactly the replica's 1 CPU here (nothing else lands on a caption node) ...
    assert caption["resources"]["CPU"] == 1 and cpus - 1 >= 2, "vLLM's own processes keep >= 2 vCPUs"
    # ... and the four CPU stages at their maximum, plus image loads, fit on the head.
    head, (head_vcpus, _, head_gpus, _, _) = _node(config, config["head_node_type"])
    cpu_stages = 4 * v["cpu_stage_actors"] * v["cpu_stage_num_cpus"]
    assert head_gpus == 0 and cpu_stages + 2 * 0.5 <= head["resources"]["CPU"] <= head_vcpus - 2


def test_train_node_and_sweep_add_up():
    config = _launcher_config()
    train, (cpus, _, gpus, _, _) = _node(config, "gpu_train")
    assert train["resources"] == {"train_node": gpus}, "one train_node per GPU"
    run, sweep = _preset("train", "paper-msed-sentiment"), _preset("tune", "paper-msed-sentiment")
    assert run["node_resource"] == "train_node" and run["use_gpu"]
    per_trial_cpus = sweep["resources"]["num_workers"] * run["cpus_per_worker"] + 1  # + the trial's own CPU
    per_trial_gpus = sweep["resources"]["num_workers"] * sweep["resources"]["gpus_per_worker"]
    fits = min(cpus // per_trial_cpus, gpus / per_trial_gpus)
    space = sweep["search"]["space"]
    grid = len(space["K"]["grid"]) * len(space["lambda"]["grid"])
    assert sweep["max_concurrent_trials"] == min(fits, grid)


def test_kuberay_requests_fit_their_nodes_and_mirror_aws():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    aws = _launcher_config()["available_node_types"]
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    qwen = _preset("caption", "paper-qwen")["vllm"]

    def fits(template: dict, instance: str) -> dict:
        vcpus, mem_gib, gpus, _, product = INSTANCE_SPECS[instance]
        container = template["spec"]["containers"][0]
        requests = container["resources"]["requests"]
        assert requests == container["resources"]["limits"]
        assert float(requests["cpu"]) <= vcpus - 0.5 and int(requests["memory"].removesuffix("Gi")) <= 0.9 * mem_gib
        assert int(requests.get("nvidia.com/gpu", 0)) == gpus
        if gpus:
            terms = template["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            for term in terms["nodeSelectorTerms"]:
                by_key = {e["key"]: e for e in term["matchExpressions"]}
                driver = next(e for k, e in by_key.items() if k.startswith("nvidia.com/cuda.driver"))
                assert driver["operator"] == "Gt" and int(driver["values"][0]) >= 579
                assert by_key["nvidia.com/gpu.product"]["values"] == [product]
        return requests

    head = doc["spec"]["headGroupSpec"]
    fits(head["template"], aws["head"]["node_config"]["InstanceType"])
    assert int(head["rayStartParams"]["num-cpus"]) >= 4 * qwen["cpu_stage_actors"] * qwen["cpu_stage_num_cpus"] + 1
    for group, node_type in (("gpu-caption", "gpu_caption"), ("gpu-train", "gpu_train")):
        g = groups[group]
        fits(g["template"], aws[node_type]["node_config"]["InstanceType"])
        custom = json.loads(json.loads(g["rayStartParams"]["resources"]))
        assert custom == {k: v for k, v in aws[node_type]["resources"].items() if k != "CPU"}
        if "CPU" in aws[node_type]["resources"]:
            assert int(g["rayStartParams"]["num-cpus"]) == aws[node_type]["resources"]["CPU"]


@pytest.mark.ray
def test_a_paper_preset_trains_on_a_one_machine_ray_but_waits_for_train_nodes_on_a_joined_cluster(ray_cluster, monkeypatch):
    """The session cluster has no train_node (like a single GPU box): a job that started its own Ray drops
    the requirement instead of waiting forever; one that joined a cluster by address keeps it."""
    from umaf.config import load_config
    from umaf.train.config import TrainConfig
    from umaf.train.run import placeable

    cfg = load_config(TrainConfig, "train", preset="paper-msed-sentiment")
    assert cfg.node_resource == "train_node"
    assert placeable(cfg).node_resource is None
    joined = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": "10.0.0.1:6379"})})
    assert placeable(joined).node_resource == "train_node"
    # Inside a Tune trial (an experiment cell) RAY_ADDRESS is set: the runtime env the local Ray was
    # started with says whether that Ray is the job's own one-machine Ray.
    from umaf.raycluster import ONE_MACHINE_ENV

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert placeable(cfg).node_resource == "train_node"
    monkeypatch.setenv(ONE_MACHINE_ENV, "1")
    assert placeable(cfg).node_resource is None
