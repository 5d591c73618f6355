#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, then the named parts (default: all of them):
#   tests       the trainer's GPU tests
#   throughput  the server-throughput benchmark at the GPT-2 medium shape
#   llama       the same at the Llama-7B shape, with the server segment's MFU
#   train       a short SplitLoRA run of the default config on the GPU
#   dist        transport=dist: a server and two clients as processes on this GPU, then the same
#               run in one process; steps per second of both, for bench/RESULTS.md
# Usage: bench/gpu_trainer.sh OUT_DIR [PART...]. The build is skipped when it is up to date (a
# warm machine keeps it between calls), so the parts can be spread over calls.
set -uo pipefail
OUT=${1:?usage: bench/gpu_trainer.sh OUT_DIR [tests|throughput|llama|train|dist ...]}
shift
parts=${*:-tests throughput llama train dist}
for part in $parts; do
  case "$part" in tests|throughput|llama|train|dist) ;; *) echo "unknown part $part (tests, throughput, llama, train, dist)" >&2; exit 2;; esac
done
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SPLITLORA_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
for part in $parts; do
  echo "== $part ($(date -u +%H:%M:%S) UTC)"
  case "$part" in
    tests) python -m pytest tests/trainer/test_trainer_gpu.py -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/tests.txt" ;;
    throughput) python -m bench.bench_trainer --device cuda --out "$OUT" 2>&1 | tail -12 ;;
    # The Llama-7B shape: server segment of 30 layers at d 4096, its MFU (two 13 GB server copies: fused, PEFT).
    llama) timeout 300 python -m bench.bench_trainer --device cuda --model llama-7b --repeats 5 --out "$OUT" 2>&1 | tail -16 ;;
    train) python -m splitlora train --no-progress device=cuda output_dir="$OUT/run" train.steps=100 2>&1 | tail -6 | tee "$OUT/train.txt" ;;
    dist)
      # NCCL refuses several ranks on one GPU, so the parties exchange through host memory over gloo.
      timeout 150 torchrun --standalone --nproc-per-node 3 -m splitlora train --no-progress device=cuda transport=dist \
        output_dir="$OUT/dist" train.clients=2 train.steps=60 eval.generate=false 2>&1 | tail -8 | tee "$OUT/dist.txt"
      timeout 120 python -m splitlora train --no-progress device=cuda output_dir="$OUT/local" train.clients=2 \
        train.steps=60 eval.generate=false 2>&1 | tail -3
      for run in dist local; do
        python -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[2], s['steps'], 'steps in', \
round(s['wall_time_s'], 2), 's:', round(s['steps'] / s['wall_time_s'], 2), 'steps/s; bytes', s['bytes_total'])" \
          "$OUT/$run/summary.json" "$run" 2>&1 | tee -a "$OUT/dist.txt"
      done ;;
  esac
done
