"""UMAF's Table 3 beside a sweep's results: one Markdown row per feature-extractor row.

The sweep (``configs/tune/table3-msed-sentiment.yaml``) has one trial per ``configs/train/table3-*``
preset; each trial's ``metrics.json`` gives the test accuracy and the weighted F1, precision and
recall (the MSED protocol's), and its Figure 3 numbers (``method.attention_by_source``) the share of
the last fusion layer's attention that image tokens (or the caption fields) receive. Plain Python.
"""

from __future__ import annotations

from typing import Any

from umaf import storage

# Table 3 of the paper (Acc, F1, Prec, Rec in %). Table 3 prints no numbers for the image-only rows
# its text discusses, nor for the VLM (UMAF) row: for that one, Table 1's MSED sentiment result
# (P 89.57, R 89.34, F1 89.46; no accuracy) is the paper's figure.
PAPER_TABLE3: dict[str, dict[str, Any]] = {
    "table3-bert": {"row": "BERT", "setting": "Text-only", "acc": 83.59, "f1": 83.48, "prec": 83.30, "rec": 83.69},
    "table3-bert-resnet": {"row": "BERT + ResNet", "setting": "Multimodal", "acc": 82.95, "f1": 82.88, "prec": 83.00, "rec": 82.78},
    "table3-roberta": {"row": "RoBERTa", "setting": "Text-only", "acc": 81.68, "f1": 81.58, "prec": 81.33, "rec": 81.06},
    "table3-roberta-vit": {"row": "RoBERTa + ViT", "setting": "Multimodal", "acc": 80.60, "f1": 80.18, "prec": 80.56, "rec": 80.77},
    "table3-clip-text": {"row": "CLIP (Text)", "setting": "Text-only", "acc": 84.62, "f1": 84.61, "prec": 84.71, "rec": 84.54},
    "table3-clip": {"row": "CLIP (Text+Image)", "setting": "Multimodal", "acc": 85.79, "f1": 85.77, "prec": 85.70, "rec": 85.84},
    "table3-resnet": {"row": "ResNet", "setting": "Image-only"},
    "table3-vit": {"row": "ViT", "setting": "Image-only"},
    "table3-clip-image": {"row": "CLIP (Image)", "setting": "Image-only"},
    "table3-vlm": {"row": "VLM captions (UMAF)", "setting": "Multimodal (Table 1)", "f1": 89.46, "prec": 89.57, "rec": 89.34},
}
# A sweep over umaf.backbone (configs/tune/table3-tiny.yaml) names its rows by backbone.
BACKBONE_SETTING = {"captions": "Multimodal (VLM captions)", "text": "Text-only", "image": "Image-only",
                    "text+image": "Multimodal"}
METRICS = (("acc", "accuracy"), ("f1", "weighted_f1"), ("prec", "weighted_precision"), ("rec", "weighted_recall"))


def _row_name(row: dict[str, Any]) -> str:
    return str(row.get("train_preset") or row.get("umaf.backbone") or row.get("trial_id"))


def table3_rows(results: list[dict[str, Any]], storage_kw: dict[str, Any]) -> list[dict[str, Any]]:
    """Sweep result rows (``results.parquet``) → paper and measured figures per Table 3 row, in the
    paper's order (rows the paper does not list come last)."""
    order = list(PAPER_TABLE3)
    out = []
    for result in results:
        name = _row_name(result)
        uri = storage.join(result["run_uri"], "metrics.json") if result.get("run_uri") else None
        metrics = storage.read_json(uri, **storage_kw) if uri and storage.exists(uri, **storage_kw) else {}
        test = metrics.get("test") or {}
        paper = PAPER_TABLE3.get(name, {"row": name, "setting": BACKBONE_SETTING.get(name, "")})
        row = {"name": name, "row": paper["row"], "setting": paper["setting"], "status": result.get("status")}
        for short, key in METRICS:
            row[f"paper_{short}"] = paper.get(short)
            row[f"ours_{short}"] = round(100 * float(test[key]), 2) if key in test else None
        by_source = (metrics.get("method") or {}).get("attention_by_source") or {}
        row["image_attention"] = by_source.get("image", {}).get("attention_share")
        row["caption_attention"] = sum(v["attention_share"] for k, v in by_source.items()
                                       if k in ("ocr", "visual_scene", "textimage_relation", "caption")) or None
        row["text_attention"] = by_source.get("text", {}).get("attention_share")
        out.append(row)
    out.sort(key=lambda r: (order.index(r["name"]) if r["name"] in order else len(order), r["name"]))
    return out


def table3_markdown(rows: list[dict[str, Any]], dataset: str = "") -> str:
    """Paper | ours side by side for Acc, F1, Prec, Rec (%), and Figure 3's attention shares."""
    def cell(value: Any, digits: int = 2) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    head = ["Encoder", "Setting", *(f"{m} {who}" for m in ("Acc", "F1", "Prec", "Rec") for who in ("paper", "ours")),
            "attention: text / caption / image", "status"]
    lines = [f"UMAF Table 3{f' on {dataset}' if dataset else ''} (test, %; F1/Prec/Rec weighted; attention = "
             "share of the last fusion layer's attention received, Figure 3)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pairs = [cell(r[f"{who}_{m}"]) for m, _ in METRICS for who in ("paper", "ours")]
        shares = " / ".join(cell(r[k], 3) for k in ("text_attention", "caption_attention", "image_attention"))
        lines.append("| " + " | ".join([r["row"], r["setting"], *pairs, shares, str(r["status"] or "")]) + " |")
    return "\n".join(lines) + "\n"
