#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA extension, run the GPU tests, run the GPU
# benchmarks. Usage (repository root, on the GPU machine): bash bench/gpu_check.sh OUT_DIR
# Each step has its own time limit so that a slow step still leaves the later ones a chance.
set -u
out=${1:-runs/gpu_check}
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
SPLITLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=16 \
  step build 150 "$py" -m pip install --no-deps --no-build-isolation -e .
"$py" -c "import splitlora._ext as e; print('extension with CUDA:', e.built_with_cuda())"
TAIL=4 step test_codec_cuda 60 "$py" -m pytest -q -p no:cacheprovider tests/csrc/test_codec_cuda.py
TAIL=20 step bench_codec 60 "$py" -m bench.bench_codec --device cuda --reps 20 --out "$out"
TAIL=4 step test_kernels_gpu 90 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/kernels
TAIL=25 step bench_lora 90 "$py" -m bench.bench_lora --device cuda --quick --profile --out "$out"
