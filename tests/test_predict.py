"""The predict job and the run export: ``best/`` loaded by ``umaf.models.load_run`` into a plain module
that predicts as training's evaluation does (UMAF, SPP-SCL in its fixed evaluation batches, from a local
folder and from s3://), the batch plan of a resumed run, and ``jobs/predict.py`` on the session's Ray
cluster writing to S3 (moto): resume, error rows, ``_metrics.json``.

The runs here are exported by the training loop's own ``_save_best`` from freshly built models (no
Ray Train: seconds, not minutes). That a real training run's test metrics come back equal from the
predict job is checked on the Jobs API run of tests/test_e2e_jobs.py (the pipeline's predict stage).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO_ROOT, job_main
from ray_head import job_runtime_env_vars
from umaf import storage
from umaf.config import load_config
from umaf.data.manifest import read_manifest
from umaf.predict.pipeline import Predictor, plan_batches
from umaf.train.config import TrainConfig
from umaf.train.loop import evaluate
from umaf.train.method import get_method
from umaf.train.metrics import classification_metrics

EVAL_BATCH = 8


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from umaf.data.demo import write_demo

    return write_demo(str(tmp_path_factory.mktemp("demo")), n_train=8, n_dev=4, n_test=20)


def export_run(run: Path, model_name: str, demo, encoder_cache: str) -> TrainConfig:
    """A run folder whose best/ is what the training loop writes, for a freshly built (seeded) model."""
    from umaf.predict.model import export_untrained_run

    cfg = load_config(TrainConfig, "train", overrides=[
        f"model={model_name}", f"manifest={demo['manifest']}", f"captions={demo['reference_captions']}",
        f"out={run}", f"eval_batch_size={EVAL_BATCH}", f"umaf.encoder_cache={encoder_cache}"])
    export_untrained_run(cfg, read_manifest(cfg.manifest).labels["sentiment"], "sentiment", "demo")
    return cfg


@pytest.fixture(scope="module")
def umaf_run(tmp_path_factory, demo):
    return export_run(tmp_path_factory.mktemp("umaf") / "run", "umaf", demo, str(tmp_path_factory.mktemp("enc")))


def training_evaluation(cfg: TrainConfig, demo) -> dict[str, np.ndarray]:
    """The test split through training's preprocessing and ``evaluate`` (the loop's dev/test pass)."""
    from umaf.caption.store import read_ok_captions
    from umaf.train.checkpoint import load_best
    from umaf.train.umaf_method import join_captions, tokenize_batch

    method = get_method(cfg.model)
    model = method.build_model(cfg, 3)
    load_best(cfg.out, model)
    test = read_manifest(cfg.manifest).split("test")
    test = test.append_column("label", test["label_sentiment"])
    if cfg.model == "umaf":
        table = join_captions(test, read_ok_captions(cfg.captions), cfg.missing_caption).table
        u = cfg.umaf
        batches = [tokenize_batch({k: np.array(v, dtype=object) for k, v in table.slice(s, EVAL_BATCH).to_pydict().items()},
                                  tokenizer=u.encoder, cache_dir=u.encoder_cache, max_length=u.max_length,
                                  field_shares=u.caption_field_shares) for s in range(0, table.num_rows, EVAL_BATCH)]
    else:
        from umaf.train.feature_cache import FrozenFeatureEncoder

        s = cfg.sppscl
        rows = {k: np.array(v, dtype=object) for k, v in test.select(["id", "text", "image", "image_ok", "label"]).to_pydict().items()}
        feats = FrozenFeatureEncoder(s.image_encoder, s.text_encoder, s.image_size, s.max_length, {})(rows)
        batches = [{k: v[i:i + EVAL_BATCH] for k, v in feats.items()} for i in range(0, test.num_rows, EVAL_BATCH)]
    return evaluate(method, model, batches, torch.device("cpu"), contextlib.nullcontext)


def caption_dicts(cfg: TrainConfig, ids: list[str]) -> list[dict | None]:
    from umaf.caption.store import read_ok_captions

    rows = {r["id"]: r for r in read_ok_captions(cfg.captions).to_pylist()}
    return [{k: rows[i][k] for k in ("ocr", "visual_scene", "textimage_relation")} if i in rows else None for i in ids]


def test_umaf_export_is_a_plain_module_that_predicts_as_training_evaluates(umaf_run, demo, s3_bucket):
    from umaf.models import load_run

    best = Path(umaf_run.out) / "best"
    assert {"model.safetensors", "model.json", "state.json", "tokenizer", "encoder"} <= {p.name for p in best.iterdir()}
    card = json.loads((best / "model.json").read_text())
    assert card["labels"] == ["negative", "neutral", "positive"] and card["method"] == "umaf"
    assert card["train_config"]["umaf"]["max_length"] == umaf_run.umaf.max_length and card["eval_batch_size"] == EVAL_BATCH

    model = load_run(umaf_run.out)
    assert isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule)
    test = read_manifest(umaf_run.manifest).split("test")
    ids, texts = test["id"].to_pylist(), test["text"].to_pylist()
    probs = model.predict_proba(texts, captions=caption_dicts(umaf_run, ids))
    expected = training_evaluation(umaf_run, demo)
    assert list(expected["id"]) == ids
    np.testing.assert_allclose(probs, expected["probs"], atol=1e-6)
    assert model.predict(texts[:2], captions=caption_dicts(umaf_run, ids[:2])) == [
        model.labels[i] for i in expected["pred"][:2]]

    # The same export read from s3:// loads the same weights (the run folder copied as it is).
    remote = f"{s3_bucket}/runs/umaf"
    storage.upload_dir(umaf_run.out, remote)
    np.testing.assert_allclose(load_run(remote).predict_proba(texts[:4], captions=caption_dicts(umaf_run, ids[:4])),
                               probs[:4], atol=1e-6)


@pytest.fixture(scope="module")
def sppscl_run(tmp_path_factory, demo):
    return export_run(tmp_path_factory.mktemp("sppscl") / "run", "sppscl", demo, str(tmp_path_factory.mktemp("enc")))


def test_sppscl_export_predicts_in_the_runs_fixed_eval_batches(tmp_path, demo, sppscl_run):
    from umaf.models import load_run

    cfg = sppscl_run
    model = load_run(cfg.out)
    test = read_manifest(cfg.manifest).split("test")
    texts, images = test["text"].to_pylist(), test["image"].to_pylist()
    expected = training_evaluation(cfg, demo)
    probs = model.predict_proba(texts, images=images)  # batches of eval_batch_size, in order
    np.testing.assert_allclose(probs, expected["probs"], atol=1e-5)
    # CMF attends across the batch: other batch-mates give other probabilities (why the order is fixed).
    assert not np.allclose(model.predict_proba(texts[::-1], images=images[::-1])[::-1], probs, atol=1e-5)

    # The job's actor, in this process: a missing image and an empty text become error rows, their
    # batch-mates keep the run's batches (the bad rows stay in them) and get the run's predictions.
    bad = test.set_column(test.schema.get_field_index("image"), "image",
                          pa.array([str(tmp_path / "gone.jpg")] + images[1:], pa.string()))
    texts_bad = [texts[0], "", *texts[2:]]
    bad = bad.set_column(bad.schema.get_field_index("text"), "text", pa.array(texts_bad, pa.string()))
    bad = bad.append_column("error", pa.array([None, "empty text"] + [None] * (bad.num_rows - 2), pa.string()))
    plan = plan_batches(bad, pa.array([], pa.string()), EVAL_BATCH, whole_batches=True)
    out = Predictor(cfg.out, {}, "cpu")(plan).to_pylist()
    assert [r["status"] for r in out[:3]] == ["error", "error", "ok"]
    assert out[0]["error"].startswith("image missing or unreadable: ") and out[1]["error"] == "empty text"
    assert out[0]["label"] is None and out[0]["probabilities"] is None
    np.testing.assert_allclose([r["probabilities"] for r in out[EVAL_BATCH:]], probs[EVAL_BATCH:], atol=1e-5)
    assert all(r["model"].startswith(f"{cfg.out}/best@") for r in out)


def test_batch_plan_of_a_resumed_run():
    table = pa.table({"id": [f"p{i}" for i in range(10)], "split": ["dev"] * 3 + ["test"] * 7})
    done = pa.array(["p0", "p1", "p2", "p3", "p4", "p5", "p6"])
    # SPP-SCL: batches of 3 within each split, cut over every row; a batch with a missing id runs whole.
    plan = plan_batches(table, done, 3, True)
    assert plan["id"].to_pylist() == ["p6", "p7", "p8", "p9"]
    assert plan["batch"].to_pylist() == [2, 2, 2, 3] and plan["emit"].to_pylist() == [False, True, True, True]
    # UMAF: only the missing ids, batched among themselves.
    plan = plan_batches(table, done, 2, False)
    assert plan["id"].to_pylist() == ["p7", "p8", "p9"] and plan["batch"].to_pylist() == [0, 0, 1]
    assert plan_batches(table, pa.array(table["id"].to_pylist()), 3, True).num_rows == 0
    # limit=4 (rows p0-p3 selected): only they are written; SPP-SCL runs p3 with its batch-mates p4, p5.
    limited = table.append_column("_selected", pa.array([i < 4 for i in range(10)]))
    plan = plan_batches(limited, pa.array([], pa.string()), 3, True)
    assert plan["id"].to_pylist() == [f"p{i}" for i in range(6)] and plan["batch"].to_pylist() == [0, 0, 0, 1, 1, 1]
    assert plan["emit"].to_pylist() == [True] * 4 + [False] * 2
    assert plan_batches(limited, pa.array([], pa.string()), 2, False)["id"].to_pylist() == ["p0", "p1", "p2", "p3"]


@pytest.mark.ray
def test_predict_job_resumes_writes_error_rows_and_trainings_metrics(ray_cluster, umaf_run, demo, s3_bucket, tmp_path):
    manifest = read_manifest(umaf_run.manifest)
    table = manifest.table
    empty = table.slice(0, 1).to_pylist()[0] | {"id": "new-empty-text", "text": "", "split": "test"}
    table = pa.concat_tables([table, pa.Table.from_pylist([empty], schema=table.schema)])
    (tmp_path / "manifest").mkdir()
    pq.write_table(table, tmp_path / "manifest" / "part-0.parquet")
    out = f"{s3_bucket}/predictions"
    predict = job_main("predict")
    args = ["--run", umaf_run.out, "--manifest", str(tmp_path / "manifest"), "--out", out, "--splits", "test",
            "actors.batch_size=8", "output.rows_per_file=4"]

    first = predict([*args, "limit=5"])  # a run that stopped after 5 pairs
    assert first["this_run"] == {"ok": 5, "error": 0}
    second = predict(args)  # the rerun predicts only what is missing
    assert second["skipped"] == 5 and second["this_run"] == {"ok": 15, "error": 1}
    rows = storage.read_json(f"{out}/_summary.json")["dataset_status"]
    assert rows == {"ok": 20, "error": 1}

    from umaf.caption.store import read_rows
    from umaf.predict.pipeline import PREDICTION_SCHEMA

    written = read_rows(out, PREDICTION_SCHEMA).to_pylist()
    assert sorted(r["id"] for r in written) == sorted([*table.filter(pc.equal(table["split"], "test"))["id"].to_pylist()])
    error = next(r for r in written if r["id"] == "new-empty-text")
    assert error["status"] == "error" and error["error"] == "empty text" and error["label"] is None
    ok = [r for r in written if r["status"] == "ok"]
    assert all(r["label"] == ["negative", "neutral", "positive"][r["label_index"]] for r in ok)
    assert all(len(r["probabilities"]) == 3 and r["predicted_at"] is not None for r in ok)

    expected = training_evaluation(umaf_run, demo)
    metrics = storage.read_json(f"{out}/_metrics.json")
    assert metrics["splits"]["test"] == json.loads(json.dumps(
        classification_metrics(expected["label"], expected["pred"], ["negative", "neutral", "positive"])))
    by_id = {r["id"]: r["probabilities"] for r in ok}
    np.testing.assert_allclose([by_id[i] for i in expected["id"]], expected["probs"], atol=1e-5)

    assert predict(args)["predicted"] == 0  # idempotent


def test_predict_job_says_which_input_is_wrong(tmp_path, capsys, umaf_run):
    predict = job_main("predict")
    with pytest.raises(SystemExit) as exc:
        predict(["--run", str(tmp_path / "no-run"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"run folder {tmp_path / 'no-run'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        predict(["--run", umaf_run.out, "--manifest", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and f"manifest {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        predict(["--run", umaf_run.out, "--splits", "test,val"])
    assert exc.value.code == 2 and "splits" in capsys.readouterr().err


@pytest.mark.ray
def test_sppscl_predict_job_keeps_the_runs_eval_batches_on_actors_and_when_resumed(ray_cluster, sppscl_run, demo,
                                                                                   tmp_path):
    """SPP-SCL through the job's Ray Data actors: CMF attends across the batch, so each row must be
    predicted in the run's own evaluation batch (manifest order, eval_batch_size rows) also when a
    rerun has only some of a batch left to write. Probabilities and metrics equal training's."""
    predict = job_main("predict")
    out = str(tmp_path / "predictions")
    args = ["--run", sppscl_run.out, "--out", out, "--splits", "test", "output.rows_per_file=4"]
    assert predict([*args, "limit=5"])["this_run"] == {"ok": 5, "error": 0}  # stops inside batch 0
    second = predict(args)
    assert second["skipped"] == 5 and second["this_run"] == {"ok": 15, "error": 0}

    from umaf.caption.store import read_rows
    from umaf.predict.pipeline import PREDICTION_SCHEMA

    written = read_rows(out, PREDICTION_SCHEMA).to_pylist()
    expected = training_evaluation(sppscl_run, demo)
    assert sorted(r["id"] for r in written) == sorted(expected["id"]), "every test id once"
    by_id = {r["id"]: r["probabilities"] for r in written}
    np.testing.assert_allclose([by_id[i] for i in expected["id"]], expected["probs"], atol=1e-5)
    metrics = storage.read_json(f"{out}/_metrics.json")
    assert metrics["splits"]["test"] == json.loads(json.dumps(
        classification_metrics(expected["label"], expected["pred"], ["negative", "neutral", "positive"])))


