"""Fused LoRA linear vs PEFT, unfused torch and the bare base layer.

    python -m bench.bench_lora --device cuda --out runs/bench          # full sweep, bf16
    python -m bench.bench_lora --device cuda --quick                    # key case only
    python -m bench.bench_lora --device cpu --out runs/bench            # CPU: reference vs PEFT, fp32

Times forward (training mode, autograd recording) and forward+backward with a frozen base weight
and bias, gradients taken for x, lora_a and lora_b with torch.autograd.grad (so no .grad
accumulation is timed). Methods:
  base       nn.Linear alone (cuBLAS), the floor any LoRA layer is measured against
  fused      splitlora_kernels.lora_linear (on CUDA its default path; on CPU the reference)
  fused:<p>  lora_linear_triton(path=<p>) for each CUDA path, "triton" and "cublas"
  unfused    x @ W.T + b + s * (x @ A.T) @ B.T in plain torch ops
  peft       peft.tuners.lora.Linear wrapping the same nn.Linear (dropout 0)
GPU times are triton.testing.do_bench medians (it flushes L2 between runs, so inputs need no
rotation); CPU times are the best of 7 round-robin rounds (every method in turn) of the median
of 3 timed calls, which keeps other processes on the cores from landing on one method. Each shape also checks the
fused output against unfused torch (max error relative to max |y|).
Writes lora_<device>.csv (one row per measurement) and lora_<device>.md (tables with ratios).
"""
import argparse
import importlib
import csv
import datetime
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from splitlora_kernels.ops import lora_linear, lora_linear_triton
# The submodule, not the function of the same name that splitlora_kernels.ops re-exports.
lora_ops = importlib.import_module("splitlora_kernels.ops.lora_linear")

KEY_CASE = (8192, 4096, 16)


def shapes(device, quick):
    if device == "cuda":
        grid = [(t, d, r) for t in (2048, 8192) for d in (768, 1024, 4096) for r in (8, 16, 64)]
    else:
        grid = [(t, d, r) for t in (256, 1024) for d in (256, 768) for r in (8, 16, 64)]
    if quick:
        return [KEY_CASE] if device == "cuda" else [(1024, 768, 16)]
    if KEY_CASE in grid:  # first, so a time-limited run still reports it
        grid.remove(KEY_CASE)
        grid.insert(0, KEY_CASE)
    return grid


def build_methods(tokens, d, r, dtype, device):
    gen = torch.Generator().manual_seed(tokens * 7 + d * 3 + r)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rnd(tokens, d).requires_grad_()
    weight = rnd(d, d, scale=d ** -0.5)
    bias = rnd(d, scale=0.1)
    lora_a = rnd(r, d, scale=d ** -0.5).requires_grad_()
    lora_b = rnd(d, r, scale=r ** -0.5).requires_grad_()  # non-zero: time real work
    scaling = 2.0  # lora_alpha = 2 r
    grad_out = rnd(tokens, d)

    base = torch.nn.Linear(d, d, device=device, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
        base.bias.copy_(bias)
    base.requires_grad_(False)

    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLinear

    peft_base = torch.nn.Linear(d, d, device=device, dtype=dtype)
    with torch.no_grad():
        peft_base.weight.copy_(weight)
        peft_base.bias.copy_(bias)
    peft_layer = PeftLinear(peft_base, "default", config=LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0),
                            r=r, lora_alpha=2 * r).to(device=device, dtype=dtype)
    peft_layer.base_layer.requires_grad_(False)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(lora_a)
        peft_layer.lora_B["default"].weight.copy_(lora_b)
    peft_params = [x, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]

    lora_params = [x, lora_a, lora_b]
    F = torch.nn.functional
    methods = {
        "base": (lambda: base(x), [x]),
        "unfused": (lambda: F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_a), lora_b),
                    lora_params),
        "peft": (lambda: peft_layer(x), peft_params),
    }
    if device == "cuda":
        for path in lora_ops.CUDA_PATHS:
            methods[f"fused:{path}"] = (
                lambda path=path: lora_linear_triton(x, weight, lora_a, lora_b, scaling, bias, path=path),
                lora_params)
    methods["fused"] = (lambda: lora_linear(x, weight, lora_a, lora_b, scaling, bias), lora_params)
    return methods, grad_out


def timer(device):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu_median(fn, calls=3):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3

    return cpu_median


