"""CPU feed rate of the caption job's image stage: images/s per CPU core, vs a plain PIL loop.

    python bench/caption_feed_bench.py [--preset paper-qwen] [--rounds 5] [--images ../shared/data/msed]

The image stage (``umaf.caption.images.load_image``: read, hash, header check, reduced-scale JPEG
decode, one resize onto the model's grid, padding, JPEG encode) runs on every real MSED image
(train/dev/test folders) at the preset's sizes, single-threaded, so images/s = images/s per core.
Beside it, the plain loop a user would write without the job: ``Image.open`` → ``convert("RGB")``
→ ``thumbnail`` to the same pixel budget → JPEG encode, same quality. Rounds alternate A, B, A, B...
so machine load hits both alike; the median of each is reported with the ratio. The goal for the
vLLM preset: ≥ 15 images/s per core (4 cores feed one H100 at ~50 images/s for Qwen2.5-VL-7B).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from umaf.caption.config import CaptionConfig  # noqa: E402
from umaf.caption.images import load_image  # noqa: E402
from umaf.config import load_config  # noqa: E402


def stage(paths: list[str], images: dict) -> int:
    ok = 0
    for path in paths:
        loaded = load_image(path, max_side=images["max_side"], max_bytes=images["max_bytes"],
                            max_pixels=images["max_pixels"], jpeg_quality=images["jpeg_quality"],
                            max_area=images["max_area"], multiple_of=images["multiple_of"],
                            min_side=images["min_side"], max_aspect_ratio=images["max_aspect_ratio"])
        ok += loaded.error is None
    return ok


def plain(paths: list[str], images: dict) -> int:
    from PIL import Image

    ok = 0
    for path in paths:
        with open(path, "rb") as fh:
            img = Image.open(io.BytesIO(fh.read())).convert("RGB")
        side = images["max_side"]
        if images["max_area"]:
            side = min(side, int(max(img.size) * math.sqrt(images["max_area"] / (img.size[0] * img.size[1]))))
        img.thumbnail((side, side), Image.Resampling.BICUBIC)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=images["jpeg_quality"])
        ok += 1
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper-qwen")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", default=str(Path(__file__).resolve().parent.parent.parent / "shared/data/msed"))
    args = parser.parse_args()
    config = load_config(CaptionConfig, "caption", preset=args.preset)
    images = config.images.model_dump()
    paths = sorted(str(p) for p in Path(args.images).glob("*/images/*.jpg"))
    if not paths:
        sys.exit(f"no images under {args.images}/*/images")
    stage(paths[:4], images), plain(paths[:4], images)  # warm imports and caches
    rates: dict[str, list[float]] = {"stage": [], "plain": []}
    for _ in range(args.rounds):
        for name, fn in (("stage", stage), ("plain", plain)):
            start = time.perf_counter()
            n = fn(paths, images)
            rates[name].append(n / (time.perf_counter() - start))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "preset": args.preset,
        "images": len(paths), "rounds": args.rounds,
        "sizes": {k: images[k] for k in ("max_side", "max_area", "multiple_of", "min_side", "jpeg_quality")},
        "stage_images_per_s_per_core": round(statistics.median(rates["stage"]), 1),
        "plain_images_per_s_per_core": round(statistics.median(rates["plain"]), 1),
        "stage_rounds": [round(r, 1) for r in rates["stage"]], "plain_rounds": [round(r, 1) for r in rates["plain"]],
        "ratio_stage_over_plain": round(statistics.median(rates["stage"]) / statistics.median(rates["plain"]), 2),
        "goal_images_per_s_per_core": 15,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or platform.platform()}",
        "load_average": os.getloadavg(), "python": platform.python_version(),
        "pillow": __import__("PIL").__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
