"""The ``vllm`` backend end to end, with only vLLM itself replaced by a CPU fake.

The caption job runs as ``python jobs/caption.py --backend vllm`` against cluster/aws.yaml's node
types under Ray's fake autoscaler (a head without GPUs; caption nodes with one logical GPU and the
``caption_node`` resource, started when the replicas ask for them), whose nodes import
``tests/fake_vllm`` as ``vllm``. Everything else is real: ``ray.data.llm``'s processor as the job
builds it (all five stage UDFs, ray's ``vLLMEngineWrapper`` and its error handling,
``wrap_preprocess``/``wrap_postprocess``), the Ray Data plan, the driver's writer, and S3 (a moto
server started here, whose request log counts the image reads).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ray_head import free_port, job_runtime_env_vars, wait_for_driver
from umaf import storage
from umaf.caption.store import read_captions, read_ok_captions
from umaf.data.manifest import build_table, write_manifest

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

LONG_TEXT = " ".join(f"word{i}" for i in range(500))  # ~3.3k tokens: past max_model_len=1800, within 8192
# Chat templates raise on input they cannot render (Llama 2's and Mistral's on roles out of order, Gemma's
# on a system turn) through transformers' raise_exception. The test model's template raises on this.
TEMPLATE_BREAKER = "UNSUPPORTED-MARKUP"


def model_in_bucket(moto: Moto, bucket: str, tiny_vlm_cache: str, tmp_path: Path) -> str:
    """The tiny VLM, with a chat template that refuses TEMPLATE_BREAKER, copied to the bucket by
    jobs/upload_model.py: the job loads it from s3:// (ray.data.llm downloads it on each node)."""
    import shutil

    from conftest import job_main
    from umaf.caption.tiny_vlm import ensure_tiny_vlm

    folder = tmp_path / "tiny-strict-template"
    shutil.copytree(ensure_tiny_vlm(tiny_vlm_cache), folder)
    template = (folder / "chat_template.jinja").read_text()
    guard = ("{% for message in messages %}{% if '" + TEMPLATE_BREAKER + "' in (message['content'] | string) %}"
             "{{ raise_exception('this template cannot render " + TEMPLATE_BREAKER + "') }}{% endif %}{% endfor %}")
    (folder / "chat_template.jinja").write_text(guard + template)
    uri = f"{bucket}/models/tiny-strict-template"
    summary = job_main("upload_model")(["--model", str(folder), "--out", uri, f"storage.endpoint_url={moto.endpoint}",
                                        "storage.region=us-east-1"])
    assert summary["copied"] == summary["files"] > 0
    again = job_main("upload_model")(["--model", str(folder), "--out", uri, f"storage.endpoint_url={moto.endpoint}"])
    assert again["copied"] == 0 and again["skipped"] == summary["files"], "a rerun copies nothing twice"
    return uri


class Moto:
    """A moto S3 server of this module's own: its request log is read, and it is paused mid-run."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"moto did not start: {log_path.read_text()[-2000:]}")
                time.sleep(0.2)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def gets(self, key_part: str) -> int:
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines()
                   if 'GET /' in line and key_part in line)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = Moto(tmp_path_factory.mktemp("moto-vllm") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(fake_aws_cluster):
    """cluster/aws.yaml's node types under Ray's fake autoscaler (conftest.fake_aws_cluster): a head
    without GPUs, caption nodes (1 logical GPU, caption_node=1) started for the replicas, the fake
    vllm first on every node's path."""
    return fake_aws_cluster


@pytest.fixture(scope="module")
def bucket(moto):
    name = f"umaf-vllm-{os.getpid()}"
    moto.client().create_bucket(Bucket=name)
    return f"s3://{name}"


def jpeg_bytes(size, color=(200, 30, 30)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="JPEG")
    return out.getvalue()