def bench_shape(tokens, d, r, dtype, device, measure, rounds=7):
    methods, grad_out = build_methods(tokens, d, r, dtype, device)
    with torch.no_grad():
        y_ref = methods["unfused"][0]()
        scale = y_ref.abs().max().item()
        errors = {name: (fn() - y_ref).abs().max().item() / scale
                  for name, (fn, _) in methods.items() if name.startswith("fused")}
    calls = {}
    for name, (fn, params) in methods.items():
        fwd_bwd = lambda fn=fn, params=params: torch.autograd.grad(fn(), params, grad_out)
        fwd_bwd()  # compiles and autotunes outside the measurement
        calls[("fwd", name)] = fn
        calls[("fwd+bwd", name)] = fwd_bwd
    # On CPU, other processes may share the cores: rounds that visit every method in turn spread
    # any slowdown over all of them, and the best round (the least disturbed) is reported.
    samples = {key: [] for key in calls}
    for _ in range(1 if device == "cuda" else rounds):
        for key, call in calls.items():
            samples[key].append(measure(call))
    rows = [dict(device=device, dtype=str(dtype).replace("torch.", ""), tokens=tokens, d=d, r=r, mode=mode,
                 method=name, ms=round(min(samples[(mode, name)]), 5))
            for (mode, name) in sorted(calls, key=lambda k: (k[0], list(methods).index(k[1])))]
    return rows, errors


def markdown(rows, errors_by_shape, device):
    default = "fused"
    extra = sorted({r["method"] for r in rows if r["method"].startswith("fused:")})
    cols = ["base", default, *extra, "unfused", "peft"]
    lines = []
    header = ["tokens", "d", "r", "mode"] + [f"{c} ms" for c in cols] + ["fused/base", "peft/fused", "unfused/fused"]
    header += [f"{c}/base" for c in extra]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    table = {}
    for row in rows:
        table.setdefault((row["tokens"], row["d"], row["r"], row["mode"]), {})[row["method"]] = row["ms"]
    for (tokens, d, r, mode), ms in table.items():
        cells = [str(tokens), str(d), str(r), mode] + [f"{ms[c]:.3f}" for c in cols]
        cells += [f"{ms[default] / ms['base']:.3f}", f"{ms['peft'] / ms[default]:.3f}",
                  f"{ms['unfused'] / ms[default]:.3f}"]
        cells += [f"{ms[c] / ms['base']:.3f}" for c in extra]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Max |fused - unfused| / max |unfused| of y per shape: " + "; ".join(
        f"{t}x{d} r{r}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        for (t, d, r), errs in errors_by_shape.items()))
    return "\n".join(lines)


def breakdown(tokens, d, r, dtype=torch.bfloat16):
    """Per-kernel times (ms) at one shape and the tile configs the autotuner picked: what the
    fused layer's time is made of, next to the cuBLAS GEMM it competes with."""
    import triton.testing

    measure = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    dev = "cuda"
    x = torch.randn(tokens, d, device=dev, dtype=dtype)
    w = torch.randn(d, d, device=dev, dtype=dtype) * d ** -0.5
    a = torch.randn(r, d, device=dev, dtype=dtype) * d ** -0.5
    b = torch.randn(d, r, device=dev, dtype=dtype) * r ** -0.5
    dy = torch.randn(tokens, d, device=dev, dtype=dtype)
    xa = x @ a.t()
    out = torch.empty(tokens, d, device=dev, dtype=dtype)
    dyb = torch.empty(tokens, r, device=dev, dtype=dtype)
    ops = lora_ops
    cases = {
        "cublas x@W.T": lambda: torch.mm(x, w.t()),
        "cublas dY@W": lambda: torch.mm(dy, w),
        "triton x@W.T (no LoRA)": lambda: ops._launch_matmul(x, w.t(), out),
        "triton dY@W (no LoRA)": lambda: ops._launch_matmul(dy, w, out),
        "fwd: row pass xa": lambda: ops._launch_rowpass(x, a, xa, r),
        "fwd: triton GEMM + s*xa@B.T epilogue": lambda: ops._launch_matmul(
            x, w.t(), out, rank=r, lora_mode=1, l=xa, lr=b.t(), scaling=2.0),
        "bwd: triton dX GEMM, dY@B in K loop (stored)": lambda: ops._launch_matmul(
            dy, w, out, rank=r, lora_mode=2, lb=b, lr=a, l=dyb, store_l=True, scaling=2.0),
        "bwd: triton dX GEMM, dY@B loaded": lambda: ops._launch_matmul(
            dy, w, out, rank=r, lora_mode=1, l=dyb, lr=a, scaling=2.0),
        "bwd: row pass dY@B": lambda: ops._launch_rowpass(dy, b.t(), dyb, r),
        "bwd: column pass dB + dbias": lambda: ops._launch_colpass(dy, r, other=xa, want_colsum=True, scaling=2.0),
        "bwd: column pass dA": lambda: ops._launch_colpass(x, r, other=dyb, scaling=2.0),
        "cublas path: low-rank epilogue kernel (K=0)": lambda: ops._launch_matmul(
            x[:, :0], w.t()[:0], out, rank=r, lora_mode=1, l=xa, lr=b.t(), scaling=2.0),
        "cublas path: addmm_ beta=1": lambda: out.addmm_(x, w.t()),
    }
    results = {}
    for name, fn in cases.items():
        fn()
        results[name] = measure(fn)
        print(f"  {name:55s} {results[name]:.4f} ms", flush=True)
    for name, tuner in (("matmul", ops._matmul_hopper), ("matmul", ops._matmul_default), ("rowpass", ops._rowpass_tuned),
                        ("colpass", ops._colpass_tuned)):
        for key, cfg in tuner.cache.items():
            print(f"  best {name} {key[:8]}: {cfg}", flush=True)
    return results


