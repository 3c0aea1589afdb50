"""A progress line for long stages: at most one every few seconds, with rate and ETA.

The jobs' console output is meant to be read (and ``ray job logs`` to be followed): a stage logs
where it is at a steady pace, not a redrawn bar and not a line per item.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_ray_data_logs() -> Iterator[None]:
    """Ray Data's INFO lines (execution start, plan, non-terminal progress blocks, finish) stay out of
    this process's log inside the block: the job logs its own line for that stage instead."""
    data_logger = logging.getLogger("ray.data")
    saved = data_logger.level
    data_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        data_logger.setLevel(saved)


def actor_logging(logger: logging.Logger) -> None:
    """Make an actor's INFO lines (model loaded, on which device, in how long) reach its worker log,
    and from there ``ray job logs`` and the driver's console. A Ray worker process configures no
    logging, so Python would drop them (only WARNING and above reach stderr through ``lastResort``).
    Adds one stderr handler to the ``umaf`` logger, once per process, unless something (Train's own
    console handler on its workers, a user's setup) already handles it."""
    root_logger = logging.getLogger(logger.name.split(".")[0])
    if root_logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class ProgressLine:
    """``update(n)`` counts ``n`` more items done and logs ``what: done/total, rate, ETA`` when at
    least ``every_s`` seconds have passed since the last line (always on :meth:`finish`)."""

    def __init__(self, logger: logging.Logger, what: str, total: int | None, unit: str = "rows",
                 every_s: float = 10.0, clock=time.monotonic):
        self.logger, self.what, self.total, self.unit, self.every_s, self.clock = logger, what, total, unit, every_s, clock
        self.done = 0
        self.started = self.last = clock()

    def line(self, detail: str = "") -> str:
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and rate > 0 and self.done < self.total:
            eta = f", ETA {format_seconds((self.total - self.done) / rate)}"
        extra = f" ({detail})" if detail else ""
        return f"{self.what}: {self.done}{of} {self.unit}{extra}, {rate:.1f} {self.unit}/s, {format_seconds(elapsed)} elapsed{eta}"

    def update(self, n: int, detail: str = "") -> bool:
        """Count ``n`` items; returns True when a line was logged."""
        self.done += n
        now = self.clock()
        if now - self.last < self.every_s:
            return False
        self.last = now
        self.logger.info(self.line(detail))
        return True

    def finish(self, detail: str = "") -> None:
        self.logger.info(self.line(detail))
