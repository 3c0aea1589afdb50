"""The synthetic demo dataset: deterministic, balanced, and built so that only the image decides some pairs."""

from __future__ import annotations

import collections
import hashlib
import io

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from umaf import storage
from umaf.caption.fields import caption_text
from umaf.caption.store import CAPTION_SCHEMA, read_ok_captions
from umaf.data import demo
from umaf.data.manifest import read_manifest


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("demo"))
    return out, demo.write_demo(out)


def test_demo_manifest_shape_and_balance(demo_dir):
    _, uris = demo_dir
    manifest = read_manifest(uris["manifest"])
    assert manifest.dataset == "demo"
    assert manifest.labels == {"sentiment": ["negative", "neutral", "positive"]}
    table = manifest.table
    assert collections.Counter(table["split"].to_pylist()) == {"train": 240, "dev": 60, "test": 60}
    assert len(set(table["id"].to_pylist())) == 360
    for split in ("train", "dev", "test"):
        counts = collections.Counter(manifest.split(split)["label_sentiment"].to_pylist())
        assert set(counts) == {0, 1, 2}
        # The majority-class baseline is chance level (1/3), so any real model is clearly ahead of it.
        assert max(counts.values()) / sum(counts.values()) < 0.4
    kinds = collections.Counter(demo.decided_by(i) for i in table["id"].to_pylist())
    assert set(kinds) == set(demo.DECIDED_BY)
    assert kinds["image"] / table.num_rows > 0.25


def test_demo_images_are_real_jpegs(demo_dir):
    _, uris = demo_dir
    table = read_manifest(uris["manifest"]).table
    assert all(table["image_ok"].to_pylist())
    for path in table["image"].to_pylist()[:20]:
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (64, 64)


def test_demo_is_deterministic_per_seed(tmp_path, demo_dir):
    _, uris = demo_dir
    again = demo.write_demo(str(tmp_path / "again"))
    first, second = read_manifest(uris["manifest"]).table, read_manifest(again["manifest"]).table
    assert first.drop(["image"]).equals(second.drop(["image"]))
    assert read_ok_captions(uris["reference_captions"]).equals(read_ok_captions(again["reference_captions"]))
    # Same sizes, different seeds: different data; same sizes, same seed: the same data, pixels included.
    small = {"n_train": 30, "n_dev": 6, "n_test": 6}
    seed0, seed0_again, seed1 = (read_manifest(demo.write_demo(str(tmp_path / name), seed=seed, **small)["manifest"]).table
                                 for name, seed in (("s0", 0), ("s0-again", 0), ("s1", 1)))
    assert seed0.drop(["image"]).equals(seed0_again.drop(["image"]))
    assert [_sha256(p) for p in seed0["image"].to_pylist()] == [_sha256(p) for p in seed0_again["image"].to_pylist()]
    assert seed1.num_rows == seed0.num_rows == 42
    assert seed1["split"].to_pylist() == seed0["split"].to_pylist()
    differs = [a != b for a, b in zip(seed0["text"].to_pylist(), seed1["text"].to_pylist())]
    assert sum(differs) > 0.5 * len(differs), "another seed draws other pairs"
    assert [_sha256(p) for p in seed0["image"].to_pylist()] != [_sha256(p) for p in seed1["image"].to_pylist()]


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_reference_captions_describe_each_image(demo_dir):
    _, uris = demo_dir
    manifest = read_manifest(uris["manifest"]).table
    fs, path = storage.resolve(uris["reference_captions"])
    assert pads.dataset(path, filesystem=fs).schema.remove_metadata().equals(CAPTION_SCHEMA)
    captions = read_ok_captions(uris["reference_captions"])
    assert sorted(captions["id"].to_pylist()) == sorted(manifest["id"].to_pylist())
    assert set(captions["model"].to_pylist()) == {demo.REFERENCE_MODEL}
    by_id = {row["id"]: row for row in captions.to_pylist()}
    for row in manifest.slice(0, 30).to_pylist():
        caption = by_id[row["id"]]
        with open(row["image"], "rb") as fh:
            assert hashlib.sha256(fh.read()).hexdigest() == caption["image_sha256"]
        assert caption_text(caption["ocr"], caption["visual_scene"], caption["textimage_relation"]).startswith(
            ("OCR:", "Scene:"))
        if demo.decided_by(row["id"]) == "contrast":
            assert caption["textimage_relation"].startswith("contrast")


def _bag_of_words_accuracy(train_texts, train_y, test_texts, test_y) -> float:
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = CountVectorizer()
    clf = LogisticRegression(max_iter=2000).fit(vec.fit_transform(train_texts), train_y)
    return float((clf.predict(vec.transform(test_texts)) == np.asarray(test_y)).mean())


def test_text_alone_cannot_decide_image_pairs_but_the_image_can(tmp_path):
    """The property the training tests rely on: on image-decided pairs a text-only model is near
    chance, while both the pixels and the reference caption carry the label."""
    uris = demo.write_demo(str(tmp_path / "big"), n_train=600, n_dev=0, n_test=300, seed=3)
    table = read_manifest(uris["manifest"]).table.to_pylist()
    train = [r for r in table if r["split"] == "train"]
    test = [r for r in table if r["split"] == "test"]
    image_only = [r for r in test if demo.decided_by(r["id"]) == "image"]
    text_led = [r for r in test if demo.decided_by(r["id"]) in ("text", "both")]
    y = lambda rows: [r["label_sentiment"] for r in rows]  # noqa: E731
    texts = lambda rows: [r["text"] for r in rows]  # noqa: E731

    assert _bag_of_words_accuracy(texts(train), y(train), texts(text_led), y(text_led)) > 0.9
    assert _bag_of_words_accuracy(texts(train), y(train), texts(image_only), y(image_only)) < 0.55

    captions = {r["id"]: r for r in read_ok_captions(uris["reference_captions"]).to_pylist()}
    with_caption = lambda rows: [  # noqa: E731
        r["text"] + " " + caption_text(captions[r["id"]]["ocr"], captions[r["id"]]["visual_scene"],
                                       captions[r["id"]]["textimage_relation"]) for r in rows]
    assert _bag_of_words_accuracy(with_caption(train), y(train), with_caption(image_only), y(image_only)) > 0.9

    def mean_colour(rows):
        return [np.asarray(Image.open(r["image"]).convert("RGB"), dtype=np.float32).mean(axis=(0, 1)) for r in rows]

    from sklearn.linear_model import LogisticRegression

    pixels = LogisticRegression(max_iter=2000).fit(np.stack(mean_colour(train)) / 255, y(train))
    assert (pixels.predict(np.stack(mean_colour(image_only)) / 255) == np.asarray(y(image_only))).mean() > 0.8


def test_demo_writes_to_s3(s3_bucket):
    uris = demo.write_demo(f"{s3_bucket}/demo", n_train=12, n_dev=3, n_test=3)
    manifest = read_manifest(uris["manifest"])
    assert manifest.table.num_rows == 18
    first = manifest.table["image"][0].as_py()
    assert first.startswith(f"{s3_bucket}/demo/images/") and storage.exists(first)
    assert Image.open(io.BytesIO(storage.read_bytes(first))).size == (64, 64)
    assert read_ok_captions(uris["reference_captions"]).num_rows == 18


def test_decided_by_rejects_other_ids():
    with pytest.raises(ValueError, match="not a demo pair id"):
        demo.decided_by("12345")
