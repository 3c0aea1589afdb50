"""The driver's caption writer: a Parquet file every N rows or T seconds, whichever comes first.

Why the driver writes, not Ray Data's ``write_parquet``: its ``min_rows_per_file`` holds rows in the
write tasks until the count is reached (with 20,000 a run under 20,000 rows wrote nothing before its
end, and a kill lost everything), and nothing in it bounds the time a finished caption waits. Here
the driver pulls the finished caption rows (a few KB each) from the streaming plan with
``iter_batches`` and writes them itself:

- a file is written when ``rows_per_file`` rows are buffered, or when the oldest buffered row has
  waited ``flush_seconds`` (a background thread checks every second, so a stalled plan does not
  hold rows back); a SIGKILL of the driver loses at most those buffered rows plus the rows in flight;
- each file is written whole, once: a single PUT on S3, a temp file renamed into place locally
  (:func:`umaf.storage.write_bytes_atomic`), so readers never see a torn file and no row is written
  twice;
- a failed write is retried ``write_attempts`` times with exponential backoff (1, 2, 4... s), then
  the job stops with an error that names the file and the storage error: an object-store outage
  ends the run cleanly, and the rerun resumes from the files already there.

Every row written is also counted in the ``umaf_caption_*`` metrics (:class:`CaptionMetrics`), for
both backends, in one place.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
from collections import Counter as TallyCounter

import pyarrow as pa
import pyarrow.parquet as pq

from umaf import storage
from umaf.caption.store import CAPTION_SCHEMA
from umaf.errors import UserError

log = logging.getLogger("umaf.caption")


class CaptionWriteError(UserError):
    """Storage kept failing for one file after every attempt: the job ends with one line saying so and
    that a rerun resumes (what is written stays), not with a traceback."""


class CaptionMetrics:
    """Custom metrics (``ray.util.metrics``) on the dashboard's metrics page / Prometheus endpoint."""

    def __init__(self, dataset: str, model: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"dataset": dataset, "model": model}
        self.captions = Counter("umaf_caption_captions", "captions written, by status",
                                tag_keys=("dataset", "model", "status"))
        self.tokens = Counter("umaf_caption_output_tokens", "tokens generated", tag_keys=("dataset", "model"))
        self.rate = Gauge("umaf_caption_images_per_second", "captions written per second (whole job, last file)",
                          tag_keys=("dataset", "model"))

    def record(self, table: pa.Table, seconds: float) -> None:
        for status, n in TallyCounter(table["status"].to_pylist()).items():
            self.captions.inc(n, tags={**self.tags, "status": status})
        # Rows copied from an identical request (reused_from set) generated nothing.
        reused = table["reused_from"].to_pylist() if "reused_from" in table.column_names else [None] * table.num_rows
        tokens = sum(t or 0 for t, r in zip(table["output_tokens"].to_pylist(), reused) if r is None)
        if tokens:
            self.tokens.inc(tokens, tags=self.tags)
        if seconds > 0:
            self.rate.set(table.num_rows / seconds, tags=self.tags)


