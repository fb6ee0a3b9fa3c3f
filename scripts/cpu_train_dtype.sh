#!/usr/bin/env bash
# The CPU training dtype rule (docs/reference.md, Device and dtype): ms per training step at the quickstart's
# defaults in float32 and under bf16 autocast, the two interleaved, median of steps 5-30 of each run.
#   bash scripts/cpu_train_dtype.sh [ROUNDS]      (run python prepare_data.py first; writes only under /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
ROUNDS="${1:-2}"
echo "date $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $(nproc) cores, torch $("$PY" -c 'import torch; print(torch.__version__)')"
for r in $(seq "$ROUNDS"); do
  for dtype in float32 bfloat16; do
    out="/tmp/cpu_train_dtype_$dtype"; rm -rf "$out"
    "$PY" train.py --device=cpu --dtype="$dtype" --max_iters=30 --eval_interval=1000 --log_interval=1 --out_dir="$out" > /dev/null
    "$PY" -c "
import json, statistics
ms = [r['ms'] for r in map(json.loads, open('$out/log.jsonl')) if r['kind'] == 'train' and r['step'] >= 5]
print(f'round $r  $dtype: median {statistics.median(ms):.0f} ms per step [min {min(ms):.0f}, max {max(ms):.0f}] over {len(ms)} steps')"
  done
done
