"""Every GPU figure of the project in one run, each against its goal (issue 23).

    bash bench/gpu_suite.sh OUT_DIR                 # on a GPU machine: the figures at the sizes below
    python bench/gpu_suite.py --device cpu --out D   # the same code at tiny size on CPU (CI's rehearsal)

Sections (``--sections`` picks some), run one after another on one local Ray, with the GPU's busy
percentage sampled throughout (NVML, every 0.1 s) and read inside each figure's own time windows:

- ``train``: UMAF at RoBERTa-base shape (random weights, MiniLM tokenizer), bf16, global batch 32,
  max_length 256, captions long enough to fill it: Ray Train with 1 GPU worker against the plain
  PyTorch loop (same step function, same rows, no shuffling on either side), samples/s median of the
  epochs after the first, and the GPU busy % inside those epochs. Goal: Ray / plain >= 0.95.
  A ``torch.profiler`` summary of the plain loop's steps is written beside the results.
- ``cache``: SPP-SCL's frozen-feature cache (random ResNet-50 + BERT-base, 224 px, 200 tokens), a cold
  build of train/dev/test. "After model load" is the steady state: from the first cache file written
  to the last, rows over seconds. Goals: <= 2 s per 1,000 rows and GPU busy >= 70% in that state
  (the whole build's busy %, model load included, is reported beside it).
- ``caption``: the ``hf`` backend on CUDA with the largest random-weight VLM this bench builds in
  under a minute (``bench-1b``: CLIP ViT-L/14 + a TinyLlama-1.1B-shaped decoder), grammar-bounded
  JSON: images/s steady (after the first batch) and end to end (model load included) for the plain
  loop and the Ray Data pipeline, and pipeline / loop. No goal is set for it; it is recorded.
- ``tune``: a Tune sweep of 4 trials at 1/4 GPU each against 1 trial on the whole GPU (MiniLM-shaped
  random encoder): trials per minute and training samples/s, and proof from the trials' own
  ``history.json`` timestamps that all four were training at one instant. Goal: they overlapped.

Writes ``gpu_suite.json`` and ``gpu_suite.md`` into ``--out`` after every section (a run cut short
keeps what it measured) and exits 1 when a section failed or, on a GPU, a goal was missed. On CPU the
goals are not judged (the sizes are tiny): the run proves the code paths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import GpuBusySampler, environment, gpu_facts  # noqa: E402

# Sizes per device: on the GPU each figure is a steady-state median over seconds of work (the whole
# suite took 7.7 minutes on one H200 on 2026-12-04, the tune section half of it; the `gpu` tests
# take 3 more); on CPU the same code runs at tiny size in 6-11 minutes on 2 loaded cores.
SIZES: dict[str, dict[str, Any]] = {
    "cuda": {"train_rows": 4800, "train_epochs": 3, "cache_rows": 5000, "cache_eval_rows": 250,
             "cache_layouts": [(1, 1.0), (4, 0.25)],
             "caption_pairs": 128, "caption_batch": 16, "vlm_shape": "bench-1b", "tune_rows": 3200,
             "tune_epochs": 3, "tune_trials": 4, "cpus_per_worker": 4},
    "cpu": {"train_rows": 96, "train_epochs": 2, "cache_rows": 32, "cache_eval_rows": 8,
            "cache_layouts": [(1, 1.0)],
            "caption_pairs": 8, "caption_batch": 4, "vlm_shape": "tiny", "tune_rows": 64, "tune_epochs": 1,
            "tune_trials": 2, "cpus_per_worker": 1},
}
GOALS = {"train_ray_over_plain": 0.95, "cache_busy_percent": 70.0, "cache_s_per_1000_rows": 2.0}


class Suite:
    def __init__(self, device: str, out: Path, work: Path):
        self.device, self.out, self.work = device, out, work
        self.on_gpu = device == "cuda"
        self.size = SIZES[device]
        self.report: dict[str, Any] = {**environment(), **gpu_facts(), "device": device, "sizes": self.size,
                                       "goals": GOALS, "sections": {}}
        self.sampler = GpuBusySampler()
        self._demo: dict[str, str] | None = None

    # ---- shared inputs -----------------------------------------------------------------------

    def demo(self) -> dict[str, str]:
        """One demo dataset for the train, cache and tune sections (the largest size any needs)."""
        if self._demo is None:
            from umaf.data.demo import write_demo

            rows = max(self.size["train_rows"], self.size["cache_rows"], self.size["tune_rows"])
            self._demo = write_demo(str(self.work / "demo"), n_train=rows, n_dev=self.size["cache_eval_rows"],
                                    n_test=self.size["cache_eval_rows"])
        return self._demo

    def long_captions(self) -> str:
        """The demo's reference captions with every field repeated 6 times: a UMAF pair then fills
        max_length 256, as the paper's VLM captions do (hundreds of tokens), so the bench's steps have
        the paper's shape instead of the demo's ~50 tokens."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from umaf.caption.store import read_captions

        folder = self.work / "long_captions"
        if not folder.exists():
            table = read_captions(self.demo()["reference_captions"])
            for field in ("ocr", "visual_scene", "textimage_relation"):
                column = pc.fill_null(table[field], "")
                longer = pa.array([" ".join([v] * 6) if v else v for v in column.to_pylist()], pa.string())
                table = table.set_column(table.schema.get_field_index(field), field, longer)
            folder.mkdir(parents=True)
            pq.write_table(table, folder / "part-0.parquet")
        return str(folder)

    def busy(self, windows: list[tuple[float, float]]) -> float | None:
        return self.sampler.busy_over(windows) if self.on_gpu else None

    # ---- sections --------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        import pyarrow.compute as pc

        from train_bench import build_paper_size_encoder, plain_loop

        from umaf import storage
        from umaf.caption.store import read_ok_captions
        from umaf.config import load_config
        from umaf.data.manifest import read_manifest
        from umaf.models.encoders import build_tiny_random_bert
        from umaf.train.config import TrainConfig
        from umaf.train.run import run_training
        from umaf.train.umaf_method import join_captions

        demo, epochs = self.demo(), self.size["train_epochs"]
        cache = str(self.work / "encoders")
        overrides = [f"manifest={demo['manifest']}", f"epochs={epochs}", f"umaf.encoder_cache={cache}",
                     "shuffle_buffer=0", f"max_rows_per_split={self.size['train_rows']}", "num_workers=1",
                     f"cpus_per_worker={self.size['cpus_per_worker']}", "log_every_s=3600"]
        if self.on_gpu:
            encoder = build_paper_size_encoder(self.work / "encoders" / "roberta-base-shape-random")
            overrides += [f"captions={self.long_captions()}", f"umaf.encoder={encoder}", "umaf.max_length=256",
                          "umaf.fusion_heads=12", "batch_size=32", "lr=1e-4", "encoder_lr=2e-5", "use_gpu=true"]
        else:
            build_tiny_random_bert(cache)
            overrides += [f"captions={demo['reference_captions']}"]
        cfg = load_config(TrainConfig, "train", preset="tiny", overrides=overrides)

        table = read_manifest(demo["manifest"]).table
        table = table.append_column("label", table["label_sentiment"])
        table = join_captions(table, read_ok_captions(cfg.captions), "text_only").table
        table = table.filter(pc.equal(table["split"], "train")).slice(0, self.size["train_rows"])

        plain_windows: list[tuple[float, float]] = []
        profile: dict[str, Any] = {"steps": 12}
        plain = plain_loop(cfg, table, epochs, int(cfg.cpus_per_worker), self.device, plain_windows, profile)
        (self.out / "profile_train_plain.txt").write_text(profile["table"])

        run_uri = str(self.work / "train-ray")
        run_training(cfg.model_copy(update={"out": run_uri}))
        history = storage.read_json(storage.join(run_uri, "history.json"))
        metrics = storage.read_json(storage.join(run_uri, "metrics.json"))
        steady = slice(1, None) if epochs > 1 else slice(None)
        plain_rate = statistics.median(plain[steady])
        ray_rate = statistics.median([h["train_samples_per_s"] for h in history][steady])
        ray_windows = [(h["train_started_at"], h["train_ended_at"]) for h in history][steady]
        result = {
            "setup": ("RoBERTa-base shape (random), bf16 autocast, " if self.on_gpu else "tiny random BERT, fp32, ")
            + f"global batch {cfg.batch_size}, max_length {cfg.umaf.max_length}, {table.num_rows} train rows, "
              f"{epochs} epochs (median of epochs 2..), no shuffling on either side, "
              f"{int(cfg.cpus_per_worker)} CPU threads each",
            "plain_samples_per_s": round(plain_rate, 1),
            "ray_train_samples_per_s": round(ray_rate, 1),
            "ray_over_plain": round(ray_rate / plain_rate, 3),
            "plain_epochs_samples_per_s": [round(r, 1) for r in plain],
            "ray_epochs_samples_per_s": [round(h["train_samples_per_s"], 1) for h in history],
            # seconds each Ray epoch's step waited for its next batch (the first includes the epoch's
            # data start-up): Ray Data's share of any gap to the plain loop
            "ray_epochs_data_wait_s": [round(h.get("train_data_wait_s", float("nan")), 3) for h in history],
            "ray_epochs_train_s": [round(h["train_ended_at"] - h["train_started_at"], 2) for h in history],
            "plain_gpu_busy_percent": self.busy(plain_windows[steady]),
            "ray_gpu_busy_percent": self.busy(ray_windows),
            "ray_run_device": metrics.get("device"),
            "ray_run_cuda_peak_memory_mib": metrics.get("cuda_peak_memory_mib"),
            "profile": "profile_train_plain.txt",
        }
        if self.on_gpu:
            result["goal"] = f"ray_over_plain >= {GOALS['train_ray_over_plain']}"
            result["goal_met"] = result["ray_over_plain"] >= GOALS["train_ray_over_plain"]
        return result

    def cache(self) -> dict[str, Any]:
        """Two layouts of the same cold build: 1 encoder actor on the whole GPU, and 4 actors at 1/4
        GPU each (one actor's host work between batches overlaps another's kernels). The goal is
        judged on the better one; the presets then use it."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from feature_cache_bench import _paper_size_encoders

        from umaf.data.manifest import read_manifest

        table = read_manifest(self.demo()["manifest"]).table
        table = table.append_column("label", table["label_sentiment"])
        limits = {"train": self.size["cache_rows"], "dev": self.size["cache_eval_rows"], "test": self.size["cache_eval_rows"]}
        table = pa.concat_tables([table.filter(pc.equal(table["split"], s)).slice(0, n) for s, n in limits.items()])
        if self.on_gpu:
            image_encoder, text_encoder = _paper_size_encoders(str(self.work / "encoders"))
            image_size, max_length = 224, 200
        else:
            image_encoder, text_encoder, image_size, max_length = "tiny-random-resnet", "tiny-random-bert", 64, 32
        encoders = {"image_encoder": image_encoder, "text_encoder": text_encoder, "image_size": image_size,
                    "max_length": max_length}
        layouts = self.size["cache_layouts"]
        result: dict[str, Any] = {
            "setup": f"{image_encoder.rsplit('/', 1)[-1]} + {text_encoder.rsplit('/', 1)[-1]} (random weights), "
                     f"{image_size} px, max_length {max_length}, encode batch 64, {table.num_rows} rows "
                     f"(train/dev/test), cold build; layouts (actors x GPU share): "
                     + ", ".join(f"{a} x {g}" for a, g in layouts)}
        result["decode_ms_per_64_rows"] = decode_timings(table, image_encoder, image_size)
        for actors, share in layouts:
            result[f"{actors}x{share}"] = self._cache_build(table, encoders, actors, share)
        if self.on_gpu:
            from umaf.train.feature_cache import FeatureEncoderActor

            result["profile"] = "profile_cache_actor.txt"
            (self.out / "profile_cache_actor.txt").write_text(
                profile_encoder_actor(FeatureEncoderActor(image_encoder, text_encoder, max_length, True), table,
                                      image_encoder, image_size))
            met = {name: entry["goal_met"] for name, entry in result.items() if isinstance(entry, dict)}
            result["goal"] = (f"steady_s_per_1000_rows <= {GOALS['cache_s_per_1000_rows']} and "
                              f"gpu_busy_percent_steady >= {GOALS['cache_busy_percent']} (best layout)")
            result["goal_met"] = any(met.values())
        return result

    def _cache_build(self, table, encoders: dict[str, Any], actors: int, share: float) -> dict[str, Any]:
        import pyarrow.parquet as pq

        from feature_cache_bench import cold_build

        out = self.work / f"cache-runs-{actors}x{share}" / "r"
        started = time.time()
        seconds, rows, how = cold_build(table, str(out), **encoders, batch_size=64, device=self.device,
                                        actors=actors, gpus_per_actor=share)
        ended = started + seconds
        # Steady state: the cache files' own write times, first to last (each is one encoded batch).
        parts = sorted((p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows)
                       for p in (out.parent / "feature_cache").rglob("part-*.parquet"))
        first, last = parts[0][0], parts[-1][0]
        steady_rows = sum(n for _, n in parts[1:])
        s_per_1000 = 1000 * (last - first) / steady_rows if steady_rows and last > first else None
        entry = {
            "rows": rows, "how": how, "build_s": round(seconds, 2),
            "build_s_per_1000_rows": round(1000 * seconds / rows, 2),
            "steady_s_per_1000_rows": round(s_per_1000, 3) if s_per_1000 else None,
            "steady_window_s": round(last - first, 2), "files": len(parts),
            "first_file_after_s": round(first - started, 2),
            "gpu_busy_percent_steady": self.busy([(first, last)]),
            "gpu_busy_percent_whole_build": self.busy([(started, ended)]),
        }
        if self.on_gpu:
            busy, rate = entry["gpu_busy_percent_steady"], entry["steady_s_per_1000_rows"]
            entry["goal_met"] = bool(rate is not None and rate <= GOALS["cache_s_per_1000_rows"]
                                     and busy is not None and busy >= GOALS["cache_busy_percent"])
        return entry

    def caption(self) -> dict[str, Any]:
        from caption_bench import pipeline_steady_rate, plain_loop

        from umaf.caption.config import CaptionConfig
        from umaf.caption.pipeline import run_caption
        from umaf.caption.tiny_vlm import build_tiny_vlm
        from umaf.config import load_config
        from umaf.data.demo import write_demo

        shape, batch = self.size["vlm_shape"], self.size["caption_batch"]
        started = time.perf_counter()
        model = build_tiny_vlm(self.work / "models" / f"vlm-{shape}", shape=shape)
        build_s = time.perf_counter() - started
        demo = write_demo(str(self.work / "caption-demo"), n_train=self.size["caption_pairs"], n_dev=0, n_test=0)
        common = [f"manifest={demo['manifest']}", f"model={model}", f"hf.device={self.device}",
                  f"actors.batch_size={batch}", "actors.min_actors=1", "actors.max_actors=1",
                  f"actors.num_gpus={1 if self.on_gpu else 0}"]
        loop_cfg = load_config(CaptionConfig, "caption", preset="tiny",
                               overrides=[*common, f"out={self.work / 'captions-loop'}"])
        loop = plain_loop(loop_cfg, demo["manifest"])
        pipe_cfg = load_config(CaptionConfig, "caption", preset="tiny",
                               overrides=[*common, f"out={self.work / 'captions-pipeline'}"])
        started = time.perf_counter()
        summary = run_caption(pipe_cfg)
        seconds = time.perf_counter() - started
        steady = pipeline_steady_rate(str(self.work / "captions-pipeline"), batch)
        n = summary["captioned"]
        from umaf.caption.tiny_vlm import VLM_SHAPES

        size = VLM_SHAPES[shape]
        result = {
            "setup": f"random-weight LLaVA '{shape}' (CLIP {size['vision_layers']}x{size['vision_hidden']}, "
                     f"{size['image_size']} px / patch {size['patch_size']}; Llama {size['layers']}x{size['hidden']}), "
                     f"{'bf16' if self.on_gpu else 'fp32'}, hf backend, xgrammar JSON, max_tokens "
                     f"{loop_cfg.sampling.max_tokens}, batch {batch}, {n} pairs, 1 actor",
            "model_build_s": round(build_s, 1),
            "model_load_s": loop["model_load_s"],
            "loop_steady_images_per_s": loop["steady_images_per_s"],
            "loop_end_to_end_images_per_s": loop["end_to_end_images_per_s"],
            "pipeline_steady_images_per_s": round(steady, 2) if steady else None,
            "pipeline_end_to_end_images_per_s": round(n / seconds, 2),
            "pipeline_over_loop_steady": round(steady / loop["steady_images_per_s"], 3)
            if steady and loop["steady_images_per_s"] else None,
            "pipeline_over_loop_end_to_end": round((n / seconds) / loop["end_to_end_images_per_s"], 3),
            "ok_rows": summary["this_run"]["ok"], "invalid_rows": summary["this_run"].get("invalid"),
            "error_rows": summary["this_run"]["error"],
        }
        result["goal_met"] = bool(result["error_rows"] == 0)
        result["goal"] = "no error rows (figures recorded, no speed goal)"
        return result

    def tune(self) -> dict[str, Any]:
        from umaf import storage
        from umaf.config import load_config
        from umaf.tune.config import TuneConfig
        from umaf.tune.sweep import run_sweep

        demo = self.demo()
        if self.on_gpu:
            encoder = build_minilm_shape_encoder(self.work / "encoders" / "minilm-shape-random")
        else:
            from umaf.models.encoders import build_tiny_random_bert

            build_tiny_random_bert(str(self.work / "encoders"))
            encoder = "tiny-random-bert"
        trials = self.size["tune_trials"]
        base = [f"manifest={demo['manifest']}", f"captions={demo['reference_captions']}", f"out={self.work / 'tune'}",
                f"train.epochs={self.size['tune_epochs']}", f"train.max_rows_per_split={self.size['tune_rows']}",
                f"train.umaf.encoder={encoder}", f"train.umaf.encoder_cache={self.work / 'encoders'}",
                "train.num_workers=1", f"train.cpus_per_worker={max(1, self.size['cpus_per_worker'] // 2)}",
                "scheduler.kind=fifo", "train.log_every_s=3600", "search.space.K={grid: [10]}"]

        def sweep(name: str, points: int, gpus: float | None) -> tuple[float, list[dict[str, Any]]]:
            lambdas = [round(0.1 * (i + 1), 2) for i in range(points)]
            overrides = [*base, f"name={name}", f"max_concurrent_trials={points}",
                         f"search.space.lambda={{grid: {json.dumps(lambdas)}}}"]
            if gpus:
                overrides.append(f"resources.gpus_per_worker={gpus}")
            cfg = load_config(TuneConfig, "tune", preset="tiny", overrides=overrides)
            started = time.perf_counter()
            result = run_sweep(cfg)
            seconds = time.perf_counter() - started
            histories = []
            for row in result["rows"]:
                if row["status"] != "completed":
                    raise RuntimeError(f"sweep {name}: trial {row['trial_id']} {row['status']}: {row.get('error')}")
                histories.append(storage.read_json(storage.join(row["run_uri"], "history.json")))
            return seconds, histories

        alone_s, alone = sweep("one-trial", 1, 1.0 if self.on_gpu else None)
        shared_s, shared = sweep("shared-gpu", trials, 1 / trials if self.on_gpu else None)

        def samples(histories: list[list[dict[str, Any]]]) -> float:
            # samples/s x seconds of each epoch's training = the samples it trained
            return sum(h["train_samples_per_s"] * (h["train_ended_at"] - h["train_started_at"])
                       for history in histories for h in history)

        def training_span(histories):
            starts = [history[0]["train_started_at"] for history in histories]
            ends = [history[-1]["train_ended_at"] for history in histories]
            return starts, ends

        starts, ends = training_span(shared)
        overlap_s = min(ends) - max(starts)  # > 0: one instant at which every trial was training
        a_starts, a_ends = training_span(alone)
        alone_rate = samples(alone) / (max(a_ends) - min(a_starts))
        shared_rate = samples(shared) / (max(ends) - min(starts))
        result = {
            "setup": f"UMAF, {'MiniLM-L6 shape (random)' if self.on_gpu else 'tiny random BERT'}, "
                     f"{self.size['tune_rows']} train rows, {self.size['tune_epochs']} epochs per trial, "
                     f"fifo, {trials} trials at {('1/' + str(trials) + ' GPU') if self.on_gpu else '1 CPU'} each vs 1 trial",
            "one_trial_sweep_s": round(alone_s, 1),
            f"{trials}_trials_sweep_s": round(shared_s, 1),
            "trials_per_min_one": round(60 / alone_s, 2),
            "trials_per_min_shared": round(60 * trials / shared_s, 2),
            "sweep_throughput_ratio": round((trials / shared_s) / (1 / alone_s), 2),
            "training_samples_per_s_one": round(alone_rate, 1),
            "training_samples_per_s_shared_total": round(shared_rate, 1),
            "training_throughput_ratio": round(shared_rate / alone_rate, 2),
            "trial_training_windows": [[round(a, 2), round(b, 2)] for a, b in zip(starts, ends)],
            "all_trials_training_at_once_s": round(overlap_s, 2),
            "trial_devices": sorted({str(h[-1].get("cuda_peak_memory_mib") is not None) for h in shared}),
            "gpu_busy_percent_one": self.busy([(min(a_starts), max(a_ends))]),
            "gpu_busy_percent_shared": self.busy([(min(starts), max(ends))]),
        }
        if self.on_gpu:
            result["goal"] = f"all {trials} trials training at one instant (overlap > 0 s), each on CUDA"
            result["goal_met"] = overlap_s > 0 and result["trial_devices"] == ["True"]
        return result


def build_minilm_shape_encoder(folder: Path) -> str:
    """A random-weight encoder of MiniLM-L6's shape (6 layers, 384 wide, 12 heads) with its tokenizer:
    the size of model that fractional-GPU sweeps are for."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from umaf.models.encoders import minilm_path

    if (folder / "config.json").is_file():
        return str(folder)
    import torch

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def decode_timings(table, image_encoder: str, image_size: int, rounds: int = 3) -> dict[str, float]:
    """Median ms of the cache build's CPU decode task on 64 rows, in one process: float32 pixels
    normalised on the CPU (as before) and uint8 pixels (what the build ships to the encoder actors)."""
    import numpy as np

    from umaf.train.feature_cache import decode_images_batch

    rows = table.slice(0, 64).to_pydict()
    batch = {k: np.asarray(v, dtype=object if k in ("id", "text", "image", "split") else None) for k, v in rows.items()}
    out = {}
    for as_uint8 in (False, True):
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            decode_images_batch(batch, image_encoder, image_size, {}, as_uint8=as_uint8)
            times.append(1000 * (time.perf_counter() - started))
        out["uint8" if as_uint8 else "float32"] = round(statistics.median(times), 1)
    return out