class CaptionWriter:
    """The driver's writer of caption rows; ``schema``/``noun``/``tag`` let other jobs that stream rows
    to a Parquet dataset (the predict job's predictions) write them the same way."""

    def __init__(self, out_uri: str, *, rows_per_file: int, flush_seconds: float, attempts: int,
                 storage_kw: dict, metrics: CaptionMetrics | None = None, backoff_s: float = 1.0,
                 schema: pa.Schema = CAPTION_SCHEMA, noun: str = "captions", tag: str = "[caption stage=write]",
                 logger: logging.Logger = log):
        self.out_uri = out_uri
        self.schema, self.noun, self.tag, self.log = schema, noun, tag, logger
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.attempts = attempts
        self.storage_kw = storage_kw
        self.metrics = metrics
        self.backoff_s = backoff_s
        self.run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        self.files: list[str] = []
        self.rows_written = 0
        self.failed_attempts = 0
        # Notified after every file written and every failed attempt: wait_until() lets a caller (a
        # test, a job that must know a file has landed) wait for exactly that instead of sleeping.
        self._progress = threading.Condition()
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._oldest: float | None = None
        self._last_write = time.monotonic()
        self._lock = threading.Lock()  # one writer at a time: the stream and the timer
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._timer = threading.Thread(target=self._tick, name="caption-writer-flush", daemon=True)

    def __enter__(self) -> CaptionWriter:
        self._timer.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        # Wait for a write the timer has in flight, however long its bounded retries take: returning
        # early would let a failing timer write drop its rows silently while the stream "succeeds".
        self._timer.join()
        if exc_type is None:
            self._raise_if_failed()
            self.flush()
        elif self._error is None and not isinstance(exc, CaptionWriteError):
            try:  # the plan failed: keep the captions that did finish
                self.flush()
            except Exception:  # noqa: BLE001 - the plan's error is the one to report
                self.log.exception("%s could not write the last buffered rows", self.tag)

    def add(self, table: pa.Table) -> None:
        self._raise_if_failed()
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        with self._lock:
            self._raise_if_failed()  # the timer may have failed while this call waited for the lock
            self._buffer.append(table)
            self._buffered += table.num_rows
            if self._oldest is None:
                self._oldest = time.monotonic()
            while self._buffered >= self.rows_per_file:
                self._write_locked(self.rows_per_file)

    def wait_until(self, condition, timeout: float) -> bool:
        """Block until ``condition(self)`` holds (checked after each write or failed attempt) or
        ``timeout`` seconds pass; returns whether it holds."""
        with self._progress:
            return self._progress.wait_for(lambda: condition(self), timeout)

    def _notify(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def flush(self) -> None:
        with self._lock:
            if self._buffered:
                self._write_locked(self._buffered)

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            try:
                with self._lock:
                    if self._oldest is not None and time.monotonic() - self._oldest >= self.flush_seconds:
                        self._write_locked(self._buffered)
            except BaseException as exc:  # surfaced to the stream on its next add()/exit
                self._error = exc
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_locked(self, n: int) -> None:
        table = pa.concat_tables(self._buffer)
        head, rest = table.slice(0, n), table.slice(n)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows
        self._oldest = time.monotonic() if rest.num_rows else None
        name = f"part-{self.run_id}-{len(self.files):05d}.parquet"
        uri = storage.join(self.out_uri, name)
        sink = io.BytesIO()
        pq.write_table(head.combine_chunks(), sink, compression="zstd")
        data = sink.getvalue()
        for attempt in range(1, self.attempts + 1):
            try:
                storage.write_bytes_atomic(uri, data, **self.storage_kw)
                break
            except Exception as exc:  # noqa: BLE001 - storage errors come as OSError, ArrowException, ...
                self.failed_attempts += 1
                self._notify()
                if attempt == self.attempts:
                    raise CaptionWriteError(
                        f"cannot write {head.num_rows} {self.noun} to {uri} after {self.attempts} "
                        f"attempt{'s' if self.attempts > 1 else ''} "
                        f"(storage unreachable or refusing writes): {type(exc).__name__}: {exc}. Rows already "
                        f"written ({self.rows_written} in {len(self.files)} files this run) are kept; rerun the "
                        "same command when storage is back and it resumes from them."
                    ) from exc
                wait = self.backoff_s * 2 ** (attempt - 1)
                self.log.warning("%s writing %s failed (attempt %d/%d): %s: %s; retrying in %.0fs",
                            self.tag, uri, attempt, self.attempts, type(exc).__name__, exc, wait)
                time.sleep(wait)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.record(head, now - self._last_write)
        self._last_write = now
        self.files.append(uri)
        self.rows_written += head.num_rows
        self._notify()
        self.log.info("%s %s: %d rows (%d this run)", self.tag, name, head.num_rows, self.rows_written)
