"""Joining or starting Ray: the one place every job does it.

A job joins the cluster named by ``ray.address`` (or ``RAY_ADDRESS``, which ``ray job submit`` sets
for its driver); with neither, it starts a local cluster on this machine and prints where its
dashboard is. Either way the driver's non-secret settings (:func:`job_env_vars`) follow the job to
every Ray process it starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from umaf import storage
from umaf.config import RayConfig

log = logging.getLogger("umaf")

# The driver's storage settings follow the job to its Ray processes (Train controller and workers
# write checkpoints to s3://, data tasks read images), as `ray job submit --runtime-env-json` would
# pass them: where the store is, never who you are (see storage.FORWARDED_ENV_VARS). Hub and cache
# settings (HF_HUB_OFFLINE, HF_HOME, ...) stay on the driver's machine: each node has its own disk
# and its own access to the hub, and HF_HUB_OFFLINE set on a laptop would stop every engine on the
# cluster from fetching its model. A user who wants one forwarded says so: ray.forward_env.
PROPAGATED_ENV = (*storage.FORWARDED_ENV_VARS, "RAY_AUTH_MODE")
# Names that hold credentials, or look like they do: never in a runtime env (the dashboard shows
# runtime envs to anyone who can open it), whoever asks. Nodes get credentials from their own chain.
SECRET_ENV_NAMES = frozenset({
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY", "AZURE_CLIENT_SECRET",
})
_SECRET_NAME = re.compile(r"(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|API_KEY|PRIVATE_KEY|ACCESS_KEY)(_|$)")
# What Ray processes of a umaf job always get. Their log lines all reach the driver's console (and
# `ray job logs`): libraries' redrawn progress bars and Ray Data's per-execution lines from inside
# Train workers (every epoch's dev pass) would bury the run's story there. The driver keeps Ray
# Data's own progress for the long stages it runs, and the jobs log their own progress lines.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "TQDM_DISABLE": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}


def looks_secret(name: str) -> bool:
    """Whether an environment variable name holds, or names like, a credential."""
    upper = name.upper()
    return upper in SECRET_ENV_NAMES or bool(_SECRET_NAME.search(upper))


def secrets_in(env: Mapping[str, str]) -> list[str]:
    """The entries of ``env`` that would leak a credential: a secret-looking name, or the value of
    one of this process's secret-looking variables under another name."""
    secret_values = {v for k, v in os.environ.items() if v and len(v) >= 6 and looks_secret(k)}
    return sorted(k for k, v in env.items() if looks_secret(k) or (v and v in secret_values))


def checked_runtime_env(env_vars: Mapping[str, str] | None, **fields: Any) -> dict[str, Any]:
    """A runtime env (``{"env_vars": ..., **fields}``) for a Ray process of a umaf job, refused when it
    would carry a credential. Every runtime env the jobs build goes through here (the driver's
    ``ray.init``, Train workers, Tune trials, caption/predict tasks and actors), so one test
    (tests/test_runtime_env_secrets.py) covers them all."""
    env = dict(env_vars or {})
    leaked = secrets_in(env)
    if leaked:
        raise ValueError(f"refusing to put {', '.join(leaked)} in a Ray runtime env (the dashboard shows it to "
                         "anyone): nodes take credentials from their own AWS chain (instance role, IRSA)")
    return {"env_vars": env, **fields} if env else dict(fields)


def job_env_vars(extra: Mapping[str, str] | None = None, forward: Sequence[str] = ()) -> dict[str, str]:
    """The driver's settings for its Ray processes, less those a submitted job's runtime env already
    sets: under ``ray job submit`` those reach every process anyway, and ``ray.init`` refuses a
    runtime env that names the same environment variable as the job's ("Failed to merge").
    ``forward`` names more of the driver's variables to pass on (``ray.forward_env``)."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {} if job_config else {}
    names = (*PROPAGATED_ENV, *forward)
    env = {**QUIET_ENV, **{k: os.environ[k] for k in names if os.environ.get(k)}, **(extra or {})}
    return {k: v for k, v in env.items() if k not in job_env}


def driver_runtime_env(ray_cfg: RayConfig, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The runtime env of the job's ``ray.init``: what every Ray process of the job inherits."""
    return checked_runtime_env(job_env_vars(extra_env, ray_cfg.forward_env))