def profile(tokens, d, r, dtype=torch.bfloat16, iters=10):
    """Device time per kernel (torch.profiler) of forward+backward for each method, and the host
    time one call takes to enqueue its work: tells slow kernels from launch overhead."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    methods, grad_out = build_methods(tokens, d, r, dtype, "cuda")
    lines = []
    for name in ["base", *[m for m in methods if m.startswith("fused:")], "peft"]:
        fn, params = methods[name]
        call = lambda: torch.autograd.grad(fn(), params, grad_out)
        call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        host_us = (time.perf_counter() - t0) / iters * 1e6
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                call()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events) / iters
        lines.append(f"{name}: device {total:.0f} us per fwd+bwd, host enqueue {host_us:.0f} us per call")
        for e in events[:8]:
            lines.append(f"    {e.self_device_time_total / iters:8.1f} us  x{e.count // iters}  {e.key[:90]}")
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench", help="folder for lora_<device>.csv and .md")
    parser.add_argument("--quick", action="store_true", help="key case only")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: per-kernel device times of fwd+bwd at the key case (profile.txt)")
    parser.add_argument("--breakdown", action="store_true",
                        help="CUDA: also time each kernel alone at the key case (written to breakdown.csv)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    import triton

    print(f"# bench_lora {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC} | {machine} | "
          f"torch {torch.__version__} | triton {triton.__version__} | {dtype} | "
          f"default CUDA path {lora_ops.DEFAULT_CUDA_PATH}", flush=True)
    rows, errors = [], {}
    csv_path = out / f"lora_{args.device}.csv"
    for tokens, d, r in shapes(args.device, args.quick):
        t0 = time.time()
        shape_rows, errors[(tokens, d, r)] = bench_shape(tokens, d, r, dtype, args.device, timer(args.device))
        rows += shape_rows
        by = {(x["mode"], x["method"]): x["ms"] for x in shape_rows}
        summary = "  ".join(f"{mode}: " + " ".join(f"{m}={by[(mode, m)]:.3f}" for m in
                                                     [k for (md, k) in by if md == mode])
                            for mode in ("fwd", "fwd+bwd"))
        print(f"tokens={tokens} d={d} r={r} ({time.time() - t0:.0f}s) {summary} "
              f"| fused/base fwd+bwd {by[('fwd+bwd', 'fused')] / by[('fwd+bwd', 'base')]:.3f} "
              f"peft/fused {by[('fwd+bwd', 'peft')] / by[('fwd+bwd', 'fused')]:.3f} "
              f"| err {errors[(tokens, d, r)]}", flush=True)
        # Rewrite after every shape: a time-limited run keeps what it measured.
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        (out / f"lora_{args.device}.md").write_text(markdown(rows, errors, args.device) + "\n")
        if (tokens, d, r) == KEY_CASE and args.device == "cuda":
            # Right after the key case, so a time-limited run still reports them.
            if args.profile:
                print(f"\nprofile of fwd+bwd at tokens={KEY_CASE[0]} d={KEY_CASE[1]} r={KEY_CASE[2]}:")
                (out / "profile.txt").write_text("\n".join(profile(*KEY_CASE)) + "\n")
            if args.breakdown:
                print(f"\nper-kernel breakdown at tokens={KEY_CASE[0]} d={KEY_CASE[1]} r={KEY_CASE[2]}:")
                parts = breakdown(*KEY_CASE)
                with open(out / "breakdown.csv", "w", newline="") as f:
                    f.write("kernel,ms\n" + "".join(f"{k},{v:.5f}\n" for k, v in parts.items()))
    print()
    print(markdown(rows, errors, args.device))


if __name__ == "__main__":
    main()
