"""jobs/tune.py: ``max_concurrent_trials`` is a cap for every search algorithm (issue 13).

Ray Tune applies ``max_concurrent_trials`` only to a ``Searcher``; a grid search (a
``BasicVariantGenerator``) used to start every trial at once whatever the cap. With a cap of 1 the
trials of a grid must run one after another: no trial's run starts before the previous one's ended.
The times come from the trials' own run folders (``config.yaml`` is the first file a trial writes,
``metrics.json`` the last), not from wall-clock guesses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import job_main


@pytest.mark.ray
@pytest.mark.slow
def test_grid_sweep_with_a_cap_of_one_runs_its_trials_one_after_another(ray_cluster, tmp_path: Path):
    out = tmp_path / "sweeps"
    result = job_main("tune")([
        "--out", str(out), "max_concurrent_trials=1", "train.epochs=1", "train.max_rows_per_split=64",
        "scheduler.kind=fifo", "search.space.lambda={grid: [0.0]}",  # K in {2, 10}: 2 trials
    ])
    rows = result["rows"]
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows

    runs = out / "tiny-umaf" / "runs"
    spans = []
    for row in rows:
        run = runs / row["trial_id"]
        spans.append(((run / "config.yaml").stat().st_mtime_ns, (run / "metrics.json").stat().st_mtime_ns))
    spans.sort()
    (first_start, first_end), (second_start, second_end) = spans
    assert first_start < first_end and second_start < second_end
    assert second_start >= first_end, (
        f"the trials overlapped by {(first_end - second_start) / 1e9:.1f} s with max_concurrent_trials=1: {spans}"
    )
