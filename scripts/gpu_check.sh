#!/usr/bin/env bash
# Every GPU check in one command, for one lent GPU (each stage under a timeout, 14 min 35 s at most in all):
#   0. the toolkit-free build: the kernels built with CUDA_HOME unset, saying which libnvrtc was loaded
#   1. the GPU tests (fused kernels vs the reference model, graph vs no graph, bench and the cost sweep on CUDA)
#   2. the decode-latency table (scripts/decode_bench.py)
#   3. train.py + sample.py on CUDA: a short bf16 run at the README's GPU preset shape, then fused sampling
#   4. the cost sweep (experiments/cost_sweep.py): memory and latency of P streams against width scaling over
#      batches x contexts x MHA/GQA x paths, and the training-cost table
#   5. the lesson (bench.py) at the paper's 1.6B scale: fused path, eager path, and batch 8 on the fused path
# Usage: bash scripts/gpu_check.sh [OUTDIR]    (logs land in OUTDIR, default gpu_out/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
stage() { echo; echo "=== $1 ($(date +%T))"; }

stage "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/env.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"

stage "toolkit-free kernel build (CUDA_HOME and CUDA_PATH unset)"
env -u CUDA_HOME -u CUDA_PATH timeout 40 "$PY" -c "
from kernels import fused
print(fused.fused_status('cuda'))  # the probe build, bf16 / head_dim 64: ON or OFF with the reason
for dtype in fused.DTYPES:
    for head_dim in (64, 128):
        fused.build(dtype, head_dim)  # each prints the libnvrtc it was compiled with, the arch and the times
" 2>&1 | tee "$OUT/build.txt"

stage "GPU tests"
timeout 170 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_bench.py tests/test_cost_sweep.py --tb=short --maxfail=20 > "$OUT/tests.log" 2>&1
echo "pytest rc=$?"; grep -E "passed|failed|Error|error" "$OUT/tests.log" | tail -25

stage "decode latency"
timeout 170 "$PY" scripts/decode_bench.py > "$OUT/decode.log" 2>&1
echo "decode_bench rc=$?"; grep -v '^{' "$OUT/decode.log" | tail -45

stage "train + sample on CUDA"
D=/tmp/gpu_check_data; C=/tmp/gpu_check_out
timeout 60 "$PY" prepare_data.py --out_dir=$D > "$OUT/train.log" 2>&1
timeout 90 "$PY" train.py --data_dir=$D --out_dir=$C --device=cuda --n_layer=6 --n_head=6 --n_embd=384 --block_size=512 \
  --batch_size=64 --n_streams=4 --n_prefix=8 --max_iters=150 --eval_interval=150 --eval_iters=10 --log_interval=25 \
  --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=20 >> "$OUT/train.log" 2>&1
echo "train rc=$?"
timeout 60 "$PY" sample.py --out_dir=$C --device=cuda --num_samples=2 --max_new_tokens=200 >> "$OUT/train.log" 2>&1
echo "sample rc=$?"; grep -E "device|model|parameters|step|decoding|tokens/s|error|Error" "$OUT/train.log" | tail -20

stage "cost sweep"
timeout 150 "$PY" experiments/cost_sweep.py --mode=all --time_limit=90 --plot="$OUT/cost.png" > "$OUT/cost_sweep.log" 2>&1
echo "cost_sweep rc=$?"; grep -v -e '^{' -e 'FusedDecoder: P=' "$OUT/cost_sweep.log" | tail -c 7000

stage "the lesson at the paper scale"
lesson() {  # lesson NAME FLAGS...: bench.py's default run on the GPU with 20 s of pairs (not timed there yet)
  local name=$1; shift
  timeout 90 "$PY" bench.py --device=cuda --budget=20 "$@" > "$OUT/lesson_$name.log" 2>&1
  echo "lesson $name rc=$?"; grep -v -e '^{' -e '^\[bench\]' -e 'FusedDecoder: P=' "$OUT/lesson_$name.log" | tail -c 3000
}
lesson fused --paths=fused
lesson eager --paths=eager
lesson fused_b8 --batch=8 --paths=fused
stage "done"