def make_manifest(moto: Moto, bucket: str, prefix: str, shared_data: Path, n_msed: int, extra: bool) -> list[str]:
    """MSED dev pairs 1..n_msed (images copied to S3), plus, with ``extra``: a missing image, a 1344x5
    banner (Qwen2-VL rejects ratios above 200), a 3x2 speck, a text too long for the engine, a text
    the model's chat template refuses (a CPU stage of ray.data.llm raises on it) and a twin of pair 1
    (its bytes under another key, its text)."""
    folder = shared_data / "msed" / "dev"
    with open(folder / "dev.csv", newline="", encoding="utf-8") as fh:
        records = list(csv.DictReader(fh))[:n_msed]
    s3 = moto.client()
    name = bucket.removeprefix("s3://")
    labels = {"sentiment": ["negative", "neutral", "positive"]}
    rows = []
    for k, rec in enumerate(records, start=1):
        key = f"{prefix}/images/{k}.jpg"
        s3.put_object(Bucket=name, Key=key, Body=(folder / "images" / f"{k}.jpg").read_bytes())
        rows.append({"id": f"msed-{k}", "text": rec["Caption"], "image": f"{bucket}/{key}",
                     "label": labels["sentiment"].index(rec["Sentiment"])})
    if extra:
        texts = {"long-text": LONG_TEXT, "template-breaker": f"see {TEMPLATE_BREAKER} here"}
        for pair_id, size in (("banner", (1344, 5)), ("speck", (3, 2)), ("long-text", (64, 48)),
                              ("template-breaker", (64, 48))):
            key = f"{prefix}/images/{pair_id}.jpg"
            s3.put_object(Bucket=name, Key=key, Body=jpeg_bytes(size))
            rows.append({"id": pair_id, "text": texts.get(pair_id, "look at this"), "image": f"{bucket}/{key}", "label": 1})
        rows.append({"id": "missing", "text": "gone", "image": f"{bucket}/{prefix}/images/missing.jpg", "label": 0})
        # The first pair again under another id and another key (same bytes, same text): captioned once.
        key = f"{prefix}/images/twin.jpg"
        s3.put_object(Bucket=name, Key=key, Body=(folder / "images" / "1.jpg").read_bytes())
        rows.append({**rows[0], "id": "twin", "image": f"{bucket}/{key}"})
    table = build_table([{"id": r["id"], "split": "dev", "text": r["text"], "image": r["image"], "image_ok": True,
                          "label_sentiment": r["label"]} for r in rows], "msed", labels)
    write_manifest(table, f"{bucket}/{prefix}/manifest", endpoint_url=moto.endpoint)
    return [r["id"] for r in rows]


def job_args(model: str, manifest: str, out: str, moto: Moto, *extra: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [*flags, "--backend", "vllm", "--model", model, "--manifest", manifest, "--out", out,
            f"storage.endpoint_url={moto.endpoint}", "storage.region=us-east-1",
            "actors.min_actors=2", "actors.max_actors=2", "actors.batch_size=4", "images.batch_size=4",
            "vllm.cpu_stage_actors=1", "vllm.max_concurrent_batches=2", "vllm.max_model_len=1800",
            "vllm.max_pixels=50176", "images.max_area=50176", "images.multiple_of=28", "images.min_side=28",
            "images.max_side=4096", "vllm.replica_resources={caption_node: 1}", "max_field_chars=40",
            "sampling.max_tokens=200", *extra]


def start_job(cluster, args: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **job_runtime_env_vars(), "RAY_metrics_report_interval_ms": "500"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(REPO / "jobs" / "caption.py"), *args,
                             f"ray.address={cluster.gcs_address}"],
                            env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, cwd=str(log_path.parent))