def profile_encoder_actor(actor, table, image_encoder: str, image_size: int, batches: int = 4) -> str:
    """``torch.profiler`` summary of the cache's encoder actor on a few decoded batches of 64 rows
    (decode outside the profile, as the build runs it in separate CPU tasks)."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from umaf.train.feature_cache import decode_images_batch

    rows = table.slice(0, 64).to_pydict()
    batch = {k: np.asarray(v, dtype=object if k in ("id", "text", "image", "split") else None) for k, v in rows.items()}
    decoded = decode_images_batch(batch, image_encoder, image_size, {}, as_uint8=True)  # as the build ships them
    actor(decoded)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(batches):
            actor(decoded)
        torch.cuda.synchronize()
    per_batch = (time.perf_counter() - started) / batches
    header = f"FeatureEncoderActor.__call__ on 64 decoded rows: {1000 * per_batch:.1f} ms per batch under the profiler\n\n"
    return header + prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=50)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU suite, {report['date']}", "",
             f"{report.get('gpu', 'no GPU')} · driver {report.get('driver', '-')} · CUDA {report.get('cuda', '-')} · "
             f"{report['machine']} · {report['versions']}", "",
             "| section | figure | value | goal | met |", "| --- | --- | --- | --- | --- |"]
    for name, section in report["sections"].items():
        if "failed" in section:
            lines.append(f"| {name} | FAILED | {section['failed'][:300]} | | no |")
            continue
        goal, met = section.get("goal", "not judged (CPU rehearsal)"), section.get("goal_met")
        lines.append(f"| {name} | setup | {section.get('setup', '')} | {goal} | {'-' if met is None else 'yes' if met else 'NO'} |")
        for key, value in section.items():
            if key not in ("setup", "goal", "goal_met", "seconds"):
                lines.append(f"| {name} | {key} | {value} | | |")
        lines.append(f"| {name} | section wall time (s) | {section.get('seconds')} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_suite.json, gpu_suite.md and profiles")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sections", nargs="+", default=["train", "cache", "caption", "tune"],
                        choices=["train", "cache", "caption", "tune"])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args(argv)

    import ray
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_suite: --device cuda but torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="umaf-gpu-suite-")).resolve()
    suite = Suite(args.device, out, work)
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), num_gpus=gpus, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                                       "HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    failed = False
    with suite.sampler:
        for name in args.sections:
            started = time.perf_counter()
            print(f"== gpu_suite: {name} ...", flush=True)
            try:
                section = getattr(suite, name)()
            except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others' figures
                traceback.print_exc()
                section = {"failed": f"{type(exc).__name__}: {exc}"}
            section["seconds"] = round(time.perf_counter() - started, 1)
            suite.report["sections"][name] = section
            failed |= "failed" in section or section.get("goal_met") is False
            print(f"== gpu_suite: {name}: {json.dumps(section)}", flush=True)
            (out / "gpu_suite.json").write_text(json.dumps(suite.report, indent=2))
            (out / "gpu_suite.md").write_text(markdown(suite.report))
    ray.shutdown()
    print(markdown(suite.report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
