"""UMAF's Table 3 image rows: a frozen image encoder's tokens from the feature cache vs the encoder in
every step, side by side (whole train runs through Ray Train on the demo set).

    python bench/umaf_image_cache_bench.py                          # tiny random BERT + ResNet, 2 epochs
    python bench/umaf_image_cache_bench.py --paper-size --rows 48   # ResNet-50 shapes (random weights, offline)

Same config twice but ``umaf.image_feature_cache``: *off* decodes pixels once (Ray Data) and runs the
image encoder in every training step and evaluation; *auto* runs it once per split into
``<runs>/feature_cache`` (the build is part of the first run's preparation) and every step reads the
fp16 tokens. A second cached run (as a later Tune trial would) reuses the cache. Prints train
samples/s per epoch and the run's wall time, and the ratios cached / off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def paper_size_resnet(folder: str) -> str:
    """Random-weight ResNet-50 (the default ResNetConfig) + its 224-px processor: the paper's FLOPs, offline."""
    import torch
    from transformers import ConvNextImageProcessorPil, ResNetConfig, ResNetModel

    path = os.path.join(folder, "resnet50-random")
    if not os.path.isdir(path):
        torch.manual_seed(0)
        ResNetModel(ResNetConfig()).save_pretrained(path)
        ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paper-size", action="store_true", help="random ResNet-50 instead of the tiny ResNet")
    parser.add_argument("--rows", type=int, default=240, help="rows per split (max_rows_per_split)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from umaf.config import load_config
    from umaf.data.demo import write_demo
    from umaf.storage import read_json
    from umaf.train.config import TrainConfig
    from umaf.train.run import run_training

    work = tempfile.mkdtemp(prefix="umaf-image-cache-bench-")
    demo = write_demo(os.path.join(work, "demo"))
    image_encoder = paper_size_resnet(work) if args.paper_size else "tiny-random-resnet"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = {}
    try:
        for name, cache in (("off", "off"), ("cached (build)", "auto"), ("cached (reuse)", "auto")):
            cfg = load_config(TrainConfig, "train", preset="tiny", overrides=[
                f"manifest={demo['manifest']}", f"captions={demo['reference_captions']}",
                f"out={os.path.join(work, 'runs', name.split()[0] + str(len(results)))}", "umaf.backbone=text+image",
                f"umaf.image_encoder={image_encoder}", f"umaf.image_feature_cache={cache}", f"epochs={args.epochs}",
                "num_workers=1", f"max_rows_per_split={args.rows}", "log_every_s=600"])
            started = time.perf_counter()
            run_training(cfg)
            wall = time.perf_counter() - started
            history = read_json(os.path.join(cfg.out, "history.json"))
            results[name] = {"wall_s": wall, "samples_per_s": [h["train_samples_per_s"] for h in history]}
    finally:
        ray.shutdown()
    base = results["off"]
    print(f"image encoder: {image_encoder}; {args.rows} rows per split; {args.epochs} epochs; 1 CPU worker")
    print(f"{'run':<16} {'wall s':>8} {'x off':>7} {'train samples/s (last epoch)':>30} {'x off':>7}")
    for name, r in results.items():
        print(f"{name:<16} {r['wall_s']:8.1f} {base['wall_s'] / r['wall_s']:7.2f} {r['samples_per_s'][-1]:30.1f} "
              f"{r['samples_per_s'][-1] / base['samples_per_s'][-1]:7.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
