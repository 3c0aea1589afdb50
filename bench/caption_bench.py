"""Caption throughput: the Ray Data pipeline vs a plain single-process loop, same backend, same images.

    python bench/caption_bench.py [--n 64] [--actors 1] [--batch-size 8] [--num-cpus 2] [--device cpu]

Both sides caption the same demo pairs with the same `hf` backend and config (tiny random-weight
LLaVA by default, grammar-bounded JSON). The loop loads each image with the same CPU-stage function,
generates in batches of `--batch-size` and parses: the work the pipeline does, minus Ray. Images/s
of the pipeline are end to end (cluster already up; actor start and model load included, as a user
pays them); the loop's model load is timed separately and left out. Prints one JSON line with the
ratio pipeline/loop, and a Markdown table row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import environment, timed_on_local_ray  # noqa: E402

from umaf.caption.backends import HFBackend, caption_row  # noqa: E402
from umaf.caption.config import CaptionConfig  # noqa: E402
from umaf.caption.images import load_image, open_jpeg  # noqa: E402
from umaf.config import load_config  # noqa: E402
from umaf.data.demo import write_demo  # noqa: E402
from umaf.data.manifest import read_manifest  # noqa: E402


def plain_loop(config: CaptionConfig, manifest_uri: str) -> dict:
    table = read_manifest(manifest_uri).table
    start = time.perf_counter()
    backend = HFBackend(config)
    load_s = time.perf_counter() - start
    rows, statuses = table.to_pylist(), []
    start = time.perf_counter()
    bs = config.actors.batch_size
    first_batch_done = None
    for i in range(0, len(rows), bs):
        chunk = rows[i:i + bs]
        loaded = [load_image(r["image"], max_side=config.images.max_side, max_bytes=config.images.max_bytes,
                             max_pixels=config.images.max_pixels, jpeg_quality=config.images.jpeg_quality)
                  for r in chunk]
        gens = backend.generate([r["text"] for r in chunk], [open_jpeg(x.jpeg) for x in loaded])
        for r, x, g in zip(chunk, loaded, gens):
            statuses.append(caption_row(r["id"], model=backend.model_name, sampling_json="{}",
                                        image_sha256=x.sha256, generation=g)["status"])
        if first_batch_done is None:
            first_batch_done = time.perf_counter()
    seconds = time.perf_counter() - start
    after_first = time.perf_counter() - first_batch_done
    steady = (len(rows) - min(bs, len(rows))) / after_first if len(rows) > bs and after_first > 0 else None
    return {"images": len(rows), "seconds": round(seconds, 2), "model_load_s": round(load_s, 2),
            "images_per_s": round(len(rows) / seconds, 2), "ok": statuses.count("ok"),
            # steady: after the first (warm-up) batch; end to end: model load included, as a user pays it
            "steady_images_per_s": round(steady, 2) if steady else None,
            "end_to_end_images_per_s": round(len(rows) / (seconds + load_s), 2)}


def pipeline_steady_rate(captions_uri: str, batch_size: int) -> float | None:
    """Images/s of a finished caption run after its first batch, from the rows' own ``captioned_at``
    (the first batch pays actor start and model load; the rest is the steady state)."""
    from umaf.caption.store import read_captions

    times = sorted(t.timestamp() for t in read_captions(captions_uri)["captioned_at"].to_pylist() if t is not None)
    if len(times) <= batch_size:
        return None
    first, last = times[batch_size - 1], times[-1]
    return (len(times) - batch_size) / (last - first) if last > first else None


def ray_pipeline(config: CaptionConfig, num_cpus: int) -> dict:
    from umaf.caption.pipeline import run_caption

    summary, seconds = timed_on_local_ray(lambda: run_caption(config), num_cpus)
    return {"images": summary["captioned"], "seconds": round(seconds, 2),
            "images_per_s": round(summary["captioned"] / seconds, 2), "ok": summary["this_run"]["ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=64, help="pairs to caption")
    parser.add_argument("--actors", type=int, default=1, help="VLM actors in the pipeline")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--device", default="cpu", help="hf.device: cpu or cuda")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("overrides", nargs="*", help="caption config key=value overrides")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = tempfile.mkdtemp(prefix="caption-bench-")
    demo = write_demo(os.path.join(work, "demo"), n_train=args.n, n_dev=0, n_test=0)
    config = load_config(CaptionConfig, "caption", preset="tiny", overrides=[
        f"manifest={demo['manifest']}", f"out={os.path.join(work, 'captions')}",
        f"model_cache_dir={os.path.join(work, 'models')}", f"model={args.model}", f"hf.device={args.device}",
        f"actors.batch_size={args.batch_size}", f"actors.min_actors={args.actors}",
        f"actors.max_actors={args.actors}", f"actors.num_gpus={1 if args.device == 'cuda' else 0}",
        *args.overrides,
    ])
    loop = plain_loop(config, demo["manifest"])  # also builds the tiny model once, for both sides
    pipeline = ray_pipeline(config, args.num_cpus)
    result = {
        **environment(),
        "model": args.model, "device": args.device, "n": args.n, "batch_size": args.batch_size,
        "actors": args.actors, "num_cpus": args.num_cpus,
        "loop": loop, "pipeline": pipeline,
        "ratio_pipeline_over_loop": round(pipeline["images_per_s"] / loop["images_per_s"], 3),
    }
    print(json.dumps(result))
    print(f"| {result['date']} | {result['machine']} | {args.model} {args.device} | {args.n} | {args.batch_size} | "
          f"{args.actors} | {loop['images_per_s']} | {pipeline['images_per_s']} | "
          f"{result['ratio_pipeline_over_loop']} | {result['versions']} |")


if __name__ == "__main__":
    main()
