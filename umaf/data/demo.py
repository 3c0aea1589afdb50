"""A synthetic image–text sentiment dataset, drawn with PIL offline in about a second.

Why it exists: the quickstart and the tests need a dataset that needs no download, trains on a CPU in
seconds, and — unlike random data — has the structure UMAF is about: the label is carried partly by
the text, partly by the image, and on some pairs *only* the image decides. A model that reads the
VLM's description of the image ([T; T_vlm], UMAF Eq. 1–2) can then beat a text-only model on exactly
those pairs, which is what the training tests check.

Every pair has a label (``negative``/``neutral``/``positive``, task ``sentiment``) and is one of four
kinds, recorded as the last part of its id (``demo-train-0007-image``) and by :func:`decided_by`:

``both``      text and image express the label (for ``neutral``: a plain statement and a flat face);
``text``      the text expresses the label, the image is neutral (grey, flat face);
``image``     the text is ambiguous ("So, the weekend.") — the same pool for every label — and only
              the image (face, colour, symbols, drawn word) tells the label;
``contrast``  the text says the opposite polarity, the image (which wins) tells the label, as in
              sarcasm (positive/negative labels only).

Images are 64×64 JPEGs: a background colour (warm/grey/dark blue), a cartoon face (smile/flat
mouth/frown), small symbols (stars/squares/rain drops) and sometimes a drawn word (``YAY``/``MEMO``/
``SAD``...). Alongside the manifest, :func:`write_demo` writes *reference captions* in the captions
schema (:data:`umaf.caption.store.CAPTION_SCHEMA`) that describe exactly what was drawn — what a
perfect VLM would answer — so training can be tested without running a VLM.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from datetime import datetime, timezone
from typing import Literal

import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image, ImageDraw, ImageFont

from umaf import storage
from umaf.caption.fingerprint import fingerprint_of
from umaf.caption.store import CAPTION_SCHEMA, STATUS_OK
from umaf.data.manifest import build_table, write_manifest

DATASET_NAME = "demo"
TASK = "sentiment"
LABELS = ["negative", "neutral", "positive"]
NEGATIVE, NEUTRAL, POSITIVE = range(3)
REFERENCE_MODEL = "demo-reference"
DecidedBy = Literal["both", "text", "image", "contrast"]
DECIDED_BY = ("both", "text", "image", "contrast")
IMAGE_SIZE = 64

# Per label, ten consecutive pairs get these kinds (then the split is shuffled): 30% both, 30% text,
# 30% image-only, 10% contrast. Neutral has no opposite polarity, so its contrast slot is image-only.
_KIND_CYCLE: tuple[DecidedBy, ...] = ("both", "text", "image") * 3 + ("contrast",)

# A fixed timestamp keeps the reference captions byte-identical for a given seed.
_CAPTIONED_AT = datetime(2024, 1, 1, tzinfo=timezone.utc)
# The reference captions are one caption set like any other: written by this module, not a model.
REFERENCE_FINGERPRINT = fingerprint_of({"format": 1, "reference": REFERENCE_MODEL, "written_by": "umaf.data.demo"})

# Topics are shared by every label and kind, so a topic word carries no label information.
_TOPICS = [
    "the weekend", "my new job", "the game last night", "this coffee", "the concert", "the exam",
    "our trip", "the new phone", "the neighbours", "the traffic", "the weather", "this movie",
    "the meeting", "dinner", "the train ride", "the update", "my birthday", "the interview",
    "the lecture", "the match", "the garden", "the holiday", "the move", "the launch",
]
_TEXT_TEMPLATES = {
    POSITIVE: [
        "I love {t}!", "{T} was amazing, so happy", "Best thing ever: {t}", "{T} made my day",
        "What a wonderful time, {t}", "So grateful for {t}", "{T} was fantastic!", "Great news about {t}",
    ],
    NEGATIVE: [
        "I hate {t}.", "{T} was awful", "Worst thing ever: {t}", "{T} ruined my day",
        "What a disaster, {t}", "So disappointed by {t}", "{T} was terrible.", "Sad news about {t}",
    ],
    NEUTRAL: [
        "{T} is on Tuesday.", "A note about {t}.", "Posted a photo of {t}.", "{T} starts at noon.",
        "Details on {t} below.", "Another picture of {t}.", "{T}: schedule attached.", "Update on {t}.",
    ],
}
# Ambiguous texts for image-only pairs: identical pool whatever the label.
_AMBIGUOUS_TEMPLATES = [
    "So, {t}.", "Well... {t}.", "About {t}", "{T}. Here we go.", "{T}, as you can see",
    "Guess how {t} went", "{T}. No words.", "This is {t}.",
]

# What each label looks like, and how the reference caption says it.
_LOOKS = {
    POSITIVE: {
        "backgrounds": [((250, 200, 60), "bright yellow"), ((255, 150, 60), "warm orange"), ((255, 170, 190), "soft pink")],
        "mouth": "smile", "face_words": "a smiling cartoon face", "symbols": "star", "symbol_words": "small stars",
        "words": ["YAY", "LOVE", "WIN", "JOY"], "tone": "a cheerful, happy scene",
    },
    NEUTRAL: {
        "backgrounds": [((170, 170, 170), "plain grey"), ((205, 195, 175), "beige"), ((190, 200, 205), "pale grey-blue")],
        "mouth": "flat", "face_words": "a cartoon face with a straight mouth", "symbols": "square",
        "symbol_words": "small squares", "words": ["MEMO", "INFO", "MENU", "NOTE"], "tone": "a calm, matter-of-fact scene",
    },
    NEGATIVE: {
        "backgrounds": [((40, 50, 110), "dark blue"), ((70, 70, 80), "dark grey"), ((90, 40, 60), "dark maroon")],
        "mouth": "frown", "face_words": "a frowning cartoon face", "symbols": "drop",
        "symbol_words": "falling rain drops", "words": ["SAD", "FAIL", "NO", "UGH"], "tone": "a gloomy, unhappy scene",
    },
}


def decided_by(pair_id: str) -> DecidedBy:
    """Which modality decides a demo pair's label, read from its id (``demo-dev-0003-image`` → ``image``)."""
    kind = pair_id.rsplit("-", 1)[-1]
    if kind not in DECIDED_BY:
        raise ValueError(f"{pair_id!r} is not a demo pair id (expected it to end in one of {DECIDED_BY})")
    return kind  # type: ignore[return-value]


