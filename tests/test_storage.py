"""umaf/storage.py on local folders and on a real S3 protocol server (moto), through boto3 and pyarrow."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from umaf import storage


def test_resolve_local_and_file_uris(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("sub/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "sub" / "dir")
    assert storage.resolve(f"file://{tmp_path}/x")[1] == str(tmp_path / "x")
    assert storage.resolve(Path("~").joinpath("y"))[1] == str(Path.home() / "y")


def test_resolve_s3_and_bad_uris(s3_endpoint):
    fs, path = storage.resolve("s3://bucket/some/prefix/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/some/prefix"
    assert storage.resolve("s3://bucket")[1] == "bucket"
    with pytest.raises(ValueError, match="has no bucket"):
        storage.resolve("s3:///prefix")
    with pytest.raises(ValueError, match="unsupported URI scheme 'gs'"):
        storage.resolve("gs://bucket/x")


def test_join():
    assert storage.join("s3://b/p/", "x", "y.json") == "s3://b/p/x/y.json"
    assert storage.join("/tmp/a", "b") == "/tmp/a/b"
    assert storage.join("file:///tmp/a", "b") == "file:///tmp/a/b"


def test_atomic_write_local_replaces_and_leaves_no_temp_files(tmp_path: Path):
    target = str(tmp_path / "deep" / "report.json")
    storage.write_json_atomic(target, {"v": 1})
    storage.write_json_atomic(target, {"v": 2, "text": "é"})
    assert storage.read_json(target) == {"v": 2, "text": "é"}
    assert os.listdir(tmp_path / "deep") == ["report.json"]
    assert storage.exists(target) and not storage.exists(str(tmp_path / "nope.json"))


def test_readers_never_see_a_partial_local_write(tmp_path: Path):
    """A reader racing a writer of large files gets either the old or the new document, never a torn one.

    The writer keeps replacing the file until the reader has read both versions several times while
    writes were going on, so the reads provably overlapped the writes (a bound on the number of
    writes keeps a broken reader from looping forever)."""
    target = str(tmp_path / "big.json")
    docs = [{"n": n, "payload": str(n) * 200_000} for n in range(2)]
    storage.write_json_atomic(target, docs[0])
    reads, errors, stop = [], [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                reads.append(storage.read_json(target)["n"])
            except Exception as exc:  # noqa: BLE001 - any failure to parse is the bug this test looks for
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    writes = 0
    try:
        while writes < 20_000 and not errors and not (reads.count(0) >= 5 and reads.count(1) >= 5):
            writes += 1
            storage.write_json_atomic(target, docs[writes % 2])
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert reads.count(0) >= 5 and reads.count(1) >= 5, f"the reader never overlapped the writes ({writes} writes, {len(reads)} reads)"
    assert set(reads) == {0, 1}


def test_s3_round_trip_through_boto3_and_pyarrow(s3_bucket: str, tmp_path: Path):
    import boto3

    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    uri = storage.join(s3_bucket, "runs", "r1", "manifest.json")
    storage.write_json_atomic(uri, {"rows": 3})
    assert json.loads(s3.get_object(Bucket=bucket, Key="runs/r1/manifest.json")["Body"].read()) == {"rows": 3}
    storage.write_json_atomic(uri, {"rows": 4})
    assert storage.read_json(uri) == {"rows": 4} and storage.exists(uri)
    assert not storage.exists(storage.join(s3_bucket, "runs", "missing.json"))

    s3.put_object(Bucket=bucket, Key="from-boto3.txt", Body="written by boto3".encode())
    assert storage.read_text(f"{s3_bucket}/from-boto3.txt") == "written by boto3"

    logs = tmp_path / "tb"
    (logs / "sub").mkdir(parents=True)
    (logs / "events.out").write_bytes(b"\x00\x01")
    (logs / "sub" / "more.out").write_text("x")
    storage.upload_dir(logs, f"{s3_bucket}/tb")
    # (pyarrow also leaves empty "folder/" marker objects; only the files matter)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="tb/")["Contents"]
                  if not o["Key"].endswith("/"))
    assert keys == ["tb/events.out", "tb/sub/more.out"]
    assert s3.get_object(Bucket=bucket, Key="tb/events.out")["Body"].read() == b"\x00\x01"


def test_explicit_endpoint_without_environment(s3_endpoint: str, s3_bucket: str, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    uri = f"{s3_bucket}/explicit.json"
    storage.write_json_atomic(uri, {"ok": True}, endpoint_url=s3_endpoint)
    assert storage.read_json(uri, endpoint_url=s3_endpoint) == {"ok": True}
    # The endpoint may also be given without a scheme, as MinIO users often write it: https is then
    # assumed, so the same plain-HTTP server now refuses the TLS handshake.
    bare = s3_endpoint.removeprefix("http://")
    assert isinstance(storage.s3_filesystem(endpoint_url=bare), pafs.S3FileSystem)  # nothing contacted yet
    with pytest.raises(OSError, match="SSL|TLS"):
        storage.read_json(uri, endpoint_url=bare)


def test_forwarded_env_names_the_store_never_a_secret(monkeypatch):
    """What a driver forwards into a runtime env (shown on the dashboard) says where the store is,
    never who you are: with every AWS variable set, no credential comes out."""
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
               "AWS_SESSION_TOKEN": "session-token-value", "AWS_SECURITY_TOKEN": "security-token-value"}
    settings = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ENDPOINT_URL_S3": "http://minio:9000",
                "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-1"}
    # AWS_PROFILE names a section of this machine's ~/.aws files, which other nodes lack: not forwarded.
    for name, value in {**secrets, **settings, "AWS_PROFILE": "lab"}.items():
        monkeypatch.setenv(name, value)
    forwarded = storage.forwarded_env()
    assert forwarded == settings
    assert not set(forwarded) & set(secrets)
    assert not any(value in forwarded.values() for value in secrets.values())
