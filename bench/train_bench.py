"""Training throughput: the Ray Train loop (1 and 2 DDP workers) against a plain PyTorch loop.

Same model, same tokenised demo batches, same step function (``UmafMethod.train_step``), same global
batch size. Samples/s is measured over the training iterations of each epoch (evaluation excluded)
and the median over epochs after the first (warm-up) is reported, with the ratios side by side:

    python bench/train_bench.py                    # tiny preset, CPU: ~3-5 minutes on 2 idle cores
    python bench/train_bench.py --epochs 4 --n-train 960
    python bench/train_bench.py --device cuda --paper-size   # issue 13's GPU measurement (goal: Ray >= 0.95x plain)

``--paper-size``: a random-weight encoder of RoBERTa-base's shape (12 layers, 768 wide, 12 heads)
with the MiniLM tokenizer, built offline, ``max_length`` 256, global batch 32 — the FLOPs of the
paper's UMAF without a download. ``--device cuda``: the plain loop on the GPU with bf16 autocast
(as the Ray loop uses there) and Ray Train with ``use_gpu`` (1 worker per GPU; 2 workers only when
the machine has 2 GPUs).

Ray Train's figure comes from the run's ``history.json`` (``train_samples_per_s`` per epoch, rank 0).
Each Ray worker gets ``cpus_per_worker`` CPUs and Ray sets its torch threads to match; the plain
loop uses the same thread count as one worker, so "Ray 1 worker / plain" isolates the framework's
overhead and "Ray 2 workers / Ray 1 worker" the DDP scaling on this machine. The plain loop runs
before *and* after the Ray runs (its two figures and their mean are printed): on a shared machine a
change of load between them shows up as a gap between the two plain figures.
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


def plain_loop(cfg, table, epochs: int, threads: int, device_name: str = "cpu",
               windows: list[tuple[float, float]] | None = None, profile: dict | None = None) -> list[float]:
    """Samples/s of each epoch. ``windows`` (if given) receives each epoch's wall-clock (start, end);
    ``profile`` (if given) receives ``table``: a ``torch.profiler`` summary of ``profile["steps"]`` more
    steps after the timed epochs (the ops that cost the most device and host time)."""
    import numpy as np
    import torch

    from umaf.models.encoders import load_tokenizer
    from umaf.train.method import StepContext
    from umaf.train.text_inputs import PairEncoder
    from umaf.train.umaf_method import CAPTION_COLUMN, UmafMethod

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    method = UmafMethod()
    train = table  # the train split, captions joined
    encoded = PairEncoder(load_tokenizer(cfg.umaf.tokenizer or cfg.umaf.encoder, cfg.umaf.encoder_cache),
                          cfg.umaf.max_length).encode(train["text"].to_pylist(), train[CAPTION_COLUMN].to_pylist())
    labels = np.asarray(train["label"].to_pylist(), dtype=np.int64)
    torch.manual_seed(cfg.seed)
    model = method.build_model(cfg, 3).to(device)
    optimizer = torch.optim.AdamW(method.param_groups(model, cfg), weight_decay=cfg.weight_decay)
    # The Ray loop's settings on this device: bf16 autocast on a GPU, full precision on CPU.
    ctx = StepContext(optimizer=optimizer, device=device, config=cfg, grad_clip=cfg.grad_clip,
                      autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    n, rates = len(labels), []

    def step(start: int) -> None:
        batch = {k: v[start:start + cfg.batch_size] for k, v in encoded.items()}
        batch["label"], batch["id"] = labels[start:start + cfg.batch_size], np.arange(len(batch["input_ids"]))
        method.train_step(model, method.collate(batch, device), ctx)

    for _ in range(epochs):
        started, started_at = time.perf_counter(), time.time()
        for start in range(0, n, cfg.batch_size):
            step(start)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rates.append(n / seconds)
        if windows is not None:
            windows.append((started_at, started_at + seconds))
    if profile is not None:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for i in range(profile.get("steps", 10)):
                step((i * cfg.batch_size) % max(1, n - cfg.batch_size + 1))
            if device.type == "cuda":
                torch.cuda.synchronize()
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        profile["table"] = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=50)
    return rates


def build_paper_size_encoder(folder: Path) -> str:
    """A random-weight RoBERTa-base-shaped encoder with the MiniLM tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    from umaf.models.encoders import minilm_path

    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    # RoBERTa-base: 12 layers, 768 hidden, 12 heads, 3072 FFN (RobertaConfig's defaults). Two token
    # types because the pair encoder marks [T_vlm] as the second segment.
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=514, type_vocab_size=2,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


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
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--paper-size", action="store_true",
                        help="random-weight RoBERTa-base shape + MiniLM tokenizer, max_length 256, batch 32")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="Ray Train worker counts to run (default: 1 2 on CPU, 1 per GPU up to 2 on cuda)")
    parser.add_argument("--out", default=None, help="work folder (default: a temp folder)")
    args = parser.parse_args()

    import pyarrow.compute as pc
    import ray
    import torch

    from umaf.caption.store import read_ok_captions
    from umaf.config import load_config
    from umaf.data.demo import write_demo
    from umaf.data.manifest import read_manifest
    from umaf.models.encoders import build_tiny_random_bert
    from umaf.train.config import TrainConfig
    from umaf.train.umaf_method import join_captions

    on_gpu = args.device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch sees no CUDA device")
    gpus = torch.cuda.device_count() if on_gpu else 0
    workers = args.workers or ([1, 2] if not on_gpu else list(range(1, min(2, gpus) + 1)))

    work = Path(args.out or tempfile.mkdtemp(prefix="umaf-train-bench-"))
    demo = write_demo(str(work / "demo"), n_train=args.n_train, n_dev=60, n_test=60)
    cache = str(work / "encoders")
    overrides = [
        f"manifest={demo['manifest']}", f"captions={demo['reference_captions']}", f"epochs={args.epochs}",
        f"umaf.encoder_cache={cache}", "shuffle_buffer=0",
    ]
    if args.paper_size:
        encoder = build_paper_size_encoder(work / "encoders" / "roberta-base-shape-random")
        overrides += [f"umaf.encoder={encoder}", "umaf.max_length=256", "umaf.fusion_heads=12", "batch_size=32",
                      "lr=1e-4", "encoder_lr=2e-5"]
    else:
        build_tiny_random_bert(cache)
    if on_gpu:
        overrides += ["use_gpu=true", "cpus_per_worker=4"]
    cfg = load_config(TrainConfig, "train", preset="tiny", overrides=overrides)

    manifest = read_manifest(demo["manifest"])
    table = manifest.table.append_column("label", manifest.table["label_sentiment"])
    table = join_captions(table, read_ok_captions(demo["reference_captions"]), "text_only").table
    table = table.filter(pc.equal(table["split"], "train"))

    def steady(rates: list[float]) -> float:
        return statistics.median(rates[1:] if len(rates) > 1 else rates)

    threads = int(cfg.cpus_per_worker)
    results = {"plain_before": steady(plain_loop(cfg, table, args.epochs, threads, args.device))}
    ray.init(address="local", num_cpus=max(4, int(cfg.cpus_per_worker) * max(workers)), include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}})
    try:
        for n in workers:
            results[f"ray_train_{n}_worker"] = steady(ray_loop(cfg, n, str(work / f"ray-{n}")))
    finally:
        ray.shutdown()
    results["plain_after"] = steady(plain_loop(cfg, table, args.epochs, threads, args.device))
    plain = (results["plain_before"] + results["plain_after"]) / 2

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}"
                   + (f", {torch.cuda.get_device_name(0)}" if on_gpu else ""),
        "versions": {"torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
                     **({"cuda": torch.version.cuda} if on_gpu else {})},
        "setup": f"{'paper-size (RoBERTa-base shape, random weights)' if args.paper_size else 'tiny preset'}, "
                 f"{args.device}, demo train split {args.n_train} pairs, global batch {cfg.batch_size}, "
                 f"max_length {cfg.umaf.max_length}, {args.epochs} epochs (median of epochs 2..), "
                 f"plain loop {threads} thread(s)",
        "samples_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_ray1_vs_plain": round(results["ray_train_1_worker"] / plain, 3),
    }
    if "ray_train_2_worker" in results:
        report["ratio_ray2_vs_ray1"] = round(results["ray_train_2_worker"] / results["ray_train_1_worker"], 3)
    print(json.dumps(report, indent=2))
    print(f"\nRay Train 1 worker / plain loop: {report['ratio_ray1_vs_plain']:.3f}x  "
          f"({results['ray_train_1_worker']:.1f} vs {plain:.1f} samples/s; plain before/after "
          f"{results['plain_before']:.1f}/{results['plain_after']:.1f})")


if __name__ == "__main__":
    main()
