"""Frozen-feature cache for SPP-SCL: epoch time and storage with and without it, side by side.

    python bench/feature_cache_bench.py                       # tiny random encoders, demo data, CPU
    python bench/feature_cache_bench.py --paper-size --rows 64   # ResNet-50 + BERT-base shapes, random weights
    python bench/feature_cache_bench.py --image-encoder microsoft/resnet-50 --text-encoder bert-base-uncased \\
        --image-size 224 --max-length 200 --device cuda       # the paper's encoders (needs the hub or a local copy)

``--paper-size`` builds random-weight models from the default ``ResNetConfig`` (ResNet-50) and
``BertConfig`` (BERT-base) offline: the same architecture and FLOPs as the paper's checkpoints, so
the timings and sizes are theirs, without a download.

Same rows, same model head, same two-step update (``umaf.train.sppscl_method.two_step_update``),
single process, so the difference is exactly the frozen encoders' forward passes:

- *uncached*: Ray Data preprocesses once to token ids + pixels; every step runs ResNet and BERT;
- *cached*: a Ray Data job runs the encoders once per split and writes fp16 Parquet
  (:mod:`umaf.train.feature_cache`); every step decodes those bytes and runs only the head.

Reports per-epoch wall time (median of ``--epochs``), the one-off cache build time and the break-even
epoch count, and storage: the Parquet cache on disk vs the preprocessed uncached rows in Ray's
object store.

``--build-only`` times just the cache build of all three splits (train/dev/test, ``--rows`` /
``--eval-rows`` each), cold, as a training job does it — through ``preprocess_splits`` where the
method has it (one encoder load per actor for every split), else split by split. Run it from two
checkouts alternately to compare builds side by side (the script imports the package of its own
checkout)::

    python bench/feature_cache_bench.py --build-only --rows 240 --eval-rows 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _epoch(model, batches, method, cfg, device) -> float:
    import torch

    from umaf.train.method import StepContext

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    ctx = StepContext(optimizer=optimizer, device=device, config=cfg)
    model.train()
    started = time.perf_counter()
    for batch in batches:
        method.train_step(model, method.collate(batch, device), ctx)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _paper_size_encoders(folder: str) -> tuple[str, str]:
    """Random-weight ResNet-50 and BERT-base (default configs), saved like hub checkpoints."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, ConvNextImageProcessorPil, ResNetConfig, ResNetModel

    from umaf.models.encoders import minilm_path

    torch.manual_seed(0)
    image, text = os.path.join(folder, "resnet-50"), os.path.join(folder, "bert-base")
    ResNetModel(ResNetConfig()).save_pretrained(image)
    ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=224 / 256).save_pretrained(image)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size), add_pooling_layer=False).save_pretrained(text)
    tokenizer.save_pretrained(text)
    return image, text


def cold_build(table, out: str, *, image_encoder: str, text_encoder: str, image_size: int, max_length: int,
               batch_size: int, device: str, actors: int, gpus_per_actor: float = 1.0) -> tuple[float, int, str]:
    """Build the train/dev/test cache of ``table``'s rows (a manifest with ``label``) for a run at
    ``out``, on the running Ray, as a training job does: (seconds, rows read back, how it was built)."""
    import pyarrow.compute as pc
    import ray

    from umaf.models.sppscl import SppSclConfig
    from umaf.train.config import TrainConfig
    from umaf.train.sppscl_method import SppSclMethod

    cfg = TrainConfig(model="sppscl", out=out, batch_size=batch_size, num_workers=1, use_gpu=device == "cuda",
                      preprocess_concurrency=actors, preprocess_gpus_per_actor=gpus_per_actor,
                      sppscl=SppSclConfig(image_encoder=image_encoder, text_encoder=text_encoder,
                                          image_size=image_size, max_length=max_length, feature_cache="on"))
    method = SppSclMethod()
    raw = {split: ray.data.from_arrow(table.filter(pc.equal(table["split"], split))) for split in ("train", "dev", "test")}
    started = time.perf_counter()
    if hasattr(method, "preprocess_splits"):
        built = {k: v.materialize() for k, v in method.preprocess_splits(raw, cfg).items()}
        how = "preprocess_splits (one job, actor pool)"
    else:
        built = {k: method.preprocess(v, cfg, k).materialize() for k, v in raw.items()}
        how = "preprocess per split (tasks)"
    seconds = time.perf_counter() - started
    return seconds, sum(ds.count() for ds in built.values()), how


