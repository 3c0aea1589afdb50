"""No credential reaches a Ray runtime env (the dashboard shows runtime envs to anyone who opens it).

Checked where it can fail: against the functions that build every runtime env the jobs use (the
driver's ``ray.init``, Train workers, Tune trials, caption data tasks and ray.data.llm actors,
predict actors), with credentials planted in this process's environment as a user's shell would hold
them. A new job joins by adding its builder to ``BUILDERS``; ``test_no_runtime_env_is_built_by_hand``
fails when code builds one without going through ``umaf.raycluster.checked_runtime_env``.

AWS_PROFILE is decided, not forwarded: it names a section of the driver machine's ~/.aws files,
which other nodes lack (botocore fails there instead of using the instance role); ``ray.forward_env``
forwards it on purpose where every node has that profile.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLANTED = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0000KEY",
    "AWS_SECRET_ACCESS_KEY": "planted-secret-access-key-value",
    "AWS_SESSION_TOKEN": "planted-session-token-value",
    "HF_TOKEN": "hf_plantedtokenvalue",
    "AWS_PROFILE": "planted-profile",
}
SETTINGS = {"AWS_ENDPOINT_URL": "http://minio.internal:9000", "AWS_REGION": "eu-west-1",
            "HF_HUB_OFFLINE": "1", "HF_HOME": "/planted/hf-home"}


def _driver():
    from umaf.config import RayConfig
    from umaf.raycluster import driver_runtime_env

    return driver_runtime_env(RayConfig(), {"UMAF_EXTRA": "1"})


def _train_workers():
    from umaf.train.config import TrainConfig
    from umaf.train.run import build_trainer

    cfg = TrainConfig(out="/tmp/umaf-secret-test-run")
    data = {"label_names": ["a", "b"], "task": "t", "dataset": "demo", "n_train": 1, "report": {},
            "majority_baseline": {}, "datasets": {}, "refs": {}, "source_positions": {},
            "official_order_from": "source_index", "context": None}
    return build_trainer(cfg, data).run_config.worker_runtime_env


def _tune_trials():
    from umaf.tune.config import TuneConfig
    from umaf.tune.sweep import trial_runtime_env

    return trial_runtime_env(TuneConfig().worker_start_timeout_s, "127.0.0.1:6379")


def _caption_tasks():
    from umaf.caption.pipeline import storage_runtime_env

    return storage_runtime_env()


def _caption_llm_actors():
    from umaf.caption.backends import vllm_processor_config
    from umaf.caption.config import CaptionConfig

    config = CaptionConfig(backend="vllm", model="s3://bucket/models/m", storage={"endpoint_url": "http://minio:9000"})
    return vllm_processor_config(config).runtime_env


def _predict_actors():
    from umaf.predict.pipeline import predict_runtime_env

    return predict_runtime_env()


BUILDERS = {"driver ray.init": _driver, "Train workers": _train_workers, "Tune trials": _tune_trials,
            "caption data tasks": _caption_tasks, "ray.data.llm actors": _caption_llm_actors,
            "predict actors": _predict_actors}


def leaks(runtime_env) -> list[str]:
    """This test's own check (not the code's): planted names, or planted values under any name."""
    text = json.dumps(runtime_env or {}, default=str)
    return [name for name, value in PLANTED.items() if name in text or value in text]


@pytest.fixture
def planted(monkeypatch):
    for name, value in {**PLANTED, **SETTINGS}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)


@pytest.mark.parametrize("builder", BUILDERS, ids=str)
def test_no_runtime_env_carries_a_planted_secret(planted, builder):
    env = BUILDERS[builder]()
    assert not leaks(env), f"{builder}: {leaks(env)} in {env}"
    env_vars = (env or {}).get("env_vars", {})
    # Hub and cache settings stay on the driver's machine unless asked for.
    assert not {"HF_HUB_OFFLINE", "HF_HOME"} & set(env_vars), f"{builder}: {env_vars}"
    if builder != "Tune trials":  # (trials inherit the driver's env; theirs adds only the cluster address)
        assert env_vars.get("AWS_ENDPOINT_URL", "").startswith("http://minio"), "where the store is still travels"


@pytest.mark.parametrize("builder", BUILDERS, ids=str)
def test_a_builder_that_would_forward_a_secret_is_refused(planted, builder, monkeypatch):
    """Plant a secret in what each builder forwards: the code refuses it, and this test's own check
    would have seen it (so the test above can fail)."""
    from umaf import raycluster, storage
    from umaf.tune import sweep

    monkeypatch.setattr(storage, "FORWARDED_ENV_VARS", (*storage.FORWARDED_ENV_VARS, "AWS_SECRET_ACCESS_KEY"))
    monkeypatch.setattr(raycluster, "PROPAGATED_ENV", (*raycluster.PROPAGATED_ENV, "AWS_SESSION_TOKEN"))
    monkeypatch.setattr(sweep, "WORKER_START_TIMEOUT_ENV", "AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ValueError, match="refusing to put AWS_"):
        BUILDERS[builder]()
    assert leaks({"env_vars": {"AWS_SECRET_ACCESS_KEY": PLANTED["AWS_SECRET_ACCESS_KEY"]}})
    assert leaks({"env_vars": {"INNOCENT_NAME": PLANTED["AWS_SESSION_TOKEN"]}})


def test_forwarding_is_opt_in_and_never_for_credentials(planted):
    from umaf.config import ConfigError, RayConfig, validate
    from umaf.raycluster import driver_runtime_env

    env = driver_runtime_env(RayConfig(forward_env=["HF_HUB_OFFLINE", "AWS_PROFILE"]))["env_vars"]
    assert env["HF_HUB_OFFLINE"] == "1" and env["AWS_PROFILE"] == "planted-profile"
    for name in ("AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "MY_API_KEY"):
        with pytest.raises(ConfigError, match=name):
            validate(RayConfig, {"forward_env": [name]}, source="test")


def test_no_runtime_env_is_built_by_hand():
    """Every ``{"env_vars": ...}`` in umaf/ and jobs/ is built by raycluster.checked_runtime_env, so the
    builders above are all there is."""
    found = []
    for path in [*(REPO / "umaf").rglob("*.py"), *(REPO / "jobs").glob("*.py")]:
        if path.name == "raycluster.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "env_vars" for k in node.keys):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"runtime envs built outside checked_runtime_env: {found}"
