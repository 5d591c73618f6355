"""Instructions a compress kernel executes per chunk, counted from its SASS (no GPU needed).

    python -m bench.sass_count [--arch sm_90] [--cubin FILE]

Compiles csrc/codec_cuda.cu to a cubin with nvcc (or reads --cubin), disassembles it with
cuobjdump, which runs nvdisasm (`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` brings both:
their bin/ folder must be on PATH) and, for
every round-to-nearest compress kernel, walks the instructions of one thread's second chunk (the
first chunk shares its instructions with the set-up) along the common path: a finite group with a
nonzero scale whose elements all take the fast rounding, i.e. past the non-finite and all-zero
branches and over the slow-path calls (IEEE division, exact rounding). The count is what each
thread issues per chunk of 16 input bytes; on the bf16/fp16 kernels, which are bound by instruction
issue rather than HBM (bench/RESULTS.md), fewer instructions should mean more bandwidth, which only
a GPU run can confirm. The absmax reduction before the chunks is the same on both paths and not
counted.

The walk is a heuristic on the listing's shape (branch targets, BSSY/BSYNC pairs, CALL
instructions), written for this file's kernels as nvcc 13 compiles them; check the path it prints
with --verbose after a change to the kernels.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def compile_cubin(arch: str, out: Path) -> None:
    import torch

    include = Path(torch.__file__).parent / "include"
    stub = out.parent / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    # The CPU build of torch lacks this generated header; the kernels need nothing from it.
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-O3", "--expt-relaxed-constexpr",
           "-DSPLITLORA_WITH_CUDA=1", f"-I{out.parent / 'stub'}", f"-I{include}",
           f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{sysconfig.get_paths()['include']}",
           f"-I{ROOT / 'csrc'}", "-o", str(out), str(ROOT / "csrc" / "codec_cuda.cu")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if " error" in line or "error:" in line]
        raise RuntimeError(f"nvcc could not compile csrc/codec_cuda.cu for {arch} (exit {done.returncode}):\n"
                           + "\n".join(errors[:20] or done.stderr.splitlines()[-20:]))


def functions(sass: str):
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        m = re.search(r"compress_kernelINS0_(\d*)(\w+?)ELi(\d)ELb0ELb(\d)E", name)
        if m and "decompress" not in name:
            yield m.group(2), int(m.group(3)), m.group(4) == "1", block


def walk_chunk(block: str, verbose: bool = False) -> int:
    ins, order = {}, []
    for line in block.splitlines():
        m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            addr = int(m.group(1), 16)
            ins[addr] = m.group(2).strip()
            order.append(addr)
    index = {a: i for i, a in enumerate(order)}
    rcp = next(a for a in order if ins[a].startswith("MUFU.RCP"))  # inside the first chunk
    stores = [a for a in order if a > rcp and re.match(r"STG\.E(\.64|\.U16|\.U8)?\s", ins[a])]
    start, stop = order[index[stores[0]] + 1], stores[1]  # after chunk 0's code store, to chunk 1's
    addr, count = start, 0
    outer = next(ins[a].split(",")[0].split()[1] for a in order[index[start]:] if ins[a].startswith("BSSY"))
    while addr != stop:
        text = ins[addr]
        count += 1
        if verbose:
            print(f"  {addr:05x} {text}")
        branch = re.match(r"(@!?U?P\w+\s+)?BRA(\s+!?P\w+,)?\s+(?:`\()?0x([0-9a-f]+)", text)
        if branch:
            target = int(branch.group(3), 16)
            conditional = branch.group(1) is not None or branch.group(2) is not None
            if not conditional:
                addr = target
                continue
            skipped = [ins[a] for a in order[index[addr] + 1:index.get(target, index[addr] + 1)]]
            head = []  # the target's straight-line block: up to its first branch or sync
            for a in order[index.get(target, len(order)):]:
                if re.match(r"(@!?U?P\w+\s+)?(BRA|BSYNC|EXIT)\b", ins[a]):
                    break
                head.append(ins[a])
            # Not taken: the jump to the chunk's end (the all-zero group; the end is the BSYNC of
            # the chunk's outermost BSSY) or to the non-finite block (it stores the flag). Taken: a
            # jump over a slow-path call.
            if ins.get(target, "") == f"BSYNC {outer}":
                taken = False
            elif any("STRONG.SYS" in h for h in head):
                taken = False
            else:
                taken = any(s.startswith("CALL") for s in skipped)
            if taken:
                addr = target
                continue
        addr = order[index[addr] + 1]
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--cubin", default=None, help="a cubin of csrc/codec_cuda.cu (default: compile one)")
    parser.add_argument("--verbose", action="store_true", help="print the walked instructions")
    args = parser.parse_args(argv)
    wheels = "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm, then put their nvidia/cu13/bin folder on PATH"
    for tool, hint in (("nvcc", "the CUDA toolkit"), ("cuobjdump", wheels), ("nvdisasm", wheels)):
        if tool == "nvcc" and args.cubin:
            continue
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found on PATH: it comes with {hint}")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(args.cubin) if args.cubin else Path(tmp) / "codec.cubin"
        if not args.cubin:
            compile_cubin(args.arch, cubin)
        sass = subprocess.run(["cuobjdump", "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    print("| input | bits | path | instructions per chunk | chunk elements | per element |")
    print("|---|---|---|---|---|---|")
    for dtype, bits, lean, block in sorted(functions(sass), key=lambda f: (f[0], -f[1], f[2])):
        n = walk_chunk(block, args.verbose)
        elems = 4 if dtype == "F32" else 8
        print(f"| {dtype.lower()} | {bits} | {'lean' if lean else 'established'} | {n} | {elems} | {n / elems:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