def _text(rng: random.Random, templates: list[str]) -> str:
    topic = rng.choice(_TOPICS)
    return rng.choice(templates).format(t=topic, T=topic[0].upper() + topic[1:])


def _draw_symbol(draw: ImageDraw.ImageDraw, kind: str, x: int, y: int, colour: tuple[int, int, int]) -> None:
    if kind == "star":
        draw.polygon([(x, y - 4), (x + 1, y - 1), (x + 4, y), (x + 1, y + 1), (x, y + 4), (x - 1, y + 1),
                      (x - 4, y), (x - 1, y - 1)], fill=colour)
    elif kind == "square":
        draw.rectangle([x - 2, y - 2, x + 2, y + 2], fill=colour)
    else:  # rain drop
        draw.polygon([(x, y - 4), (x + 2, y + 1), (x, y + 3), (x - 2, y + 1)], fill=colour)


def _draw_image(rng: random.Random, look: dict, word: str | None) -> tuple[bytes, str]:
    """A 64×64 JPEG for one label's look; returns (bytes, visual-scene description)."""
    (bg, bg_words) = rng.choice(look["backgrounds"])
    jitter = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in bg)
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), jitter)
    draw = ImageDraw.Draw(img)
    # Face: a disc in the left/centre, eyes, and a mouth whose shape carries the sentiment.
    r = rng.randint(13, 17)
    cx, cy = rng.randint(r + 2, IMAGE_SIZE - r - 20), rng.randint(r + 2, IMAGE_SIZE - r - 14)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 225, 120), outline=(30, 30, 30))
    for ex in (cx - r // 3, cx + r // 3):
        draw.ellipse([ex - 2, cy - r // 3 - 2, ex + 2, cy - r // 3 + 2], fill=(30, 30, 30))
    mw, my = r // 2, cy + r // 3
    if look["mouth"] == "smile":
        draw.arc([cx - mw, my - mw, cx + mw, my + mw // 2], 20, 160, fill=(30, 30, 30), width=2)
    elif look["mouth"] == "frown":
        draw.arc([cx - mw, my, cx + mw, my + mw + 2], 200, 340, fill=(30, 30, 30), width=2)
    else:
        draw.line([cx - mw, my + 2, cx + mw, my + 2], fill=(30, 30, 30), width=2)
    # Symbols along the right edge.
    n_symbols = rng.randint(2, 4)
    symbol_colour = (255, 255, 255) if look is _LOOKS[NEGATIVE] else (40, 40, 40)
    for k in range(n_symbols):
        _draw_symbol(draw, look["symbols"], IMAGE_SIZE - 8, 8 + k * 12 + rng.randint(-2, 2), symbol_colour)
    parts = [look["face_words"], f"{bg_words} background", f"{n_symbols} {look['symbol_words']}"]
    if word:
        font = ImageFont.load_default(size=12)
        draw.text((3, IMAGE_SIZE - 15), word, fill=(0, 0, 0) if look is not _LOOKS[NEGATIVE] else (255, 255, 255), font=font)
        parts.append(f"the word '{word}' written at the bottom")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), ", ".join(parts) + f": {look['tone']}"


def _relation(kind: DecidedBy, label: int, text_label: int | None) -> str:
    name = {POSITIVE: "positive", NEGATIVE: "negative", NEUTRAL: "neutral"}
    if kind == "both":
        return f"agree: the text and the image both express a {name[label]} feeling"
    if kind == "text":
        return f"the text expresses a {name[label]} feeling; the image is neutral and adds little"
    if kind == "image":
        return f"the text is ambiguous on its own; the image shows a {name[label]} feeling"
    return (f"contrast: the text sounds {name[text_label]} but the image is clearly {name[label]}, "
            "so the text reads as ironic")


def make_pairs(split: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` demo pairs for one split (balanced labels), each with its image bytes and reference caption."""
    labels = [(NEGATIVE, NEUTRAL, POSITIVE)[i % 3] for i in range(n)]
    kinds: list[DecidedBy] = []
    seen = {NEGATIVE: 0, NEUTRAL: 0, POSITIVE: 0}
    for label in labels:
        kind = _KIND_CYCLE[seen[label] % len(_KIND_CYCLE)]
        seen[label] += 1
        if label == NEUTRAL and kind in ("text", "contrast"):
            # A neutral text with a neutral image is simply "both"; neutral has no opposite.
            kind = "both" if kind == "text" else "image"
        kinds.append(kind)
    order = list(range(n))
    rng.shuffle(order)
    pairs = []
    for index, j in enumerate(order):
        label, kind = labels[j], kinds[j]
        text_label: int | None = None
        if kind in ("both", "text"):
            text_label = label
            text = _text(rng, _TEXT_TEMPLATES[label])
        elif kind == "image":
            text = _text(rng, _AMBIGUOUS_TEMPLATES)
        else:
            text_label = POSITIVE if label == NEGATIVE else NEGATIVE
            text = _text(rng, _TEXT_TEMPLATES[text_label])
        look = _LOOKS[NEUTRAL if kind == "text" else label]
        word = rng.choice(look["words"]) if rng.random() < 0.5 else None
        image, scene = _draw_image(rng, look, word)
        pairs.append({
            "id": f"demo-{split}-{index:04d}-{kind}",
            "split": split,
            "text": text,
            "label": label,
            "image_bytes": image,
            "ocr": word or "",
            "visual_scene": scene,
            "textimage_relation": _relation(kind, label, text_label),
        })
    return pairs


def _reference_caption_row(pair: dict) -> dict:
    fields = {k: pair[k] for k in ("ocr", "visual_scene", "textimage_relation")}
    return {
        "id": pair["id"], **fields, "raw": json.dumps(fields), "status": STATUS_OK, "error": None,
        "model": REFERENCE_MODEL, "prompt_version": "demo-reference", "sampling": None,
        "image_sha256": hashlib.sha256(pair["image_bytes"]).hexdigest(), "output_tokens": None,
        "captioned_at": _CAPTIONED_AT, "fingerprint": REFERENCE_FINGERPRINT.id,
        "fingerprint_spec": REFERENCE_FINGERPRINT.spec_json, "request_key": None, "reused_from": None,
    }


def write_demo(out_dir: str, n_train: int = 240, n_dev: int = 60, n_test: int = 60, seed: int = 0, *,
               manifest_uri: str | None = None, **storage_kw) -> dict[str, str]:
    """Write the demo dataset under ``out_dir`` (a local folder or ``s3://`` URI); deterministic per seed.

    Writes ``images/<id>.jpg``, the manifest at ``manifest`` (or ``manifest_uri``) and the reference
    captions at ``reference_captions``; returns their URIs (keys ``images``, ``manifest``,
    ``reference_captions``).
    """
    if min(n_train, n_dev, n_test) < 0:
        raise ValueError(f"split sizes must be >= 0, got train={n_train} dev={n_dev} test={n_test}")
    if not storage.is_s3(out_dir):
        out_dir = storage.resolve(out_dir)[1]  # absolute, so image paths in the manifest work from anywhere
    images_uri = storage.join(out_dir, "images")
    fs, images_path = storage.resolve(images_uri, **storage_kw)
    fs.create_dir(images_path, recursive=True)
    rng = random.Random(seed)
    rows, captions = [], []
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        for position, pair in enumerate(make_pairs(split, n, rng)):
            image_uri = storage.join(images_uri, f"{pair['id']}.jpg")
            with fs.open_output_stream(storage.resolve(image_uri, **storage_kw)[1]) as out:
                out.write(pair["image_bytes"])
            rows.append({"id": pair["id"], "split": split, "text": pair["text"], "image": image_uri,
                         "image_ok": True, "source_index": position, f"label_{TASK}": pair["label"]})
            captions.append(_reference_caption_row(pair))
    manifest_uri = manifest_uri or storage.join(out_dir, "manifest")
    write_manifest(build_table(rows, DATASET_NAME, {TASK: LABELS}), manifest_uri, **storage_kw)
    captions_uri = storage.join(out_dir, "reference_captions")
    cfs, cpath = storage.resolve(captions_uri, **storage_kw)
    pads.write_dataset(
        pa.Table.from_pylist(captions, schema=CAPTION_SCHEMA), cpath, filesystem=cfs, format="parquet",
        basename_template="part-{i}.parquet", existing_data_behavior="delete_matching",
    )
    return {"images": images_uri, "manifest": manifest_uri, "reference_captions": captions_uri}
