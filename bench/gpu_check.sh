#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the GPU tests, run the GPU
# benchmarks. Usage (repository root, on the GPU machine):
#   bash bench/gpu_check.sh OUT_DIR [all|codec|kernels]
# Each step has its own time limit so that a slow step still leaves the later ones a chance.
# `all` can take about 11 minutes (the Triton GPU tests compile many kernel variants): on a
# machine whose calls are capped at 10 minutes, run `codec` and `kernels` as two calls.
set -u
out=${1:-runs/gpu_check}
part=${2:-all}
case "$part" in all|codec|kernels) ;; *) echo "part must be all, codec or kernels, got $part" >&2; exit 2;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  local t0=$(date +%s)
  timeout "$secs" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n "${TAIL:-12}" "$out/$name.log"
}
if [ "$part" != kernels ]; then
  SPLITLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
    step build 150 "$py" -m pip install --no-deps --no-build-isolation -e .
  "$py" -c "import splitlora._ext as e; print('extension with CUDA:', e.built_with_cuda())"
  TAIL=4 step test_codec_cuda 150 "$py" -m pytest -q -p no:cacheprovider tests/csrc/test_codec_cuda.py
  TAIL=24 step bench_codec 100 "$py" -m bench.bench_codec --device cuda --reps 20 --out "$out"
fi
if [ "$part" != codec ]; then
  # The kernels need no extension build: splitlora_kernels is pure Python + Triton.
  TAIL=6 step test_kernels_gpu 300 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/kernels
  TAIL=25 step bench_lora 120 "$py" -m bench.bench_lora --device cuda --quick --profile --out "$out"
fi