class MetricsWatcher(threading.Thread):
    """Polls the head's Prometheus endpoint while a job runs; keeps the last ``umaf_caption_*`` lines seen."""

    def __init__(self, cluster):
        super().__init__(daemon=True)
        port = next(a.split("=", 1)[1] for a in cluster.head.proc.args if a.startswith("--metrics-export-port="))
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.lines: list[str] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            found = [line for line in text.splitlines() if "umaf_caption_" in line and not line.startswith("#")]
            if found:
                self.lines = found

    def values(self) -> dict[str, float]:
        """The last values seen, keyed by metric name plus its ``status`` tag where it has one."""
        values = {}
        for line in self.lines:
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            name = name.removesuffix("_total")  # Prometheus' suffix for counters
            status = next((part for part in labels.rstrip("}").split(",") if part.startswith("status=")), None)
            values[f"{name}{{{status}}}" if status else name] = float(value)
        return values


def run_job(cluster, args: list[str], log_path: Path, timeout: float = 420) -> dict:
    wait_for_driver(start_job(cluster, args, log_path), log_path, timeout, "caption job")
    # The job's summary, as it leaves it in the captions folder (its console shows a one-line form).
    out = args[args.index("--out") + 1]
    endpoint = next(a.split("=", 1)[1] for a in args if a.startswith("storage.endpoint_url="))
    return storage.read_json(storage.join(out, "_summary.json"), endpoint_url=endpoint)


def raw_ids(out: str, moto: Moto) -> list[str]:
    return read_captions(out, columns=["id"], endpoint_url=moto.endpoint)["id"].to_pylist()


