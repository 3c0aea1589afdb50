"""Tune sweep vs the same grid as sequential jobs/train.py runs, side by side in one run.

    python bench/tune_bench.py                      # CPU: tiny preset, demo data, 2x2 grid over K x lambda
    python bench/tune_bench.py --epochs 4 --gpu     # on a GPU node: also 1, 2 and 4 trials sharing one GPU

Prints, for one grid (the tiny UMAF preset on the demo dataset):
- wall time of the grid run one training job after another (what a researcher does by hand) against
  the same grid as one Tune sweep with ASHA and concurrent trials — the ratio is the speed-up;
- epochs trained by the sweep against the full grid's (trials x epochs) — what ASHA saved;
- with --gpu: sweep throughput (trial-epochs per minute) with 1, 2 and 4 trials sharing one GPU
  (``resources.gpus_per_worker`` = 1, 0.5, 0.25).
Both sides use the same Ray cluster, data, seeds and configs; only the orchestration differs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from umaf import storage  # noqa: E402
from umaf.config import load_config  # noqa: E402
from umaf.tune.config import TuneConfig  # noqa: E402
from umaf.tune.space import resolve_space  # noqa: E402
from umaf.tune.sweep import run_sweep, trial_train_config  # noqa: E402


def grid_points(cfg: TuneConfig) -> list[dict]:
    """Every point of the (grid-only) search space, as dotted-key dicts."""
    points = [{}]
    for key, dist in resolve_space(cfg.model, cfg.search.space).items():
        points = [{**p, key: value} for p in points for value in dist.grid]
    return points


def sequential(cfg: TuneConfig, root: str) -> tuple[float, int]:
    from umaf.train.run import run_training

    base = cfg.base_train_config()
    started = time.perf_counter()
    epochs = 0
    for i, point in enumerate(grid_points(cfg)):
        run = trial_train_config(base.model_dump(mode="json"), point, storage.join(root, f"seq-{i}"))
        run_training(run)
        epochs += run.epochs
    return time.perf_counter() - started, epochs


def swept(cfg: TuneConfig) -> tuple[float, int, list[dict]]:
    started = time.perf_counter()
    result = run_sweep(cfg)
    return time.perf_counter() - started, sum(r["epochs"] for r in result["rows"]), result["rows"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    parser.add_argument("--gpu", action="store_true", help="also measure 1/2/4 trials sharing one GPU")
    args = parser.parse_args()

    import ray
    import torch

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
    root = tempfile.mkdtemp(prefix="umaf-tune-bench-")
    overrides = [f"train.epochs={args.epochs}", "train.num_workers=1", f"out={root}", "name=sweep"]
    cfg = load_config(TuneConfig, "tune", preset="tiny", overrides=overrides)
    # Make the demo data once, outside both timings.
    from umaf.data.demo import write_demo

    demo = write_demo(storage.join(root, "demo"))
    cfg = cfg.model_copy(update={"manifest": demo["manifest"], "captions": demo["reference_captions"]})

    seq_s, seq_epochs = sequential(cfg, root)
    tune_s, tune_epochs, rows = swept(cfg)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "versions": {"ray": ray.__version__, "torch": torch.__version__},
        "grid": len(grid_points(cfg)),
        "epochs_per_trial": args.epochs,
        "sequential_s": round(seq_s, 1),
        "tune_s": round(tune_s, 1),
        "speedup_tune_vs_sequential": round(seq_s / tune_s, 2),
        "epochs_full_grid": seq_epochs,
        "epochs_tune": tune_epochs,
        "epochs_saved_by_asha": f"{100 * (1 - tune_epochs / seq_epochs):.0f}%",
        "statuses": [r["status"] for r in rows],
    }
    if args.gpu and torch.cuda.is_available():
        shared = {}
        for n in (1, 2, 4):
            gpu_cfg = cfg.model_copy(update={"name": f"gpu-share-{n}", "max_concurrent_trials": n})
            gpu_cfg.resources.gpus_per_worker = 1 / n
            gpu_cfg.scheduler.kind = "fifo"
            s, epochs, _ = swept(gpu_cfg)
            shared[f"{n}_trials_per_gpu_trial_epochs_per_min"] = round(60 * epochs / s, 2)
        report["gpu_sharing"] = shared
    elif args.gpu:
        report["gpu_sharing"] = "skipped: no CUDA device"
    print(json.dumps(report, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
