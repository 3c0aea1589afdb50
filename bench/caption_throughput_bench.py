"""Per-device prefill and decode rates of a caption model: the figures ``jobs/caption.py --plan`` prices with.

    python bench/caption_throughput_bench.py [--n 32] [--rounds 3] [--device cpu] [--model tiny] [--record]
    python bench/caption_throughput_bench.py --device cuda --device-name H100 --model /models/qwen25-vl-7b --record

The ``hf`` backend captions the same demo pairs (loaded by the CPU stage's ``load_image``) twice per
round, in batches of ``--batch-size``:

- **prefill pass**: ``sampling.max_tokens=1``: the time is the prompts' prefill (plus one token);
  prefill rate = prompt tokens / time, with prompt tokens counted by the plan's own counter
  (:class:`umaf.caption.plan.TokenCounter`: the model's tokenizer, chat template and image rule);
- **full pass**: the config's sampling; decode rate = output tokens / (time − prompt tokens / prefill rate).

Rounds alternate the two passes; medians are reported. ``--record`` appends the figure to
``bench/caption_throughput.json``, where the plan finds it for this model (the ``model`` column's
name) and ``--device-name`` (default ``cpu``, or the CUDA device's name) and uses it instead of the
default estimate. This measures the ``hf`` backend; a vLLM replica batches continuously and is
faster per GPU (record it with ``plan.prefill_tokens_per_s``/``decode_tokens_per_s`` measured on
the cluster until this bench drives vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment  # noqa: E402

from umaf.caption.backends import HFBackend, model_label, resolve_model_path  # noqa: E402
from umaf.caption.config import CaptionConfig  # noqa: E402
from umaf.caption.images import load_image, open_jpeg  # noqa: E402
from umaf.caption.plan import BENCH_FIGURES, TokenCounter  # noqa: E402
from umaf.config import load_config  # noqa: E402
from umaf.data.demo import write_demo  # noqa: E402
from umaf.data.manifest import read_manifest  # noqa: E402


def timed_pass(backend: HFBackend, texts: list[str], images: list, batch_size: int) -> tuple[float, int]:
    start, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), batch_size):
        tokens += sum(g.output_tokens for g in backend.generate(texts[i:i + batch_size], images[i:i + batch_size]))
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="pairs per pass")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="hf.device: cpu or cuda")
    parser.add_argument("--device-name", default=None, help="the plan.device this figure is for (default: cpu, "
                        "or the CUDA device's name)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--record", action="store_true", help=f"append the figure to {BENCH_FIGURES}")
    parser.add_argument("overrides", nargs="*", help="caption config key=value overrides")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="caption-throughput-")
    demo = write_demo(os.path.join(work, "demo"), n_train=args.n, n_dev=0, n_test=0)
    config = load_config(CaptionConfig, "caption", preset=args.preset, overrides=[
        f"model_cache_dir={os.path.join(work, 'models')}", f"model={args.model}", f"hf.device={args.device}",
        "backend=hf", *args.overrides])
    rows = read_manifest(demo["manifest"]).table.to_pylist()
    i = config.images
    loaded = [load_image(r["image"], max_side=i.max_side, max_bytes=i.max_bytes, max_pixels=i.max_pixels,
                         jpeg_quality=i.jpeg_quality, max_area=i.max_area, multiple_of=i.multiple_of,
                         min_side=i.min_side, max_aspect_ratio=i.max_aspect_ratio) for r in rows]
    texts, images = [r["text"] for r in rows], [open_jpeg(x.jpeg) for x in loaded]
    counter = TokenCounter(resolve_model_path(config), None, {})
    sizes = [(img.height, img.width) for img in images]
    prompt_tokens = sum(counter.text_tokens(texts)) + sum(counter.vision_tokens(sizes))

    full = HFBackend(config)
    prefill_only = HFBackend(config.model_copy(update={"sampling": config.sampling.model_copy(update={"max_tokens": 1})}))
    timed_pass(full, texts[: args.batch_size], images[: args.batch_size], args.batch_size)  # warm-up
    prefill_rates, decode_rates = [], []
    for _ in range(args.rounds):
        prefill_s, _ = timed_pass(prefill_only, texts, images, args.batch_size)
        full_s, output_tokens = timed_pass(full, texts, images, args.batch_size)
        prefill_rate = prompt_tokens / prefill_s
        prefill_rates.append(prefill_rate)
        decode_rates.append(output_tokens / max(1e-9, full_s - prompt_tokens / prefill_rate))
    env = environment()
    figure = {
        "model": model_label(config),
        "device": args.device_name or ("cpu" if args.device == "cpu" else env["machine"].split(", ")[-1]),
        "prefill_tokens_per_s": round(statistics.median(prefill_rates), 1),
        "decode_tokens_per_s": round(statistics.median(decode_rates), 1),
        "measured_at": env["date"], "machine": env["machine"], "load_average": env["load_average"],
        "versions": env["versions"], "pairs": args.n, "batch_size": args.batch_size, "prompt_tokens": prompt_tokens,
        "rounds": {"prefill": [round(x, 1) for x in prefill_rates], "decode": [round(x, 1) for x in decode_rates]},
        "command": "python bench/caption_throughput_bench.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(figure))
    if args.record:
        path = Path(BENCH_FIGURES)
        data = json.loads(path.read_text()) if path.is_file() else {"figures": []}
        data["figures"].append(figure)
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"recorded in {path}")


if __name__ == "__main__":
    main()