def test_vllm_path_error_rows_retry_single_read_fixed_pool(cluster, moto, bucket, shared_data, tiny_vlm_cache,
                                                          tmp_path):
    model = model_in_bucket(moto, bucket, tiny_vlm_cache, tmp_path)
    ids = make_manifest(moto, bucket, "errors", shared_data, n_msed=6, extra=True)
    manifest, out = f"{bucket}/errors/manifest", f"{bucket}/errors/captions"
    # The cluster starts from its head alone: no node can host a replica until the autoscaler adds one.
    wait_for_nodes_of(cluster, "caption_node", 0)
    for old in cluster.record_dir.glob("engine-*.json"):
        old.unlink()
    metrics = MetricsWatcher(cluster)
    metrics.start()
    summary = run_job(cluster, job_args(model, manifest, out, moto), tmp_path / "run1.log")

    # The job completes; every id has exactly one row (raw reader), with the reason for each error.
    assert sorted(raw_ids(out, moto)) == sorted(ids)
    table = read_captions(out, endpoint_url=moto.endpoint)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert by_id["missing"]["status"] == "error" and by_id["missing"]["error"].startswith("image not found:")
    assert by_id["long-text"]["status"] == "error"
    assert by_id["long-text"]["error"].startswith("inference failed: ValueError: The decoder prompt (length ")
    # The row ray's chat-template stage cannot render is an error row naming the stage; its batch-mates
    # are captioned (the stage redid the batch row by row), and the job goes on.
    assert by_id["template-breaker"]["status"] == "error"
    assert by_id["template-breaker"]["error"].startswith("inference failed: ChatTemplate: "), by_id["template-breaker"]
    assert "cannot render" in by_id["template-breaker"]["error"]
    # Padded before the engine: the banner and the speck are captioned, not rejected by smart_resize.
    for pair_id in ("banner", "speck", *[i for i in ids if i.startswith("msed-")]):
        assert by_id[pair_id]["status"] == "ok", by_id[pair_id]
        assert json.loads(by_id[pair_id]["raw"])["textimage_relation"] == "consistent"
    assert summary["this_run"] == {"ok": len(ids) - 3, "invalid": 0, "error": 3}
    # The twin's request is pair 1's: whichever claimed it first was captioned, the other copied from its
    # row and never sent to the engine.
    copy, original = ("twin", "msed-1") if by_id["twin"]["reused_from"] else ("msed-1", "twin")
    assert summary["reused"] == 1 and by_id[copy]["reused_from"] == original and by_id[original]["reused_from"] is None
    assert by_id[copy]["raw"] == by_id[original]["raw"] and by_id[copy]["request_key"] == by_id[original]["request_key"]
    assert len({r["fingerprint"] for r in by_id.values()}) == 1 and by_id["msed-1"]["fingerprint"] == summary["fingerprint"]
    # The weights came from the bucket (ray.data.llm's download on the caption nodes), not a hub.
    assert moto.gets("/models/tiny-strict-template/model.safetensors") >= 1

    # Each image read from S3 exactly once (moto's request log), though the plan has an error branch.
    for pair_id in [i for i in ids if i != "missing"]:
        key = f"/errors/images/{pair_id.removeprefix('msed-')}.jpg"
        assert moto.gets(key) == 1, f"{key} read {moto.gets(key)} times"

    # A fixed pool: both replicas started, with video off and one image per prompt.
    engines = [json.loads(p.read_text()) for p in cluster.record_dir.glob("engine-*.json")]
    assert len({e["pid"] for e in engines}) == 2
    assert all(e["kwargs"]["limit_mm_per_prompt"] == {"image": 1, "video": 0} for e in engines)
    # Placement: each replica reserved a caption_node (vllm.replica_resources), so the autoscaler started
    # caption nodes for them, and each ran on its own caption node, never on the head.
    assert all(e["resources"].get("caption_node") == 1 and e["resources"].get("GPU") == 1 for e in engines), engines
    kinds = node_kinds(cluster)
    assert sorted(kinds[e["node_id"]] for e in engines) == ["caption_node", "caption_node"], (engines, kinds)
    assert len({e["node_id"] for e in engines}) == 2

    # The umaf_caption_* metrics reach the cluster's Prometheus endpoint (recorded by the driver's writer)
    # with the values the job wrote: captions by status, and the tokens the engine generated.
    expected = {
        'ray_umaf_caption_captions{status="ok"}': len(ids) - 3,
        'ray_umaf_caption_captions{status="error"}': 3,
        "ray_umaf_caption_output_tokens": sum(t or 0 for t, r in zip(table["output_tokens"].to_pylist(),
                                                                      table["reused_from"].to_pylist()) if r is None),
    }
    assert expected["ray_umaf_caption_output_tokens"] > 0
    deadline = time.time() + 60
    while time.time() < deadline and {k: metrics.values().get(k) for k in expected} != expected:
        time.sleep(0.5)
    metrics.stop.set()
    seen = metrics.values()
    assert {k: seen.get(k) for k in expected} == expected, metrics.lines

    # --retry-failed redoes the three error rows; with a context that fits, the long text succeeds
    # (the missing image and the text the template refuses fail again, as rows).
    retry = run_job(cluster, job_args(model, manifest, out, moto, "vllm.max_model_len=8192", flags=("--retry-failed",)),
                    tmp_path / "run2.log")
    assert retry["selected"] - retry["skipped"] == 3
    assert retry["this_run"] == {"ok": 1, "invalid": 0, "error": 2}
    ok = read_ok_captions(out, endpoint_url=moto.endpoint)
    assert sorted(ok["id"].to_pylist()) == sorted(i for i in ids if i not in ("missing", "template-breaker"))


def node_kinds(cluster) -> dict[str, str]:
    """Every node the cluster has had (alive or ended), by the custom resource that marks its type."""
    nodes = cluster.get("/api/v0/nodes?limit=1000&detail=true")["data"]["result"]["result"]
    marks = ("caption_node", "train_node")
    return {n["node_id"]: next((m for m in marks if m in (n.get("resources_total") or {})), "head" if n.get("is_head_node") else "other")
            for n in nodes}


def wait_for_nodes_of(cluster, mark: str, count: int, timeout: float = 120) -> None:
    """Wait until exactly ``count`` alive nodes offer ``mark`` (idle ones are ended by the autoscaler)."""
    deadline = time.time() + timeout
    while True:
        alive = [n for n in cluster.alive_nodes() if mark in (n.get("resources_total") or {})]
        if len(alive) == count:
            return
        if time.time() > deadline:
            pytest.fail(f"{len(alive)} alive nodes with {mark} after {timeout:.0f}s, expected {count}")
        time.sleep(1)


