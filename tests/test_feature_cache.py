"""The SPP-SCL frozen-feature cache build (issue 13): one Ray Data job for every missing split
(CPU decode tasks → an encoder actor pool → per-split writers), read back in each split's order."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from umaf.train.feature_cache import SUCCESS_FILE, FrozenFeatureEncoder, decode_features, load_or_build_splits

ENCODERS = {"image_encoder": "tiny-random-resnet", "text_encoder": "tiny-random-bert", "image_size": 32, "max_length": 16}


@pytest.mark.ray
def test_all_splits_in_one_build_read_back_in_order_then_hit(ray_cluster, tmp_path: Path):
    import ray.data

    from umaf.data.demo import write_demo
    from umaf.data.manifest import read_manifest
    from umaf.models.encoders import resolve_encoder
    from umaf.models.image_encoder import resolve_image_encoder

    resolve_encoder(ENCODERS["text_encoder"])
    resolve_image_encoder(ENCODERS["image_encoder"])
    demo = write_demo(str(tmp_path / "demo"), n_train=40, n_dev=12, n_test=9)
    table = read_manifest(demo["manifest"]).table
    table = table.append_column("label", table["label_sentiment"])
    splits = {s: table.filter(np.asarray(table["split"].to_pylist()) == s) for s in ("train", "dev", "test")}
    kw = {"cache_dir": str(tmp_path / "cache"), "storage_kw": {}, "batch_size": 8, "concurrency": 1, **ENCODERS}

    built = load_or_build_splits({s: ray.data.from_arrow(t) for s, t in splits.items()}, **kw)
    assert {s: info["hit"] for s, (_, info) in built.items()} == {"train": False, "dev": False, "test": False}
    for split, (ds, info) in built.items():
        rows = ds.take_all()
        # The split's own order (evaluation batches of SPP-SCL's CMF depend on it), every row once.
        assert [r["id"] for r in rows] == splits[split]["id"].to_pylist(), split
        assert info["rows"] == len(rows) and (Path(info["uri"]) / SUCCESS_FILE).is_file()
        success = json.loads((Path(info["uri"]) / SUCCESS_FILE).read_text())
        assert success["encoded_on"] == ["cpu"], success  # where the features were computed
    # Bytes and shapes decode as the step expects; the same features as encoding in this process.
    batch = built["dev"][0].take_batch(4, batch_format="numpy")
    tensors = decode_features(batch)
    assert tensors["image_map"].shape[0] == 4 and tensors["text_states"].shape[0] == 4
    local = FrozenFeatureEncoder(**{k: ENCODERS[k] for k in ENCODERS}, storage_kw={})(
        {k: np.asarray(v) for k, v in splits["dev"].slice(0, 4).to_pydict().items()})
    np.testing.assert_allclose(decode_features(local)["image_map"].numpy(), tensors["image_map"].numpy(), atol=2e-3)

    again = load_or_build_splits({s: ray.data.from_arrow(t) for s, t in splits.items()}, **kw)
    assert all(info["hit"] for _, info in again.values())


@pytest.mark.parametrize("encoder,size", [("tiny-random-resnet", 32), ("tiny-random-vit", None), ("tiny-random-clip", None)])
def test_uint8_pixels_normalised_on_the_device_equal_the_processor_output(encoder: str, size: int | None):
    """The cache build moves uint8 pixels and normalises them where the encoder runs: the result is the
    image processor's own float32 output (rescale, then (x - mean) / std), for each processor family."""
    import io

    from PIL import Image

    from umaf.models.encoders import resolve_encoder
    from umaf.models.image_encoder import load_image_processor, normalize_pixels, pixel_values_from_bytes

    name = resolve_encoder(encoder) if encoder == "tiny-random-clip" else encoder
    processor = load_image_processor(name)
    rng = np.random.default_rng(0)
    images = []
    for h, w in [(40, 56), (64, 48), (33, 33)]:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    images.append(b"not an image")  # the grey placeholder goes through the same path
    reference, ok = pixel_values_from_bytes(processor, images, size)
    raw, ok_raw = pixel_values_from_bytes(processor, images, size, normalize=False)
    assert raw.dtype.is_floating_point is False and raw.dtype.itemsize == 1 and ok.tolist() == ok_raw.tolist()
    # Independently: the processor's float pipeline step by step on the raw bytes.
    mean = np.asarray(processor.image_mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(processor.image_std, dtype=np.float32).reshape(1, -1, 1, 1)
    expected = (raw.numpy().astype(np.float32) * np.float32(processor.rescale_factor) - mean) / std
    np.testing.assert_allclose(reference.numpy(), expected, atol=1e-5)
    np.testing.assert_allclose(normalize_pixels(raw, processor).numpy(), reference.numpy(), atol=1e-5)
