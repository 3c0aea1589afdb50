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


class GpuBusySampler:
    """GPU utilisation sampled in a background thread while benches run (NVML through ``pynvml``
    where installed, else ``nvidia-smi``), so a figure can say how busy the GPU was in any wall-clock
    window: ``busy_percent(t0, t1)`` is the mean of NVML's "percent of time a kernel was running"
    over the samples inside it. No GPU, or neither tool: ``available`` is False and every window None.
    """

    def __init__(self, interval_s: float = 0.1, index: int = 0):
        import threading

        self.interval_s, self.index = interval_s, index
        self.samples: list[tuple[float, float]] = []  # (time.time(), utilisation %)
        self._stop = threading.Event()
        self._read = self._reader()
        self.available = self._read is not None
        self._thread = threading.Thread(target=self._run, name="gpu-busy-sampler", daemon=True)

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML: try the command line tool
            pass
        import shutil
        import subprocess

        if not shutil.which("nvidia-smi"):
            return None

        def read() -> float:
            out = subprocess.run(["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])

        try:
            read()
            return read
        except Exception:  # noqa: BLE001
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self._read()))
            except Exception:  # noqa: BLE001 - a missed sample is not worth failing a bench
                pass
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuBusySampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def busy_percent(self, start: float, end: float) -> float | None:
        inside = [u for t, u in list(self.samples) if start <= t <= end]
        return round(sum(inside) / len(inside), 1) if inside else None

    def busy_over(self, windows: list[tuple[float, float]]) -> float | None:
        """Mean utilisation over several windows (each epoch of a run), weighted by their samples."""
        inside = [u for t, u in list(self.samples) if any(a <= t <= b for a, b in windows)]
        return round(sum(inside) / len(inside), 1) if inside else None


def gpu_facts() -> dict[str, Any]:
    """Device, driver and CUDA versions for a figure's record (empty without a GPU)."""
    import shutil
    import subprocess

    import torch

    if not torch.cuda.is_available():
        return {}
    facts: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            driver, memory = [x.strip() for x in out.stdout.strip().splitlines()[0].split(",")]
            facts.update(driver=driver, gpu_memory=memory)
    return facts
