"""The caption job submitted through the Jobs API, writing to the S3 test server with no credentials in
its runtime env.

The session's Ray head takes the job (``ray start --head`` on free ports, stopped by PID, never
``ray stop``; see ``ray_head_cluster`` in conftest.py). The project's policy is that a job forwards
where the object store is (endpoint, region) and never who you are: the nodes find credentials in
their own environment (an instance role on a real cluster; here the S3 test server's fake keys,
inherited when ``ray start`` ran). This test submits with exactly what the jobs forward and checks
that the captions still reach ``s3://``, and that no secret shows in the job's runtime env, which the
dashboard displays to anyone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ray_head import job_runtime_env_vars, submit_and_wait
from umaf.caption.store import read_captions
from umaf.data.demo import write_demo
from umaf.data.manifest import read_manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_caption_job_through_jobs_api_writes_to_s3_without_credentials(ray_head_cluster, s3_bucket, tmp_path,
                                                                        tiny_vlm_cache):
    from ray.job_submission import JobSubmissionClient

    demo = write_demo(str(tmp_path / "demo"), n_train=6, n_dev=2, n_test=2)
    out = f"{s3_bucket}/captions"
    env = job_runtime_env_vars()
    assert env["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:"), "the job is told where the store is"
    assert not set(env) & set(SECRETS), f"credentials in a job's runtime env: {sorted(set(env) & set(SECRETS))}"
    client = JobSubmissionClient(ray_head_cluster.dashboard_url)
    job_id, status, logs = submit_and_wait(
        client,
        f"{sys.executable} jobs/caption.py --manifest {demo['manifest']} --out {out} model_cache_dir={tiny_vlm_cache}",
        {"working_dir": str(REPO_ROOT), "env_vars": env,
         "excludes": [".venv/", ".git/", "outputs/", "runs/", "**/__pycache__/", "*.parquet"]},
        timeout=600,
    )
    assert status == "SUCCEEDED", logs[-4000:]
    ids = read_manifest(demo["manifest"]).table["id"].to_pylist()
    assert sorted(read_captions(out)["id"].to_pylist()) == sorted(ids), "every id captioned exactly once, on s3://"
    assert "[caption dataset=demo stage=summary]" in logs
    # What the dashboard shows of the job holds no secret (names or the test keys' values).
    shown = json.dumps(client.get_job_info(job_id).runtime_env)
    assert not any(name in shown for name in SECRETS)
