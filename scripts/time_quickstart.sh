#!/usr/bin/env bash
# Time the README's two quickstart commands as a newcomer meets them: a fresh clone of this repository
# and a fresh venv, then each command timed. Writes nothing outside $WORK.
#   bash scripts/time_quickstart.sh [WORK]        (default WORK=/tmp/parscale-quickstart)
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-/tmp/parscale-quickstart}"
rm -rf "$WORK" && mkdir -p "$WORK" && git clone -q "$REPO" "$WORK/repo" && cd "$WORK/repo" || exit 1
python3 -m venv "$WORK/venv" && source "$WORK/venv/bin/activate"
now() { date +%s.%N; }
echo "date $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(now); pip install -q -r requirements.txt > "$WORK/pip.log" 2>&1; rc=$?; t1=$(now)
echo "pip install -r requirements.txt: $(echo "$t1 - $t0" | bc) s (exit $rc; torch $(python -c 'import torch; print(torch.__version__)'))"
t0=$(now); python prepare_data.py && python train.py && python sample.py; rc=$?; t1=$(now)
echo "main job (prepare_data, train, sample): $(echo "$t1 - $t0" | bc) s (exit $rc)"
t0=$(now); python -m pytest -q tests 2>&1 | tail -1; t1=$(now)
echo "tests: $(echo "$t1 - $t0" | bc) s"
echo "load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
