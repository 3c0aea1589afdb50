"""The progress line long stages log: paced, with rate and ETA (a fake clock, no sleeping)."""

from __future__ import annotations

import logging

from umaf.progress import ProgressLine, format_seconds


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_lines_are_paced_and_say_rate_and_eta(caplog):
    clock = FakeClock()
    progress = ProgressLine(logging.getLogger("umaf.test"), "captioned", 1000, unit="pairs", every_s=10, clock=clock)
    with caplog.at_level("INFO", logger="umaf.test"):
        clock.now += 4
        assert progress.update(100) is False  # 4 s after the start: too soon
        clock.now += 6
        assert progress.update(100, "ok 200") is True  # 10 s: 200 pairs done, 20/s, 800 left → 40 s
        clock.now += 1
        assert progress.update(50) is False
        progress.finish()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "captioned: 200/1000 pairs (ok 200), 20.0 pairs/s, 10s elapsed, ETA 40s"
    assert lines[1].startswith("captioned: 250/1000 pairs, ") and "11s elapsed" in lines[1]
    assert len(lines) == 2


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3600, 3725)] == ["0s", "59s", "1m01s", "1h00m", "1h02m"]