@pytest.mark.ray
def test_predict_job_killed_mid_run_loses_only_rows_in_flight(ray_head_cluster, ray_cluster, sppscl_run, tmp_path):
    """``jobs/predict.py`` as a driver on the cluster, SIGKILLed once files have landed: every written
    row is kept, the rerun predicts only the rest, every id ends with exactly one row, and the
    probabilities are those of one uninterrupted pass (the resumed batches are the run's batches)."""
    from umaf.caption.store import read_rows
    from umaf.data.demo import write_demo
    from umaf.models import load_run
    from umaf.predict.pipeline import PREDICTION_SCHEMA

    bigger = write_demo(str(tmp_path / "demo"), n_train=0, n_dev=0, n_test=96, seed=3)
    out = str(tmp_path / "predictions")
    args = ["--run", sppscl_run.out, "--manifest", bigger["manifest"], "--out", out, "--splits", "test",
            "output.rows_per_file=8", "actors.max_actors=1", "actors.min_actors=1"]
    env = {**os.environ, **job_runtime_env_vars()}
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "killed.log"
    driver = subprocess.Popen([sys.executable, str(REPO_ROOT / "jobs" / "predict.py"), *args,
                               f"ray.address={ray_head_cluster.gcs_address}"],
                              env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=str(tmp_path))

    def written_ids() -> list[str]:
        return read_rows(out, PREDICTION_SCHEMA)["id"].to_pylist() if os.path.isdir(out) else []

    try:
        deadline = time.time() + 300
        while not written_ids():
            assert driver.poll() is None, f"the job ended before writing:\n{log_path.read_text()[-4000:]}"
            assert time.time() < deadline, f"no predictions after 300 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.1)
        driver.send_signal(signal.SIGSTOP)  # frozen: what is on storage now is what the kill leaves
        kept = written_ids()
        assert not os.path.exists(f"{out}/_summary.json"), "the job finished before the kill: make the run longer"
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    assert 0 < len(kept) < 96 and len(set(kept)) == len(kept)

    rerun = job_main("predict")([a for a in args if not a.startswith("actors.")])
    assert rerun["skipped"] == len(kept) and rerun["predicted"] == 96 - len(kept)
    rows = read_rows(out, PREDICTION_SCHEMA).to_pylist()
    test = read_manifest(bigger["manifest"]).split("test")
    assert sorted(r["id"] for r in rows) == sorted(test["id"].to_pylist()), "every id exactly once in the raw rows"
    one_pass = load_run(sppscl_run.out).predict_proba(test["text"].to_pylist(), images=test["image"].to_pylist())
    by_id = {r["id"]: r["probabilities"] for r in rows}
    np.testing.assert_allclose([by_id[i] for i in test["id"].to_pylist()], one_pass, atol=1e-5)
