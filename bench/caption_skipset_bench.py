"""What a caption run reads before its first caption, at scale: the skip set and the request-key set.

    python bench/caption_skipset_bench.py                       # 1M and 10M rows, local folder and S3 (moto)
    python bench/caption_skipset_bench.py --rows 1000000 --where local

A captions folder of N finished rows is written the way the caption job writes it (Parquet files of
``--rows-per-file`` rows, 5,000 by default = the ``output.rows_per_file`` maximum, so 10M rows are
2,000 files), with two caption sets side by side (90% / 10% of the files, as two runs would write
them) and 2% error rows. Then, each
in a fresh process (so its peak memory is its own), the driver's start-of-run work for the larger set:

- **skip set**: the manifest's ids (``select_ids``, a manifest of the same N ids written beside the
  captions) and ``pending_ids`` (the ids already captioned with this fingerprint, read file by file,
  taken out of them), exactly as ``run_caption`` does;
- **listing**: the caption sets at ``--out`` with their row counts (``caption_sets``), logged at the
  start of every run;
- **request keys**: ``done_request_keys`` (the ok rows' request keys, for the ledger that makes identical
  requests pay once).

``--kinds`` adds ``*_whole`` baselines: the same results from every row read into one table first
(``read_statuses`` + ``done_ids`` + ``pc.unique`` + ``is_in``; ``read_captions`` + a group-by; all keys
as strings, then ``key_words``), as the job did before it read file by file.

Goal (issue 24): ≤ 60 s and ≤ 1 GB peak driver memory for 10M rows on 2 cores. Printed: seconds and
peak RSS (``ru_maxrss`` of the measuring process, Python and pyarrow included), per size and storage.
The caption text columns are left null: the reads project ``id``/``status``/``fingerprint`` (and
``request_key``), so text would only make the files larger, not the bytes read. Everything is written
under a temporary folder (``--tmp``, default /tmp) and in a moto server started here, and deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FP_MAIN, FP_OTHER = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"


def build(uri: str, rows: int, rows_per_file: int, storage_kw: dict) -> float:
    """Write ``rows`` caption rows under ``uri``; returns seconds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from umaf import storage
    from umaf.caption.store import CAPTION_SCHEMA

    start = time.perf_counter()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spec_main, spec_other = json.dumps({"m": FP_MAIN}), json.dumps({"m": FP_OTHER})

    def one(k: int) -> None:
        lo, hi = k * rows_per_file, min(rows, (k + 1) * rows_per_file)
        n = hi - lo
        idx = np.arange(lo, hi)
        rng = np.random.default_rng(k)
        # 90% of the files hold the main set, 10% another set: each run writes its own files.
        main = np.full(n, k % 10 != 9)
        error = rng.random(n) < 0.02
        keys = np.char.mod("%032x", rng.integers(0, 2**62, n, dtype=np.int64))
        table = pa.table({
            "id": pa.array(np.char.mod("pair-%010d", idx)),
            "status": pa.array(np.where(error, "error", "ok")),
            "error": pa.array(np.where(error, "inference failed: x", None)),
            "model": pa.array(["Qwen/Qwen2.5-VL-7B-Instruct"] * n),
            "prompt_version": pa.array(["981e9e6c0ce4"] * n),
            "output_tokens": pa.array(rng.integers(200, 600, n)),
            "captioned_at": pa.array([t0] * n, pa.timestamp("us", tz="UTC")),
            "fingerprint": pa.array(np.where(main, FP_MAIN, FP_OTHER)),
            "fingerprint_spec": pa.array(np.where(main, spec_main, spec_other)),
            "request_key": pa.array(keys),
        })
        full = pa.table({f.name: table[f.name] if f.name in table.column_names else pa.nulls(n, f.type)
                         for f in CAPTION_SCHEMA}, schema=CAPTION_SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(full, sink, compression="zstd")
        storage.write_bytes_atomic(storage.join(uri, f"part-20260101T000000-bench-{k:05d}.parquet"),
                                   sink.getvalue().to_pybytes(), **storage_kw)

    files = -(-rows // rows_per_file)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(files)))
    # The manifest of the same N ids, as jobs/prepare.py writes one (the id and split columns the run
    # reads; the labels metadata select_ids checks), in files of 1M rows.
    from umaf.data.manifest import DATASET_KEY, LABELS_KEY

    meta = {LABELS_KEY: json.dumps({"sentiment": ["positive", "neutral", "negative"]}), DATASET_KEY: "bench"}
    for k in range(-(-rows // 1_000_000)):
        lo, hi = k * 1_000_000, min(rows, (k + 1) * 1_000_000)
        ids = pc.binary_join_element_wise("pair-", pc.utf8_lpad(pc.cast(pa.array(np.arange(lo, hi)), pa.string()), 10, "0"), "")
        table = pa.table({"id": ids, "split": pa.array(["train"] * (hi - lo))}).replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        storage.write_bytes_atomic(storage.join(uri + "-manifest", f"part-{k:05d}.parquet"), sink.getvalue().to_pybytes(),
                                   **storage_kw)
    return time.perf_counter() - start


def measure(kind: str, uri: str, rows: int, storage_kw: dict) -> dict:
    """One measurement in this process (run in a fresh one: its ru_maxrss is this measurement's)."""
    import numpy as np
    import pyarrow.compute as pc

    from umaf.caption.pipeline import done_ids, done_request_keys, key_words, pending_ids, read_statuses
    from umaf.caption.store import CAPTION_SCHEMA

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    if kind == "listing":  # the caption sets at --out, said at the start of every run
        from umaf.caption.store import caption_sets

        sets = caption_sets(uri, **storage_kw)
        result = {"sets": len(sets), "ok_ids": sum(c["ok_ids"] for c in sets)}
    elif kind == "listing_whole":
        from umaf.caption.store import read_captions

        table = read_captions(uri, columns=["id", "status", "fingerprint", "model", "prompt_version"], **storage_kw)
        ok = table.filter(pc.equal(table["status"], "ok"))
        sets = ok.group_by("fingerprint").aggregate([("id", "count_distinct")])
        result = {"sets": table.group_by("fingerprint").aggregate([("id", "count")]).num_rows,
                  "ok_ids": sum(sets["id_count_distinct"].to_pylist())}
    elif kind in ("skip_set", "skip_set_whole"):
        # As run_caption does: the manifest's selected ids (select_ids), then those not yet done.
        from umaf.caption.config import CaptionConfig
        from umaf.caption.pipeline import select_ids

        config = CaptionConfig(out=uri, storage={"endpoint_url": storage_kw.get("endpoint_url")})
        selected, _ = select_ids(uri + "-manifest", config)
        if kind == "skip_set":
            todo, _ = pending_ids(selected, uri, fingerprint=FP_MAIN, retry_failed=False, **storage_kw)
        else:  # before: every row's id and status in one table, unique done ids, then is_in
            done = done_ids(read_statuses(uri, fingerprint=FP_MAIN, **storage_kw), retry_failed=False)
            todo = pc.unique(pc.filter(selected, pc.invert(pc.is_in(selected, value_set=done))))
        result = {"selected": len(selected), "todo": len(todo)}
    elif kind == "request_keys":
        keys = done_request_keys([uri], FP_MAIN, **storage_kw)
        result = {"keys": len(keys[0])}
    else:  # request_keys_whole
        from umaf.caption.store import read_rows

        table = read_rows(uri, CAPTION_SCHEMA, columns=["request_key"], filter=(pc.field("fingerprint") == FP_MAIN)
                          & (pc.field("status") == "ok") & pc.field("request_key").is_valid(), **storage_kw)
        hi, lo = key_words(table["request_key"])
        order = np.argsort(hi, kind="stable")
        result = {"keys": len(hi[order])}
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "rows": rows, "seconds": round(seconds, 2), "peak_rss_mb": round(peak),
            "rss_before_mb": round(base_rss), **result}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto(log_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(os.path.join(log_dir, "moto.log"), "wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated sizes")
    parser.add_argument("--rows-per-file", type=int, default=5000)
    parser.add_argument("--where", default="local,s3", help="local, s3 or both")
    parser.add_argument("--tmp", default="/tmp", help="parent of the temporary folder")
    parser.add_argument("--kinds", default="skip_set,listing,request_keys",
                        help="which measurements; add skip_set_whole,listing_whole,request_keys_whole for the baselines")
    parser.add_argument("--measure", nargs=4, metavar=("KIND", "URI", "ROWS", "ENDPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, uri, rows, endpoint = args.measure
        print(json.dumps(measure(kind, uri, int(rows), {"endpoint_url": endpoint} if endpoint != "-" else {})))
        return

    import boto3

    from common import environment

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    work = tempfile.mkdtemp(prefix="umaf-skipset-", dir=args.tmp)
    moto, endpoint = (None, None)
    results = []
    try:
        if "s3" in args.where:
            moto, endpoint = start_moto(work)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
        for rows in [int(r) for r in args.rows.split(",")]:
            for where in [w for w in ("local", "s3") if w in args.where]:
                uri = os.path.join(work, f"captions-{rows}") if where == "local" else f"s3://bench/captions-{rows}"
                kw = {"endpoint_url": endpoint} if where == "s3" else {}
                written = build(uri, rows, args.rows_per_file, kw)
                print(f"built {rows:,} rows in {-(-rows // args.rows_per_file)} files at {uri} in {written:.0f}s",
                      flush=True)
                for kind in args.kinds.split(","):
                    out = subprocess.run([sys.executable, __file__, "--measure", kind, uri, str(rows), endpoint or "-"]
                                         if where == "s3" else
                                         [sys.executable, __file__, "--measure", kind, uri, str(rows), "-"],
                                         capture_output=True, text=True, check=True)
                    result = {"where": where, **json.loads(out.stdout.strip().splitlines()[-1])}
                    results.append(result)
                    print(json.dumps(result), flush=True)
                if where == "local":
                    shutil.rmtree(uri)
                    shutil.rmtree(uri + "-manifest")
                else:
                    s3 = boto3.resource("s3", endpoint_url=endpoint)
                    s3.Bucket("bench").objects.filter(Prefix=f"captions-{rows}").delete()
    finally:
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"environment": environment(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
