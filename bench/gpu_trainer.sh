#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, run the trainer's GPU tests, the server-throughput
# benchmark (GPT-2 medium and Llama-7B shapes) and a short SplitLoRA run on the GPU. Usage: bench/gpu_trainer.sh OUT_DIR
set -uo pipefail
OUT=${1:?usage: bench/gpu_trainer.sh OUT_DIR}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} SPLITLORA_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
start=$(date +%s)
python -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"
python -m pytest tests/trainer/test_trainer_gpu.py -q 2>&1 | tail -15 | tee "$OUT/tests.txt"
python -m bench.bench_trainer --device cuda --out "$OUT" 2>&1 | tail -12
# The Llama-7B shape: server segment of 30 layers at d 4096, its MFU (two 13 GB server copies: fused, PEFT).
timeout 300 python -m bench.bench_trainer --device cuda --model llama-7b --repeats 5 --out "$OUT" 2>&1 | tail -16
python -m splitlora train --no-progress device=cuda output_dir="$OUT/run" train.steps=100 2>&1 | tail -6 | tee "$OUT/train.txt"
# transport=dist with NCCL: one server and two clients as processes on this machine's GPU(s).
timeout 120 torchrun --standalone --nproc-per-node 3 -m splitlora train --no-progress device=cuda transport=dist \
  output_dir="$OUT/nccl" train.clients=2 train.steps=40 eval.generate=false 2>&1 | tail -8 | tee "$OUT/nccl.txt"
