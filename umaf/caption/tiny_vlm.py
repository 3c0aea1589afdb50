"""A tiny random-weight LLaVA-architecture VLM, built offline from config objects, for tests and the demo.

Why: the ``hf`` backend must be exercised end to end (processor → generate → grammar-constrained
JSON → parse) without a model hub and on a CPU in seconds. The model here has the real production
shape — a CLIP vision tower, a projector and a Llama decoder, loaded through
``AutoModelForImageTextToText.from_pretrained`` / ``AutoProcessor.from_pretrained`` like any hub
model — but a few thousand parameters and random weights, so its captions are gibberish that the
grammar still forces into schema-valid JSON.

The tokenizer is a byte-level BPE trained here on the UMAF prompt (a few hundred merges, in
milliseconds): byte-level vocabularies are what xgrammar and real VLM tokenizers (Qwen, Llama) use,
so every string the grammar allows is spellable. The image processor is ``LlavaImageProcessorPil``
(PIL only; torchvision is not needed).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from umaf.caption.prompt import PROMPT_TEMPLATE

TINY_VLM_VERSION = 1  # bump when the recipe below changes, so cached copies are rebuilt
IMAGE_SIZE = 32
PATCH_SIZE = 8  # 4×4 patches = 16 image tokens (the CLS feature is dropped: strategy "default")
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>"]

# Plain chat template: the user turn holds the image placeholder(s) then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
        show_progress=False,
    )
    corpus = [PROMPT_TEMPLATE, '{"ocr": "", "visual_scene": "", "textimage_relation": ""}', "USER: ASSISTANT:"]
    tok.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",  # decoder-only batched generation pads on the left
        model_max_length=4096,
    )


# The same recipe at other sizes. "tiny": tests and the demo (a few thousand parameters, CPU seconds).
# "bench-1b": the GPU bench's random-weight VLM at a real model's shape, CLIP ViT-L/14 at 224 px (256
# image tokens) + a TinyLlama-1.1B-shaped decoder (22 layers, 2048 wide, GQA 32/4 heads), ~1.3 B
# parameters, 2.6 GB in bf16: large enough that generation, not Python, sets the pace, small enough
# to build and load within a minute (bench/gpu_suite.py). Only the vocabulary stays the tiny BPE's.
VLM_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "vision_hidden": 32, "vision_ffn": 64,
             "vision_layers": 1, "vision_heads": 2, "hidden": 64, "ffn": 128, "layers": 2, "heads": 4, "kv_heads": 2},
    "bench-1b": {"image_size": 224, "patch_size": 14, "vision_hidden": 1024, "vision_ffn": 4096,
                 "vision_layers": 24, "vision_heads": 16, "hidden": 2048, "ffn": 5632, "layers": 22, "heads": 32,
                 "kv_heads": 4},
}


def build_tiny_vlm(out_dir: str | os.PathLike[str], seed: int = 0, shape: str = "tiny") -> Path:
    """Build the tiny VLM (or the recipe at another of :data:`VLM_SHAPES`) and ``save_pretrained``
    model + processor into ``out_dir``; return it. Large shapes are initialised on the GPU when there
    is one and saved in bf16."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    out = Path(out_dir)
    tokenizer = _train_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    size = VLM_SHAPES[shape]
    vision = CLIPVisionConfig(
        hidden_size=size["vision_hidden"], intermediate_size=size["vision_ffn"],
        num_hidden_layers=size["vision_layers"], num_attention_heads=size["vision_heads"],
        image_size=size["image_size"], patch_size=size["patch_size"], projection_dim=size["vision_hidden"],
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size["hidden"], intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_select_strategy="default", vision_feature_layer=-1, projector_hidden_act="gelu",
    )
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    large = shape != "tiny"
    with torch.device("cuda" if large and torch.cuda.is_available() else "cpu"):
        model = LlavaForConditionalGeneration(config).eval()
    if large:
        model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    side = size["image_size"]
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        do_center_crop=True, do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=size["patch_size"],
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "umaf_tiny_vlm.json").write_text(json.dumps({"version": TINY_VLM_VERSION, "seed": seed, "shape": shape}))
    return out


def ensure_tiny_vlm(cache_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """The tiny VLM's folder under ``cache_dir``, built on first use (safe when several actors race)."""
    root = Path(cache_dir).expanduser().resolve()
    target = root / f"tiny-llava-v{TINY_VLM_VERSION}-seed{seed}"
    if (target / "umaf_tiny_vlm.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per machine; the others wait and reuse it
        if not (target / "umaf_tiny_vlm.json").is_file():
            tmp = root / f".{target.name}.{os.getpid()}.tmp"
            build_tiny_vlm(tmp, seed=seed)
            os.replace(tmp, target)
    return target