def wait_for_rows(out: str, moto: Moto, proc: subprocess.Popen, at_least: int, timeout: float = 400) -> list[str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the job ended before the event under test: make the run longer"
        try:
            ids = raw_ids(out, moto)
        except (FileNotFoundError, OSError):
            ids = []
        if len(ids) >= at_least:
            return ids
        time.sleep(0.2)
    pytest.fail(f"no {at_least} caption rows at {out} after {timeout:.0f}s")


# One engine replica (the pool of two is the test above's), small files and batches: a run long enough
# to kill mid-way, and one actor fewer to start in each of the three runs.
ONE_REPLICA = ("actors.min_actors=1", "actors.max_actors=1")
SLOW_ARGS = (*ONE_REPLICA, "output.rows_per_file=4", "actors.batch_size=2", "vllm.max_concurrent_batches=1")


@pytest.mark.slow
def test_driver_sigkill_then_s3_outage_then_rerun_has_every_id_once(cluster, moto, bucket, shared_data,
                                                                    tiny_vlm_cache, tmp_path):
    """One caption output through three runs of the vLLM path: a driver SIGKILLed mid-run keeps every
    file that landed; the rerun resumes from them and, when the S3 server stops answering mid-run,
    fails with one line and status 2 (an outage is not a bug: no traceback); the run after the outage
    completes with every id exactly once in the raw rows (none lost, none written twice)."""
    from umaf.caption.tiny_vlm import ensure_tiny_vlm

    model = str(ensure_tiny_vlm(tiny_vlm_cache))
    ids = make_manifest(moto, bucket, "kill", shared_data, n_msed=48, extra=False)
    manifest, out = f"{bucket}/kill/manifest", f"{bucket}/kill/captions"

    # 1. SIGKILL once the first file (4 rows) has landed.
    proc = start_job(cluster, job_args(model, manifest, out, moto, *SLOW_ARGS), tmp_path / "killed.log")
    try:
        wait_for_rows(out, moto, proc, at_least=4)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    partial = raw_ids(out, moto)
    assert 0 < len(partial) < len(ids) and len(set(partial)) == len(partial)

    # 2. The rerun resumes (it writes past what the killed run left), then storage stops answering.
    log_path = tmp_path / "outage.log"
    # One attempt per file: the writer's bounded retries have their own tests (test_caption_presets.py);
    # here each attempt is the AWS SDK's own retries of a request nobody answers (~20 s).
    proc = start_job(cluster, job_args(model, manifest, out, moto, *SLOW_ARGS, "output.write_attempts=1"), log_path)
    try:
        wait_for_rows(out, moto, proc, at_least=len(partial) + 4)
        os.kill(moto.proc.pid, signal.SIGSTOP)  # the server stops answering (its data stays)
        try:
            proc.wait(timeout=300)
        finally:
            os.kill(moto.proc.pid, signal.SIGCONT)
    finally:
        proc.kill()
        proc.wait()
    log = log_path.read_text(errors="replace")
    assert proc.returncode == 2, log[-4000:]
    assert "jobs/caption.py: error: cannot write" in log and "after 1 attempt " in log, log[-4000:]
    assert "rerun the same command when storage is back" in log, log[-4000:]
    before_outage = raw_ids(out, moto)
    assert set(partial) < set(before_outage) and len(set(before_outage)) == len(before_outage)

    # 3. Storage is back: the same command (batching wider) finishes the rest.
    # (A write the server took in just before it froze may land once it answers again: kept too.)
    summary = run_job(cluster, job_args(model, manifest, out, moto, *ONE_REPLICA), tmp_path / "after-outage.log")
    assert summary["skipped"] >= len(before_outage), "every caption that reached storage is kept"
    assert sorted(raw_ids(out, moto)) == sorted(ids), "every id exactly once in the raw rows"
