"""What a user types, as a user types it: relative paths from another folder, and bad input.

- Paths: every local path is made absolute on the driver (config validation), against the working
  directory or ``$UMAF_WORKDIR``; Train workers and Tune trials run elsewhere and must still write
  where the user pointed. Tune (whose trials are Train runs) runs from a temporary working directory
  with a relative ``--out``; the pipeline (prepare, train) runs through the Jobs API with a relative
  ``--out`` and ``UMAF_WORKDIR``.
- Errors: a missing manifest, an S3 endpoint that does not answer and refused credentials each end
  in one line naming the URI, exit status 2 and no traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port
from umaf.config import WORKDIR_ENV, absolute_path, model_reference
from umaf.train.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
JOBS = REPO_ROOT / "jobs"


def run_job(job: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, str(JOBS / f"{job}.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------------------------
# Paths: the rule


def test_relative_paths_are_made_absolute_against_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    assert absolute_path("runs/r1") == str(tmp_path / "runs" / "r1")
    assert absolute_path("./a/../b") == str(tmp_path / "b")
    assert absolute_path("~/x") == str(Path.home() / "x")
    assert absolute_path("/abs/p") == "/abs/p"
    for uri in ("s3://bucket/prefix", "file:///tmp/x"):
        assert absolute_path(uri) == uri
    monkeypatch.setenv(WORKDIR_ENV, "/somewhere/else")
    assert absolute_path("runs/r1") == "/somewhere/else/runs/r1"


def test_config_paths_and_defaults_are_absolute_and_stable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    cfg = TrainConfig(manifest="data/manifest", captions="s3://b/captions")
    assert cfg.manifest == str(tmp_path / "data" / "manifest")
    assert cfg.captions == "s3://b/captions"
    assert cfg.out == str(tmp_path / "runs" / "train")  # the default, too
    # A worker re-validates the dumped config in another folder: nothing moves.
    monkeypatch.chdir("/")
    again = TrainConfig.model_validate(cfg.model_dump(mode="json"))
    assert (again.manifest, again.out) == (cfg.manifest, cfg.out)


def test_model_references_keep_hub_ids_and_resolve_local_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-encoder").mkdir()
    assert model_reference("roberta-base") == "roberta-base"
    assert model_reference("tiny-random-bert") == "tiny-random-bert"
    assert model_reference("my-encoder") == str(tmp_path / "my-encoder")  # exists here: a folder
    assert model_reference("./later") == str(tmp_path / "later")  # written as a path


def test_relative_path_under_ray_job_submit_is_called_out(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(WORKDIR_ENV, raising=False)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with caplog.at_level("WARNING", logger="umaf.config"):
        assert absolute_path("runs/submitted") == str(tmp_path / "runs" / "submitted")
    assert "runs/submitted" in caplog.text and WORKDIR_ENV in caplog.text


# --------------------------------------------------------------------------------------------
# Errors: one line, exit 2, no traceback


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-3000:]


def test_missing_manifest_is_one_clean_line_for_every_job(tmp_path):
    for job in ("train", "caption"):
        result = run_job(job, "--manifest", "nowhere/manifest", cwd=tmp_path, timeout=120)
        assert_clean_error(result, f"jobs/{job}.py: error: manifest {tmp_path / 'nowhere' / 'manifest'} does not exist",
                           "jobs/prepare.py")
    result = run_job("tune", "--out", "sweeps", "--resume", cwd=tmp_path, timeout=120)
    assert_clean_error(result, "no sweep to resume at", str(tmp_path / "sweeps"))
    debug = run_job("train", "--manifest", "nowhere/manifest", "--debug", cwd=tmp_path, timeout=120)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "does not exist" in debug.stderr
    assert not (tmp_path / "runs").exists()  # nothing written before the check


def test_s3_endpoint_down_and_refused_credentials_are_one_clean_line(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"AWS_ENDPOINT_URL": dead, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}
    result = run_job("train", "--manifest", "s3://bucket/manifest", cwd=tmp_path, env=env, timeout=180)
    assert_clean_error(result, "s3://bucket/manifest", f"cannot reach the S3 endpoint {dead}")

    # A real S3 server that checks credentials (moto enforces IAM auth once its free request count,
    # here 0, is used up): unknown keys are refused.
    port = free_port()
    log = open(tmp_path / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        import socket

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        result = run_job("caption", "--manifest", "s3://bucket/manifest", cwd=tmp_path, env=env, timeout=180)
        assert_clean_error(result, "s3://bucket/manifest", "refused our credentials")
    finally:
        server.terminate()
        server.wait(timeout=30)


# --------------------------------------------------------------------------------------------
# Paths: real runs from another folder


@pytest.mark.ray
@pytest.mark.slow
def test_tune_and_its_trials_write_where_a_relative_out_points(tmp_path, ray_head_cluster):
    """From a temporary working directory (not the repository), `--out sweeps` lands under that
    directory: the sweep's results and its two trial runs (one after the other under
    max_concurrent_trials=1), each with what a Train run writes from its workers: metrics.json,
    history, predictions and TensorBoard files. Before the fix, rank 0 wrote into its Ray session
    folder (the workers of the session's cluster run in the head's session folder, as on any cluster).
    A trial is a Train run like `jobs/train.py --out runs/rel`; train's own relative `--out` runs in
    the pipeline test below (through the Jobs API) and in CI's quick start."""
    address = f"ray.address={ray_head_cluster.gcs_address}"
    sweep = run_job(
        "tune", "--out", "sweeps", "name=rel", "train.epochs=1", "train.max_rows_per_split=48",
        "search.space={K: {grid: [2, 4]}}", "scheduler.kind=fifo", "max_concurrent_trials=1", address,
        cwd=tmp_path,
    )
    assert sweep.returncode == 0, sweep.stderr[-4000:]
    root = tmp_path / "sweeps" / "rel"
    assert (root / "results.parquet").is_file() and (root / "best_config.yaml").is_file()
    trial_metrics = list((root / "runs").glob("*/metrics.json"))
    assert len(trial_metrics) == 2, sorted(str(p) for p in root.rglob("metrics.json"))
    for run in (p.parent for p in trial_metrics):
        for name in ("history.json", "config.yaml", "predictions/test.parquet"):
            assert (run / name).is_file(), f"{name} missing under {run}: {sorted(p.name for p in run.iterdir())}"
        assert any((run / "tensorboard").iterdir())
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 1

    # max_concurrent_trials caps a grid search too (Ray Tune applies it only to a Searcher; a grid is
    # a BasicVariantGenerator): with a cap of 1, no trial starts before the previous one ended. A
    # trial writes config.yaml first and metrics.json last.
    spans = sorted(((p.parent / "config.yaml").stat().st_mtime_ns, p.stat().st_mtime_ns) for p in trial_metrics)
    (first_start, first_end), (second_start, second_end) = spans
    assert first_start < first_end and second_start < second_end
    assert second_start >= first_end, f"the trials overlapped by {(first_end - second_start) / 1e9:.1f} s: {spans}"


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_pipeline_under_ray_job_submit_writes_where_the_user_pointed(tmp_path, ray_head_cluster):
    """`ray job submit --working-dir . -- python jobs/pipeline.py --out outputs/rel` with UMAF_WORKDIR
    set to the submitting folder: the outputs land there (not in Ray's temporary copy of the working
    dir), and `ray job logs` tells the run's story without progress-bar redraws from Train workers."""
    from ray.job_submission import JobSubmissionClient

    from ray_head import job_runtime_env_vars

    user_dir = tmp_path / "user"
    user_dir.mkdir()
    client = JobSubmissionClient(ray_head_cluster.dashboard_url)
    job_id = None
    try:
        entrypoint = [
            sys.executable, "jobs/pipeline.py", "--out", "outputs/rel", "--stages", "prepare,train",
            "prepare.overrides=[demo.n_train=48, demo.n_dev=24, demo.n_test=24]",
            "train.overrides=[epochs=2, num_workers=1, batch_size=16, umaf.use_captions=false]",
        ]
        job_id = client.submit_job(
            entrypoint=shlex.join(entrypoint),
            runtime_env={"working_dir": str(REPO_ROOT),
                         "excludes": [".git", ".venv", "outputs", "runs", "bench", ".pytest_cache", "**/__pycache__"],
                         "env_vars": {**job_runtime_env_vars(), WORKDIR_ENV: str(user_dir)}},
        )
        deadline = time.time() + 1200
        status = None
        while time.time() < deadline:
            status = str(client.get_job_status(job_id).value)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(3)
        logs = client.get_job_logs(job_id)
        assert status == "SUCCEEDED", f"job {status}:\n{logs[-6000:]}"
    finally:
        if job_id and str(client.get_job_status(job_id).value) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            client.stop_job(job_id)
    run = user_dir / "outputs" / "rel" / "runs" / "train"
    assert (run / "metrics.json").is_file(), logs[-4000:]
    assert (user_dir / "outputs" / "rel" / "pipeline_summary.json").is_file()
    # The story: stage lines, one line per epoch, the closing table; no Ray Data bars from workers.
    assert "== stage 1/2 prepare" in logs and "== stage 2/2 train" in logs
    assert "pipeline finished:" in logs and str(run) in logs
    assert "epoch 1/2 | train" in logs and "epoch 2/2 | train" in logs, "one line per epoch from rank 0"
    assert "Running Dataset" not in logs, [line for line in logs.splitlines() if "Running Dataset" in line][:5]
    assert len(logs.splitlines()) < 300, f"{len(logs.splitlines())} lines of job logs"


