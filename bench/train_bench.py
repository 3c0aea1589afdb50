"""Training throughput: the Ray Train loop (1 and 2 DDP workers) against a plain PyTorch loop.

Same model (tiny preset: tiny random BERT + UMAF head), same tokenised demo batches, same step
function (``UmafMethod.train_step``), same global batch size. Samples/s is measured over the training
iterations of each epoch (evaluation excluded) and the median over epochs after the first (warm-up)
is reported, with the ratios side by side:

    python bench/train_bench.py                    # ~3-5 minutes on 2 CPU cores
    python bench/train_bench.py --epochs 4 --n-train 960

Ray Train's figure comes from the run's ``history.json`` (``train_samples_per_s`` per epoch, rank 0).
Each Ray worker gets ``cpus_per_worker`` CPUs and Ray sets its torch threads to match; the plain
loop uses the same thread count as one worker, so "Ray 1 worker / plain" isolates the framework's
overhead and "Ray 2 workers / Ray 1 worker" the DDP scaling on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_loop(cfg, table, epochs: int, threads: int) -> list[float]:
    import numpy as np
    import torch

    from umaf.models.encoders import load_tokenizer
    from umaf.train.method import StepContext
    from umaf.train.text_inputs import PairEncoder
    from umaf.train.umaf_method import CAPTION_COLUMN, UmafMethod

    torch.set_num_threads(threads)
    method = UmafMethod()
    train = table  # the train split, captions joined
    encoded = PairEncoder(load_tokenizer(cfg.umaf.encoder, cfg.umaf.encoder_cache), cfg.umaf.max_length).encode(
        train["text"].to_pylist(), train[CAPTION_COLUMN].to_pylist()
    )
    labels = np.asarray(train["label"].to_pylist(), dtype=np.int64)
    torch.manual_seed(cfg.seed)
    model = method.build_model(cfg, 3)
    optimizer = torch.optim.AdamW(method.param_groups(model, cfg), weight_decay=cfg.weight_decay)
    ctx = StepContext(optimizer=optimizer, device=torch.device("cpu"), config=cfg, grad_clip=cfg.grad_clip)
    n, rates = len(labels), []
    for _ in range(epochs):
        started = time.perf_counter()
        for start in range(0, n, cfg.batch_size):
            batch = {k: v[start:start + cfg.batch_size] for k, v in encoded.items()}
            batch["label"], batch["id"] = labels[start:start + cfg.batch_size], np.arange(len(batch["input_ids"]))
            method.train_step(model, method.collate(batch, ctx.device), ctx)
        rates.append(n / (time.perf_counter() - started))
    return rates


def ray_loop(cfg, workers: int, out: str) -> list[float]:
    from umaf import storage
    from umaf.train.run import run_training

    run_cfg = cfg.model_copy(update={"num_workers": workers, "out": out})
    run_training(run_cfg)
    history = storage.read_json(storage.join(out, "history.json"))
    return [h["train_samples_per_s"] for h in history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=960)
    parser.add_argument("--out", default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()

    import pyarrow.compute as pc
    import ray
    import torch

    from umaf.config import load_config
    from umaf.data.demo import write_demo
    from umaf.data.manifest import read_manifest
    from umaf.models.encoders import build_tiny_random_bert
    from umaf.train.config import TrainConfig
    from umaf.train.umaf_method import join_captions
    from umaf.caption.store import read_ok_captions

    work = Path(args.out or tempfile.mkdtemp(prefix="umaf-train-bench-"))
    demo = write_demo(str(work / "demo"), n_train=args.n_train, n_dev=60, n_test=60)
    cache = str(work / "encoders")
    build_tiny_random_bert(cache)
    cfg = load_config(TrainConfig, "train", preset="tiny", overrides=[
        f"manifest={demo['manifest']}", f"captions={demo['reference_captions']}", f"epochs={args.epochs}",
        f"umaf.encoder_cache={cache}", "shuffle_buffer=0",
    ])

    manifest = read_manifest(demo["manifest"])
    table = manifest.table.append_column("label", manifest.table["label_sentiment"])
    table = join_captions(table, read_ok_captions(demo["reference_captions"]), "text_only").table
    table = table.filter(pc.equal(table["split"], "train"))

    def steady(rates: list[float]) -> float:
        return statistics.median(rates[1:] if len(rates) > 1 else rates)

    results = {"plain_torch_1_thread": steady(plain_loop(cfg, table, args.epochs, threads=int(cfg.cpus_per_worker)))}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        for workers in (1, 2):
            results[f"ray_train_{workers}_worker"] = steady(ray_loop(cfg, workers, str(work / f"ray-{workers}")))
    finally:
        ray.shutdown()

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}",
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "setup": f"tiny preset, demo train split {args.n_train} pairs, global batch {cfg.batch_size}, "
                 f"max_length {cfg.umaf.max_length}, {args.epochs} epochs (median of epochs 2..)",
        "samples_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_ray1_vs_plain": round(results["ray_train_1_worker"] / results["plain_torch_1_thread"], 3),
        "ratio_ray2_vs_ray1": round(results["ray_train_2_worker"] / results["ray_train_1_worker"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
