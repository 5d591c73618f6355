#!/usr/bin/env bash
# One lean call on a lent GPU machine for the fused LoRA kernels (no extension build): the LoRA
# benchmark at the key case and a few small shapes (with per-method GPU time and host enqueue
# time, a cProfile of the fused layer's host time and the host cost of one launch), then the GPU
# tests of tests/kernels in parallel workers. Usage (repository root, on the GPU machine):
#   bash bench/gpu_lora_quick.sh OUT_DIR [SHAPES] [PATHS] [TEST_FILTER]
# SHAPES: TOKENSxDxR list for bench_lora --shapes; PATHS: fused:<path> methods to time
# (default all); TEST_FILTER: pytest -k expression (default: every GPU test).
# Time limits per step (BENCH_SECS, TEST_SECS) keep the whole call inside about 4.5 minutes.
set -u
out=${1:-runs/gpu_lora_quick}
shapes=${2:-8192x4096x16,2048x768x16,8192x768x16,2048x1024x16}
paths=${3:-}
filter=${4:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
py=${PYTHON:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/bench.log"
t0=$(date +%s)
timeout "${BENCH_SECS:-120}" "$py" -m bench.bench_lora --device cuda --shapes "$shapes" ${paths:+--paths "$paths"} \
  --profile --cprofile ${CPROFILE_SHAPE:-} --launch-overhead --out "$out" >>"$out/bench.log" 2>&1
echo "== bench: rc=$? in $(( $(date +%s) - t0 ))s"
t0=$(date +%s)
workers=""
"$py" -c "import xdist" 2>/dev/null && workers="-n ${WORKERS:-8}"
timeout "${TEST_SECS:-130}" "$py" -m pytest -q -p no:cacheprovider -m gpu $workers ${filter:+-k "$filter"} \
  tests/kernels >"$out/tests.log" 2>&1
echo "== tests: rc=$? in $(( $(date +%s) - t0 ))s"
tail -n 15 "$out/tests.log"
grep -E "^(tokens=|[0-9]+x[0-9]+ r[0-9]+ )|us per call" "$out/bench.log" "$out/profile.txt" 2>/dev/null | cut -c1-220