def cluster_address(ray_cfg: RayConfig) -> str | None:
    """The cluster a job joins: ``ray.address``, else ``RAY_ADDRESS``; None starts a local one."""
    return ray_cfg.address or os.environ.get("RAY_ADDRESS") or None


# Set in the runtime env of a Ray this job started on its own machine (no autoscaler, no node types):
# a Tune trial of that Ray has RAY_ADDRESS set, yet must not wait for a node type to be started.
ONE_MACHINE_ENV = "UMAF_ONE_MACHINE_RAY"


def one_machine_ray(ray_cfg: RayConfig) -> bool:
    """Whether this process runs on a Ray the job started here (:func:`connect_ray`'s local cluster),
    directly or inside one of its tasks (a Tune trial, an experiment's cell)."""
    return cluster_address(ray_cfg) is None or os.environ.get(ONE_MACHINE_ENV) == "1"


def connect_ray(ray_cfg: RayConfig, extra_env: Mapping[str, str] | None = None,
                dashboard: bool | None = None) -> bool:
    """Join the cluster (``ray_cfg.address``, else ``RAY_ADDRESS``), or start a local one.

    ``extra_env`` is added to what every Ray process of the job gets; ``dashboard`` forces the local
    cluster's dashboard on (Train inside Tune needs it). Returns True when this call started or
    joined Ray, so the caller shuts it down; False when Ray was already initialised (a pipeline
    stage reuses its pipeline's connection).
    """
    import ray

    for key, value in (extra_env or {}).items():
        os.environ.setdefault(key, value)  # this driver's own Train controllers read them too
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"runtime_env": driver_runtime_env(ray_cfg, extra_env), "log_to_driver": True}
    address = cluster_address(ray_cfg)
    if address:
        context = ray.init(address=address, **kwargs)
        log.info("joined the Ray cluster at %s (dashboard: %s)", address, _dashboard_url(context))
        return True
    include_dashboard = ray_cfg.include_dashboard if dashboard is None else (dashboard or ray_cfg.include_dashboard)
    kwargs["runtime_env"] = driver_runtime_env(ray_cfg, {**(extra_env or {}), ONE_MACHINE_ENV: "1"})
    context = ray.init(address="local", num_cpus=ray_cfg.num_cpus, include_dashboard=include_dashboard, **kwargs)
    resources = ray.cluster_resources()
    log.info("started a local Ray cluster (%g CPUs, %g GPUs); dashboard: %s", resources.get("CPU", 0),
             resources.get("GPU", 0), _dashboard_url(context) if include_dashboard else "off (ray.include_dashboard=false)")
    return True


def _dashboard_url(context: Any) -> str:
    url = getattr(context, "dashboard_url", None)
    if not url:
        return "not running"
    return url if "://" in url else f"http://{url}"



# Set by umaf.cli.run_script: a failed job's exit status goes to the OS by os._exit.
_exits_hard_on_failure = False


def exit_hard_on_failure() -> None:
    global _exits_hard_on_failure
    _exits_hard_on_failure = True


@contextmanager
def ray_connection(ray_cfg: RayConfig, extra_env: Mapping[str, str] | None = None,
                   dashboard: bool | None = None) -> Iterator[bool]:
    """:func:`connect_ray` for the body of the ``with``; then shut Ray down if this job started or
    joined it. Yields whether it did.

    One exception: a script (:func:`umaf.cli.run_script`) that fails while joined to a cluster leaves
    without disconnecting. Disconnecting a driver with Ray Data work cut short can take tens of
    seconds, and a Ray thread that touches the core worker meanwhile ends the process with status 1
    ("The core worker has already been shutdown ... The process will exit"), losing the job's own
    status (2 for a storage outage). The script exits by ``os._exit`` at once instead; the cluster
    sees its driver leave and ends the job's actors and tasks. A local cluster the job started is
    always shut down, since nothing else would stop its processes.
    """
    import ray

    started = connect_ray(ray_cfg, extra_env, dashboard)
    disconnect = started
    try:
        yield started
    except BaseException as exc:
        succeeded = isinstance(exc, SystemExit) and exc.code in (0, None)
        if not succeeded and _exits_hard_on_failure and cluster_address(ray_cfg):
            disconnect = False
        raise
    finally:
        if disconnect:
            ray.shutdown()