def build_only(args) -> dict:
    """Cold build of the cache for train/dev/test in a fresh local Ray: seconds and rows/s."""
    import platform

    import ray
    import torch

    from umaf.data.demo import write_demo
    from umaf.data.manifest import read_manifest

    work = tempfile.mkdtemp(prefix="umaf-cache-build-bench-")
    demo = write_demo(work, n_train=args.rows, n_dev=args.eval_rows, n_test=args.eval_rows)
    manifest = read_manifest(demo["manifest"])
    table = manifest.table.append_column("label", manifest.table["label_sentiment"])
    ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        seconds, rows, how = cold_build(table, os.path.join(work, "runs", "r"), image_encoder=args.image_encoder,
                                        text_encoder=args.text_encoder, image_size=args.image_size,
                                        max_length=args.max_length, batch_size=args.batch_size, device=args.device,
                                        actors=args.actors)
    finally:
        ray.shutdown()
    result = {"build_s": round(seconds, 2), "rows": rows, "rows_per_s": round(rows / seconds, 2), "how": how,
              "device": args.device, "actors": args.actors, "image_encoder": args.image_encoder,
              "text_encoder": args.text_encoder, "image_size": args.image_size, "max_length": args.max_length,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_avg": [round(x, 1) for x in os.getloadavg()], "torch": torch.__version__, "ray": ray.__version__,
              "python": platform.python_version()}
    print(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-encoder", default="tiny-random-resnet")
    parser.add_argument("--text-encoder", default="tiny-random-bert")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--rows", type=int, default=240, help="training rows of the demo dataset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper-size", action="store_true", help="random ResNet-50 + BERT-base, 224 px, 200 tokens")
    parser.add_argument("--build-only", action="store_true", help="time only a cold cache build of train/dev/test")
    parser.add_argument("--eval-rows", type=int, default=60, help="--build-only: dev and test rows each")
    parser.add_argument("--actors", type=int, default=1, help="--build-only: encoder actors (preprocess_concurrency)")
    args = parser.parse_args(argv)
    if args.paper_size:
        args.image_encoder, args.text_encoder = _paper_size_encoders(tempfile.mkdtemp(prefix="umaf-paper-size-"))
        args.image_size, args.max_length = 224, 200
    if args.build_only:
        return build_only(args)

    import ray
    import torch

    from umaf.data.demo import write_demo
    from umaf.data.manifest import read_manifest
    from umaf.models.sppscl import SppSclConfig, SppSclModel
    from umaf.train.config import TrainConfig
    from umaf.train.feature_cache import cache_size_bytes
    from umaf.train.sppscl_method import SppSclMethod

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = tempfile.mkdtemp(prefix="umaf-cache-bench-")
    demo = write_demo(work, n_train=args.rows, n_dev=0, n_test=0)
    table = read_manifest(demo["manifest"]).split("train")
    table = table.append_column("label", table["label_sentiment"])

    ray.init(address="local", num_cpus=max(2, args.threads), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {"rows": table.num_rows, "batch_size": args.batch_size, "device": str(device),
                     "image_encoder": args.image_encoder, "text_encoder": args.text_encoder}
    try:
        method = SppSclMethod()
        common = {"image_encoder": args.image_encoder, "text_encoder": args.text_encoder,
                  "image_size": args.image_size, "max_length": args.max_length}
        for mode in ("off", "on"):
            cfg = TrainConfig(model="sppscl", out=os.path.join(work, "runs", mode), lr=1e-3, batch_size=args.batch_size,
                              num_workers=1, sppscl=SppSclConfig(**common, feature_cache=mode))
            started = time.perf_counter()
            ds = method.preprocess(ray.data.from_arrow(table), cfg, "train").materialize()
            prep_s = time.perf_counter() - started
            batches = list(ds.iter_batches(batch_size=args.batch_size, batch_format="numpy"))
            torch.manual_seed(0)
            model = SppSclModel(cfg.sppscl, 3, with_encoders=mode == "off").to(device)
            times = [_epoch(model, batches, method, cfg, device) for _ in range(args.epochs)]
            entry = {"preprocess_s": round(prep_s, 2), "epoch_s": round(statistics.median(times), 3),
                     "epoch_times_s": [round(t, 3) for t in times], "object_store_bytes": int(ds.size_bytes())}
            if mode == "on":
                entry["cache_parquet_bytes"] = cache_size_bytes(method.cache_info["train"]["uri"], {})
                # A second run/trial finds the cache: only reading it back.
                started = time.perf_counter()
                method.preprocess(ray.data.from_arrow(table), cfg, "train").materialize()
                entry["cache_hit_preprocess_s"] = round(time.perf_counter() - started, 2)
            results["uncached" if mode == "off" else "cached"] = entry
    finally:
        ray.shutdown()
    unc, cac = results["uncached"], results["cached"]
    saved = unc["epoch_s"] - cac["epoch_s"]
    extra_build = cac["preprocess_s"] - unc["preprocess_s"]
    results["epoch_speedup"] = round(unc["epoch_s"] / max(cac["epoch_s"], 1e-9), 2)
    results["break_even_epochs"] = round(extra_build / saved, 2) if saved > 0 else None
    results["cache_bytes_per_row"] = int(cac["cache_parquet_bytes"] / max(1, table.num_rows))
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
