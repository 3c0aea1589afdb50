"""jobs/train.py on a real local Ray cluster: the tiny preset trains UMAF on the demo dataset into a
local run folder and into s3:// (moto server), resumes after its driver is SIGKILLed mid-run, and
beats the majority-class baseline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import job_main, wait_for_killed_driver_job
from umaf import storage

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from umaf.data.demo import write_demo

    return write_demo(str(tmp_path_factory.mktemp("demo")))


@pytest.fixture(scope="module")
def encoder_cache(tmp_path_factory):
    from umaf.models.encoders import build_tiny_random_bert

    cache = tmp_path_factory.mktemp("encoders")
    build_tiny_random_bert(cache)
    return str(cache)


def data_args(demo, encoder_cache):
    return ["--manifest", demo["manifest"], "--captions", demo["reference_captions"], "--task", "sentiment",
            f"umaf.encoder_cache={encoder_cache}"]


@pytest.mark.timeout(600)
def test_tiny_preset_trains_locally_and_beats_majority_baseline(ray_cluster, demo, encoder_cache, tmp_path):
    sys.path.insert(0, str(REPO / "jobs"))
    import train as train_job

    out = tmp_path / "run"
    metrics = train_job.main(["--model", "umaf", "--out", str(out), *data_args(demo, encoder_cache), "epochs=4"])

    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    test, baseline = metrics["test"], metrics["majority_baseline"]["test"]
    assert metrics["best_metric"] == "weighted_f1" and metrics["world_size"] == 2
    assert test["weighted_f1"] > baseline["weighted_f1"] + 0.2, (test, baseline)
    assert test["accuracy"] > baseline["accuracy"] + 0.2
    assert set(test["per_class"]) == {"negative", "neutral", "positive"}
    assert sum(map(sum, test["confusion_matrix"])) == test["n"] == 60
    assert metrics["data"]["splits"]["train"] == {"pairs": 240, "with_caption": 240, "without_caption": 0}

    preds = pq.read_table(out / "predictions" / "test.parquet")
    assert preds.num_rows == 60 and set(preds.column_names) >= {"id", "label", "pred", "probs", "pred_name"}
    acc = sum(a == b for a, b in zip(preds["label"].to_pylist(), preds["pred"].to_pylist())) / 60
    assert acc == pytest.approx(test["accuracy"])
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "model.json").is_file() and (out / "config.yaml").is_file()
    checkpoints = sorted(p for p in out.glob("checkpoint_*") if p.is_dir())
    assert 1 <= len(checkpoints) <= 2  # checkpoints_to_keep=2: best and latest
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    assert state["next_epoch"] == 4 and (checkpoints[-1] / "optimizer.pt").is_file()



@pytest.mark.timeout(600)
def test_best_checkpoint_is_the_best_dev_epoch_and_tests_that_model(ray_cluster, demo, encoder_cache, tmp_path):
    """``best/model.safetensors`` and ``metrics.best_epoch`` are the epoch with the highest dev metric (here the
    ``best_metric=accuracy`` override), and the final dev/test metrics come from that model, not the
    last one. The last epoch is ruined on purpose (StepLR multiplies the learning rate by 1000 after
    epoch 1), so the best epoch cannot be the last and the two models can be told apart."""
    out = tmp_path / "run"
    metrics = job_main("train")(["--model", "umaf", "--out", str(out), *data_args(demo, encoder_cache), "epochs=3",
                                 "num_workers=1", "best_metric=accuracy", "scheduler=step", "step_size=2",
                                 "gamma=1000"])
    history = json.loads((out / "history.json").read_text())
    dev = [h["dev_accuracy"] for h in history]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert dev[2] < max(dev[:2]), f"the 1000x learning rate did not ruin the last epoch: {dev}"
    best = dev.index(max(dev))  # the loop keeps the first of equal values
    assert metrics["best_metric"] == "accuracy" and metrics["best_epoch"] == best
    assert all(h["best_epoch"] == dev.index(max(dev[:h["epoch"] + 1])) for h in history)
    state = json.loads((out / "best" / "state.json").read_text())
    assert state["epoch"] == best and state["metric"] == "accuracy" and state["value"] == pytest.approx(dev[best])
    # The final evaluation loaded best/: its dev accuracy is the best epoch's, not the last's.
    assert metrics["dev"]["accuracy"] == pytest.approx(dev[best]) and metrics["dev"]["accuracy"] != pytest.approx(dev[2])
    preds = pq.read_table(out / "predictions" / "test.parquet")
    acc = sum(a == b for a, b in zip(preds["label"].to_pylist(), preds["pred"].to_pylist())) / preds.num_rows
    assert acc == pytest.approx(metrics["test"]["accuracy"])
    assert metrics["test"]["accuracy"] > metrics["majority_baseline"]["test"]["accuracy"]


def test_bad_training_inputs_stop_before_any_worker_starts(ray_cluster, demo, encoder_cache, tmp_path, capsys):
    """A ``task`` the manifest does not label, and a split that ``missing_caption=drop`` empties (dev
    ids have no caption here), end the job with a message naming the problem, before any training."""
    import pyarrow.compute as pc

    from umaf.caption.store import read_captions

    train = job_main("train")
    with pytest.raises(SystemExit) as exc:
        train(["--model", "umaf", "--out", str(tmp_path / "bad-task"), *data_args(demo, encoder_cache)[:4],
               "--task", "emotion", f"umaf.encoder_cache={encoder_cache}"])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert "task 'emotion' is not in manifest" in err and "sentiment" in err

    captions = read_captions(demo["reference_captions"])
    no_dev = captions.filter(pc.invert(pc.match_substring(captions["id"], "-dev-")))
    assert 0 < no_dev.num_rows < captions.num_rows, "demo dev ids contain '-dev-'"
    partial = tmp_path / "captions-no-dev"
    partial.mkdir()
    pq.write_table(no_dev, partial / "part-0.parquet")
    with pytest.raises(SystemExit) as exc:
        train(["--model", "umaf", "--out", str(tmp_path / "no-dev"), "--manifest", demo["manifest"],
               "--captions", str(partial), "missing_caption=drop", f"umaf.encoder_cache={encoder_cache}"])
    assert exc.value.code != 0
    assert "no 'dev' rows left for training" in capsys.readouterr().err
    assert not (tmp_path / "no-dev" / "metrics.json").exists() and not list((tmp_path / "no-dev").glob("checkpoint_*"))

def _latest_checkpoint_state(run_uri: str) -> dict | None:
    snapshot_uri = storage.join(run_uri, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot_uri):
        return None
    snapshot = storage.read_json(snapshot_uri)
    if isinstance(snapshot, str):  # Ray stores the snapshot as a JSON string inside JSON
        snapshot = json.loads(snapshot)
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    name = latest["checkpoint_dir_name"]
    return storage.read_json(storage.join(run_uri, name, "state.json"))


def _driver(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "train.py"), *args], cwd=REPO,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=dict(os.environ))


@pytest.mark.timeout(900)
def test_s3_run_folder_and_resume_after_driver_sigkill(ray_cluster, demo, encoder_cache, s3_bucket, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    run_uri = f"{s3_bucket}/runs/tiny"
    args = ["--model", "umaf", "--out", run_uri, *data_args(demo, encoder_cache), f"ray.address={address}"]

    # 1. a long run, killed (SIGKILL: no cleanup) once it has reported a checkpoint
    first = _driver([*args, "epochs=60"], tmp_path / "first.log")
    deadline = time.time() + 480  # generous: a loaded 2-core box starts processes slowly
    while time.time() < deadline and first.poll() is None:
        state = _latest_checkpoint_state(run_uri)
        if state and state["next_epoch"] >= 1:
            break
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The job's Train workers outlive their driver briefly and could still register a newer
    # checkpoint: read "the latest" only once every actor of the killed job is gone.
    wait_for_killed_driver_job(address, first.pid)
    state = _latest_checkpoint_state(run_uri)
    assert state is not None and state["next_epoch"] < 60
    killed_at = state["next_epoch"]

    # 2. the same command with the same run folder resumes from that checkpoint (1 more epoch)
    second = _driver([*args, f"epochs={killed_at + 1}"], tmp_path / "second.log")
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-5000:]
    metrics = storage.read_json(storage.join(run_uri, "metrics.json"))
    assert metrics["resumed_from_epoch"] == killed_at
    assert _latest_checkpoint_state(run_uri)["next_epoch"] == killed_at + 1
    assert metrics["test"]["weighted_f1"] > metrics["majority_baseline"]["test"]["weighted_f1"]

    # everything a researcher needs is in the s3:// run folder
    fs, path = storage.resolve(run_uri)
    from pyarrow.fs import FileSelector

    names = {info.path[len(path) + 1:] for info in fs.get_file_info(FileSelector(path, recursive=True))}
    assert {"metrics.json", "config.yaml", "data_report.json", "best/model.safetensors", "best/model.json", "predictions/test.parquet"} <= names
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in names)
    # one events file per driver run: the resumed run's scalars landed too
    assert len([n for n in names if n.startswith("tensorboard/events")]) == 2


def test_a_run_killed_in_its_final_test_pass_resumes_to_just_the_test_pass(ray_cluster, demo, encoder_cache, tmp_path):
    """Killed after its last epoch's checkpoint, before metrics.json: the rerun trains no epoch and
    writes the test metrics. (It also reports the last epoch's metrics to Train again, so that a Tune
    trial resumed so does not fail its sweep; that report is seen by Tune's kill/resume test when the
    kill lands there, not asserted here.)"""
    out = tmp_path / "run"
    args = ["--model", "umaf", "--out", str(out), *data_args(demo, encoder_cache), "epochs=1", "num_workers=1"]
    job_main("train")(args)
    # The caption set trained on: the demo's reference set (the only one there), pinned in the config.
    from umaf.data.demo import REFERENCE_FINGERPRINT

    report = json.loads((out / "data_report.json").read_text())
    assert report["captions"]["fingerprint"] == REFERENCE_FINGERPRINT.id
    assert f"caption_fingerprint: {REFERENCE_FINGERPRINT.id}" in (out / "config.yaml").read_text()
    (out / "metrics.json").unlink()  # as if the driver died during the final test pass
    metrics = job_main("train")(args)
    assert metrics["resumed_from_epoch"] == 1 and metrics["test"]["weighted_f1"] > 0
    assert [h["epoch"] for h in json.loads((out / "history.json").read_text())] == [0]