def test_reported_errors_one_line_for_user_errors_and_the_traceback_for_bugs(capsys):
    """A bug's traceback is printed by the job itself: under Ray's driver excepthook it could be lost."""
    from umaf.cli import reported_errors
    from umaf.errors import UserError

    with pytest.raises(SystemExit) as stop, reported_errors("caption"):
        raise UserError("cannot write 4 captions to s3://b/x: rerun when storage is back")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("jobs/caption.py: error: cannot write 4 captions to s3://b/x") and "Traceback" not in err

    def a_bug():
        return {}["missing-key"]

    with pytest.raises(SystemExit) as stop, reported_errors("train"):
        a_bug()
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in a_bug" in err and "KeyError: 'missing-key'" in err


def test_run_script_exits_with_the_jobs_status_even_if_a_thread_would_exit_otherwise(tmp_path):
    """A job's chosen status reaches the shell, though a leftover thread would end the process otherwise
    (as Ray's core worker does, with status 1, when an abandoned iterator touches it after shutdown)."""
    script = tmp_path / "job.py"
    script.write_text(
        "import atexit, os, sys\n"
        "from umaf.cli import run_script\n"
        "atexit.register(lambda: os._exit(1))  # what a late touch of a shut-down core worker does\n"
        "def main():\n"
        "    print('jobs/x.py: error: storage down', file=sys.stderr)\n"
        "    raise SystemExit(2)\n"
        "run_script(main)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 2 and "storage down" in done.stderr, (done.returncode, done.stderr)



JOINED_JOB = """
import sys, ray
from umaf.cli import run_ray_job, run_script
from umaf.config import RayConfig
from umaf.errors import UserError

real_shutdown = ray.shutdown
def shutdown(*args, **kwargs):
    print("ray.shutdown called", flush=True)
    real_shutdown(*args, **kwargs)
ray.shutdown = shutdown

def work():
    assert ray.is_initialized()
    raise UserError("cannot write 4 captions to s3://b/x: rerun when storage is back")

def main():
    run_ray_job("caption", RayConfig(address=sys.argv[1]), lambda: None, work)

if sys.argv[2] == "script":
    run_script(main)
else:
    try:
        main()
    except SystemExit as stop:
        print("in-process exit", stop.code, "connected:", ray.is_initialized(), flush=True)
"""


@pytest.mark.ray
def test_a_failed_script_joined_to_a_cluster_exits_with_its_status_without_disconnecting(tmp_path, ray_head_cluster):
    """Disconnecting a failed driver can take tens of seconds, during which a Ray thread touching the
    core worker would end the process with status 1: a script leaves at once with its own status.
    Called in-process (a notebook, a pipeline stage), the same failure still disconnects."""
    script = tmp_path / "joined_job.py"
    script.write_text(JOINED_JOB)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)

    as_script = subprocess.run([sys.executable, str(script), ray_head_cluster.gcs_address, "script"],
                               capture_output=True, text=True, timeout=180, env=env)
    assert as_script.returncode == 2, as_script.stderr[-3000:]
    assert "jobs/caption.py: error: cannot write 4 captions" in as_script.stderr
    assert "ray.shutdown called" not in as_script.stdout

    in_process = subprocess.run([sys.executable, str(script), ray_head_cluster.gcs_address, "in-process"],
                                capture_output=True, text=True, timeout=180, env=env)
    assert in_process.returncode == 0, in_process.stderr[-3000:]
    assert "ray.shutdown called" in in_process.stdout
    assert "in-process exit 2 connected: False" in in_process.stdout
