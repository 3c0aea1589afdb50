"""What every bench here shares: a job function timed on a fresh local Ray cluster, and the facts
(date, machine, load, versions) a figure in RESULTS.md is recorded with."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any


def timed_on_local_ray(work: Callable[[], Any], num_cpus: int) -> tuple[Any, float]:
    """``work()`` on a local Ray cluster of ``num_cpus`` CPUs started for it (start-up not timed):
    its result and its wall-clock seconds."""
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        result = work()
        return result, time.perf_counter() - start
    finally:
        ray.shutdown()


def environment() -> dict[str, Any]:
    import ray
    import torch
    import transformers

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores" + (f", {torch.cuda.get_device_name()}"
                                                                  if torch.cuda.is_available() else ""),
        "load_average": round(os.getloadavg()[0], 1),
        "versions": f"ray {ray.__version__}, torch {torch.__version__}, transformers {transformers.__version__}",
    }
