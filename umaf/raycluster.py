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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from umaf import storage
from umaf.config import RayConfig

log = logging.getLogger("umaf")

# The driver's storage and hub settings follow the job to its Ray processes (Train controller and
# workers write checkpoints to s3://, data tasks read images), as `ray job submit --runtime-env-json`
# would pass them. Credentials are not among them (see storage.FORWARDED_ENV_VARS).
PROPAGATED_ENV = (
    *storage.FORWARDED_ENV_VARS, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "UMAF_ENCODER_CACHE",
    "RAY_AUTH_MODE",
)
# What Ray processes of a umaf job always get. Their log lines all reach the driver's console (and
# `ray job logs`): libraries' redrawn progress bars and Ray Data's per-execution lines from inside
# Train workers (every epoch's dev pass) would bury the run's story there. The driver keeps Ray
# Data's own progress for the long stages it runs, and the jobs log their own progress lines.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "TQDM_DISABLE": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}


def job_env_vars(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The driver's settings for its Ray processes, less those a submitted job's runtime env already
    sets: under ``ray job submit`` those reach every process anyway, and ``ray.init`` refuses a
    runtime env that names the same environment variable as the job's ("Failed to merge")."""
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    job_env = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {} if job_config else {}
    env = {**QUIET_ENV, **{k: os.environ[k] for k in PROPAGATED_ENV if os.environ.get(k)}, **(extra or {})}
    return {k: v for k, v in env.items() if k not in job_env}


def cluster_address(ray_cfg: RayConfig) -> str | None:
    """The cluster a job joins: ``ray.address``, else ``RAY_ADDRESS``; None starts a local one."""
    return ray_cfg.address or os.environ.get("RAY_ADDRESS") or None


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
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": job_env_vars(extra_env)}, "log_to_driver": True}
    address = cluster_address(ray_cfg)
    if address:
        context = ray.init(address=address, **kwargs)
        log.info("joined the Ray cluster at %s (dashboard: %s)", address, _dashboard_url(context))
        return True
    include_dashboard = ray_cfg.include_dashboard if dashboard is None else (dashboard or ray_cfg.include_dashboard)
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
