"""URIs → pyarrow filesystems: local folders, ``file://`` and ``s3://`` (AWS or any S3-compatible store).

One function, :func:`resolve`, turns a URI into ``(filesystem, path)``; everything that reads or
writes data (Ray Data, pyarrow.dataset, metadata files) goes through it, so a local folder and an
``s3://bucket/prefix`` behave the same.

Credentials are never passed in or logged: pyarrow's S3 client uses the standard AWS chain
(environment, shared config/credentials files, instance role, web identity). Only the endpoint
(MinIO, moto, Ceph...) and region may be given, or taken from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from collections.abc import Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from umaf.errors import UserError

ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV_VARS = ("AWS_REGION", "AWS_DEFAULT_REGION")
# What a driver forwards to the Ray processes that read and write its data: where the store is,
# never who you are. Credentials stay with each node's own AWS chain (instance role, IRSA, its
# environment): in a runtime env they would be shown to anyone who opens the Ray dashboard.
# AWS_PROFILE is not forwarded either: it names a section of the driver machine's ~/.aws files,
# which other nodes do not have; there botocore and pyarrow fail on the unknown profile ("The
# config profile (lab) could not be found") instead of using the node's instance role. Forward it
# on purpose (ray.forward_env=[AWS_PROFILE]) only where every node has that profile.
FORWARDED_ENV_VARS = (*ENDPOINT_ENV_VARS, *REGION_ENV_VARS)
S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 5.0


def forwarded_env() -> dict[str, str]:
    """The driver's non-secret storage settings, for a runtime env's ``env_vars``."""
    return {name: os.environ[name] for name in FORWARDED_ENV_VARS if os.environ.get(name)}


@contextmanager
def scoped_env(env_vars: Mapping[str, str]):
    """``env_vars`` set in this process for the block, the previous values back afterwards: for a
    library that reads the store's address from the environment only (boto3 inside ray.data.llm)."""
    saved = {name: os.environ.get(name) for name in env_vars}
    os.environ.update(env_vars)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def is_s3(uri: str) -> bool:
    return str(uri).startswith(("s3://", "s3a://"))


def _env_first(names: tuple[str, ...]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None


@lru_cache(maxsize=16)
def _s3_filesystem(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {}
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme or "https"
        # S3-compatible servers (MinIO, moto) are addressed by path, not by virtual host.
        kwargs["force_virtual_addressing"] = False
    if region:
        kwargs["region"] = region
    elif endpoint_url:
        kwargs["region"] = "us-east-1"  # custom endpoints ignore it, but pyarrow would ask AWS otherwise
    # Bounded retries with backoff (the AWS SDK's standard strategy): a store that is down fails the
    # call within seconds instead of hanging a job; a brief blip is retried.
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)
    kwargs["connect_timeout"] = S3_CONNECT_TIMEOUT_S
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem for the given (or environment's) endpoint; credentials from the AWS chain."""
    return _s3_filesystem(endpoint_url or _env_first(ENDPOINT_ENV_VARS), region or _env_first(REGION_ENV_VARS))


def resolve(
    uri: str | os.PathLike[str], *, endpoint_url: str | None = None, region: str | None = None
) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for a local path, ``file://`` URI or ``s3://bucket/key`` URI.

    The path is what the filesystem expects: an absolute local path, or ``bucket/key`` for S3.
    """
    text = os.fspath(uri)
    if is_s3(text):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise ValueError(f"S3 URI {text!r} has no bucket: write it as s3://bucket/prefix")
        path = parsed.netloc + ("/" + parsed.path.strip("/") if parsed.path.strip("/") else "")
        return s3_filesystem(endpoint_url, region), path
    if text.startswith("file://"):
        text = urlparse(text).path
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ValueError(f"unsupported URI scheme {scheme!r} in {text!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


class StorageError(UserError):
    """A URI that does not exist, cannot be reached or refuses us, said so the user can act on it."""


def explain(uri: str, exc: BaseException, what: str = "") -> str:
    """One sentence for a failed read or write of ``uri``: what went wrong and what to do."""
    text = str(exc)
    name = f"{what} {uri}" if what else uri
    if is_s3(uri):
        endpoint = _env_first(ENDPOINT_ENV_VARS) or "AWS S3"
        if "NETWORK_CONNECTION" in text or "curlCode" in text or "timed out" in text.lower():
            return (f"{name}: cannot reach the S3 endpoint {endpoint}. Is the store up? Check "
                    "storage.endpoint_url / AWS_ENDPOINT_URL and the network, then rerun (finished work is kept).")
        if any(code in text for code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
                                          "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
            return (f"{name}: the S3 store ({endpoint}) refused our credentials. Check the AWS credential chain "
                    "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, the node's instance role) and its "
                    "permissions on this bucket.")
        if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
            return f"{name}: the bucket does not exist on {endpoint}. Create it, or fix the URI."
    if isinstance(exc, FileNotFoundError) or "No such file" in text or "does not exist" in text:
        return f"{name} does not exist. Check the path (relative paths are relative to the working directory)."
    return f"{name}: {text}"


def require(uri: str, what: str, hint: str = "", **kw: Any) -> None:
    """Raise :class:`StorageError` unless ``uri`` exists and can be reached (a clear message up front,
    instead of a traceback from deep inside a reader)."""
    try:
        found = exists(uri, **kw)
    except OSError as exc:
        raise StorageError(explain(uri, exc, what)) from exc
    if not found:
        raise StorageError(f"{what} {uri} does not exist{': ' + hint if hint else '.'}")


def require_folder(uri: str, what: str, **kw: Any) -> None:
    """Create the output folder ``uri`` (and parents), or raise :class:`StorageError` saying why not."""
    try:
        makedirs(uri, **kw)
    except OSError as exc:
        raise StorageError(explain(uri, exc, what)) from exc


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (``s3://b/p`` + ``x`` → ``s3://b/p/x``; local paths likewise)."""
    text = os.fspath(uri)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(text, *parts)


def exists(uri: str, **kw: Any) -> bool:
    fs, path = resolve(uri, **kw)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str, **kw: Any) -> None:
    fs, path = resolve(uri, **kw)
    fs.create_dir(path, recursive=True)


def write_bytes_atomic(uri: str, data: bytes, **kw: Any) -> None:
    """Write a small file so that readers see either the old or the new content, never a part.

    Local: write a sibling temp file, then rename over the target. S3: a single PUT is atomic.
    """
    fs, path = resolve(uri, **kw)
    parent = posixpath.dirname(path) if not isinstance(fs, pafs.LocalFileSystem) else os.path.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as out:
        out.write(data)


def write_text_atomic(uri: str, text: str, **kw: Any) -> None:
    write_bytes_atomic(uri, text.encode("utf-8"), **kw)


def write_json_atomic(uri: str, obj: Any, **kw: Any) -> None:
    write_text_atomic(uri, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", **kw)


def read_bytes(uri: str, **kw: Any) -> bytes:
    fs, path = resolve(uri, **kw)
    with fs.open_input_stream(path) as fh:
        return fh.read()


def read_text(uri: str, **kw: Any) -> str:
    return read_bytes(uri, **kw).decode("utf-8")


def read_json(uri: str, **kw: Any) -> Any:
    return json.loads(read_text(uri, **kw))


def upload_dir(local_dir: str | Path, uri: str, **kw: Any) -> None:
    """Copy a local folder's files to a URI (e.g. TensorBoard logs to ``s3://``)."""
    fs, path = resolve(uri, **kw)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
