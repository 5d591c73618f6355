#!/usr/bin/env bash
# One call on a lent GPU machine for an end-to-end GPU size: build the extension, run some of the
# size's runs, and pack the run folders into one file under OUT_DIR (the device tool brings back at
# most 8 files). Usage (repository root, on the GPU machine):
#   bash bench/gpu_e2e.sh OUT_DIR RUNS [bench.e2e options...]
#   bash bench/gpu_e2e.sh $OUT centralized,fedlora,splitlora-fp32,splitlora-int8
#   bash bench/gpu_e2e.sh $OUT sl,splitlora-int4-ef,fedcybgd,hsplitlora    # the next call
#   E2E_SIZE=quality-gpu bash bench/gpu_e2e.sh $OUT pretrained,centralized  # the quality size
#     (SmolLM2-135M must be on the machine first: bench/smollm2_carry.sh)
# The data: ../shared/data does not travel to the device machine. Before the first call, here:
#   mkdir -p .gpudata && cp -r ../shared/data/e2e ../shared/data/gpt2-tokenizer .gpudata/
#   echo /.gpudata/ >> .git/info/exclude
# and name .gpudata in the call's carry; SPLITLORA_DATA defaults to it. SPLITLORA_SKIP_BUILD=1
# skips the build (a warm machine keeps it). Runs from an earlier call come along the same way:
# copy its archive (e2e-gpu.tgz, quality-gpu.tgz) into .gpudata/ and this script unpacks it first,
# so suite.json keeps every run and the new archive holds them all. After a call, here:
#   tar xzf FILES_AT/e2e-gpu.tgz -C runs && cp FILES_AT/e2e-gpu.tgz .gpudata/
#   python -m bench.report --runs runs/e2e-gpu
set -uo pipefail
OUT=${1:?usage: bench/gpu_e2e.sh OUT_DIR RUNS [bench.e2e options...]}
RUNS=${2:?usage: bench/gpu_e2e.sh OUT_DIR RUNS [bench.e2e options...]}
shift 2
SIZE=${E2E_SIZE:-gpu}
case "$SIZE" in
  gpu) name=e2e-gpu ;;
  quality-gpu) name=quality-gpu ;;
  *) echo "E2E_SIZE must be gpu or quality-gpu, got $SIZE" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1 SPLITLORA_DATA=${SPLITLORA_DATA:-$PWD/.gpudata}
if [ ! -f "$SPLITLORA_DATA/e2e/valid.txt" ]; then
  echo "no E2E data at $SPLITLORA_DATA (e2e/valid.txt): copy ../shared/data/e2e and gpt2-tokenizer into .gpudata/ and carry it" >&2
  exit 2
fi
mkdir -p "$OUT" runs
if [ -f ".gpudata/$name.tgz" ]; then
  tar xzf ".gpudata/$name.tgz" -C runs && echo "earlier runs: $(ls "runs/$name" | tr '\n' ' ')"
fi
if [ "${SPLITLORA_SKIP_BUILD:-0}" != 1 ]; then  # 1: the extension is built already (a warm machine)
  start=$(date +%s)
  SPLITLORA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s"
fi
# --out first, so that --steps or --set (quick tries, which otherwise go to runs/<size>-quick) land
# where the archive is packed from.
python -m bench.e2e --size "$SIZE" --out "runs/$name" --only "$RUNS" "$@"
rc=$?
# Adapters and checkpoints stay behind: the report reads the records, summaries and logs.
tar czf "$OUT/$name.tgz" --exclude=adapter --exclude=checkpoints --exclude='*.safetensors' -C runs "$name"
echo "packed $(du -h "$OUT/$name.tgz" | cut -f1) into $OUT/$name.tgz"
exit $rc
