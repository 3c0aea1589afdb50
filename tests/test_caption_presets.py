"""Caption presets and cluster configs fit a real cluster; the image rule and the writer, without Ray."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from PIL import Image

from umaf.caption.backends import caption_row, vllm_engine_kwargs, vllm_processor_config
from umaf.caption.config import CaptionConfig
from umaf.caption.images import load_image, target_geometry
from umaf.caption.store import CAPTION_SCHEMA, read_captions
from umaf.caption.writer import CaptionWriteError, CaptionWriter
from umaf.config import load_config

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted(p.stem for p in (REPO / "configs" / "caption").glob("*.yaml"))


def preset(name: str) -> CaptionConfig:
    return load_config(CaptionConfig, "caption", preset=name)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_bounds_what_a_kill_loses(name):
    output = preset(name).output
    assert output.rows_per_file <= 1000 and output.flush_seconds <= 30


def test_paper_qwen_is_fit_for_a_cluster():
    config = preset("paper-qwen")
    # A fixed pool: ray's processor gets (n, n), not an int it would turn into (1, n).
    assert config.actors.min_actors == config.actors.max_actors
    processor = vllm_processor_config(config)
    assert processor.concurrency == (config.actors.min_actors, config.actors.max_actors)
    engine = vllm_engine_kwargs(config)
    assert engine["limit_mm_per_prompt"] == {"image": 1, "video": 0}
    assert engine["enable_prefix_caching"] is True
    assert engine["dtype"] == "bfloat16" and config.precision == "bf16"  # the precision setting reaches vLLM
    assert vllm_engine_kwargs(config.model_copy(update={"precision": "fp32"}))["dtype"] == "float32"
    # One resize: the CPU stage's budget and grid are the model's, so vLLM's processor keeps the size.
    assert config.images.max_area == config.vllm.max_pixels and config.images.multiple_of == 28
    # Replicas only on caption nodes: the resource they ask for is the one the caption node types offer.
    assert config.vllm.replica_resources == {"caption_node": 1}
    bundle = processor.placement_group_config["bundle_per_worker"]
    assert bundle["caption_node"] == 1 and bundle["GPU"] == 1
    aws = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    assert aws["available_node_types"]["gpu_caption"]["resources"]["caption_node"] >= 1
    assert "caption_node" not in aws["available_node_types"]["gpu_train"]["resources"]
    kuberay = yaml.safe_load((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    groups = {g["groupName"]: g for g in kuberay["spec"]["workerGroupSpecs"]}
    assert "caption_node" in groups["gpu-caption"]["rayStartParams"]["resources"]
    assert "caption_node" not in groups["gpu-train"]["rayStartParams"]["resources"]


def qwen_smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                      max_pixels: int = 1003520) -> tuple[int, int]:
    """Qwen2-VL's processor geometry (transformers ``smart_resize``), the rule the CPU stage must satisfy."""
    import math

    if max(height, width) / min(height, width) > 200:
        raise ValueError("absolute aspect ratio must be smaller than 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


@pytest.mark.parametrize("size", [(1344, 5), (5, 1344), (3, 2), (1, 1), (20000, 30), (500, 499), (4000, 3000),
                                  (1920, 1080), (10000, 10000)])
def test_images_land_on_qwens_grid_so_vllm_neither_rejects_nor_resizes(size):
    images = preset("paper-qwen").images
    content, canvas = target_geometry(*size, max_side=images.max_side, max_area=images.max_area,
                                      multiple_of=images.multiple_of, min_side=images.min_side,
                                      max_aspect_ratio=images.max_aspect_ratio)
    width, height = canvas
    assert qwen_smart_resize(height, width) == (height, width), "vLLM's processor would resize (or reject) it"
    assert content[0] <= width and content[1] <= height
    assert content[0] <= size[0] and content[1] <= size[1], "never upscaled"


def test_load_image_pads_a_banner_instead_of_failing(tmp_path):
    path = tmp_path / "banner.png"
    Image.new("RGB", (1344, 5), (255, 0, 0)).save(path)
    loaded = load_image(str(path), max_side=4096, max_bytes=1 << 20, max_pixels=1 << 26, max_area=1003520,
                        multiple_of=28, min_side=56, max_aspect_ratio=100)
    assert loaded.error is None
    img = Image.open(io.BytesIO(loaded.jpeg))
    assert img.size == (1344, 56)
    assert img.getpixel((10, 2))[0] > 200 and max(img.getpixel((10, 50))) < 30  # content top, black padding below


def _rows(n: int, start: int = 0) -> pa.Table:
    rows = [caption_row(f"id-{i}", model="m", sampling_json="{}", image_sha256=None, error="x")
            for i in range(start, start + n)]
    return pa.Table.from_pylist(rows, schema=CAPTION_SCHEMA)


def test_writer_writes_every_n_rows_and_on_a_timer(tmp_path):
    out = str(tmp_path / "captions")
    with CaptionWriter(out, rows_per_file=4, flush_seconds=0.5, attempts=1, storage_kw={}) as writer:
        writer.add(_rows(10))
        assert len(read_captions(out)) == 8, "two full files at once, the rest buffered"
        # The timer writes the last 2 (oldest row waited 0.5 s; the timer looks every second).
        assert writer.wait_until(lambda w: w.rows_written == 10, timeout=30), "the timer never flushed"
        assert len(read_captions(out)) == 10 and len(writer.files) == 3
        writer.add(_rows(1, start=10))
    assert sorted(read_captions(out)["id"].to_pylist()) == sorted(f"id-{i}" for i in range(11))
    assert len(writer.files) == 4


def test_writer_gives_up_after_bounded_attempts_with_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    writer = CaptionWriter(str(blocker / "captions"), rows_per_file=2, flush_seconds=60, attempts=3,
                           storage_kw={}, backoff_s=0.01)
    with pytest.raises(CaptionWriteError, match=r"cannot write 2 captions to .* after 3 attempts"):
        with writer:
            writer.add(_rows(2))


def test_writer_reports_a_timer_write_still_failing_when_the_stream_ends(tmp_path):
    """The stream ends while the timer's write is between attempts: the job must fail, not lose the rows."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    writer = CaptionWriter(str(blocker / "captions"), rows_per_file=100, flush_seconds=0, attempts=2,
                           storage_kw={}, backoff_s=6.0)
    with pytest.raises(CaptionWriteError, match=r"cannot write 1 captions to .* after 2 attempts"):
        with writer:
            writer.add(_rows(1))
            # The timer (1 s tick) has taken the row, failed once and is waiting 6 s to retry.
            assert writer.wait_until(lambda w: w.failed_attempts >= 1, timeout=30)
            assert writer._buffered == 0, "the timer's write is in flight"
