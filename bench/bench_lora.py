"""Fused LoRA linear vs PEFT, unfused torch and the bare base layer.

    python -m bench.bench_lora --device cuda --out runs/bench          # full sweep, bf16
    python -m bench.bench_lora --device cuda --quick                    # key case only
    python -m bench.bench_lora --device cuda --shapes 8192x4096x16,2048x768x16 --profile
    python -m bench.bench_lora --device cpu --out runs/bench            # CPU: reference vs PEFT, fp32

Times forward (training mode, autograd recording) and forward+backward with a frozen base weight
and bias, gradients taken for x, lora_a and lora_b with torch.autograd.grad (so no .grad
accumulation is timed). Methods:
  base       nn.Linear alone (cuBLAS), the floor any LoRA layer is measured against
  fused      splitlora_kernels.lora_linear (on CUDA its default path; on CPU the reference)
  fused:<p>  lora_linear_triton(path=<p>) for each CUDA path ("triton", "triton-pre", "cublas", "torch")
  layer      FusedLoRALinear (the drop-in module around lora_linear), to compare with peft
  unfused    x @ W.T + b + s * (x @ A.T) @ B.T in plain torch ops
  peft       peft.tuners.lora.Linear wrapping the same nn.Linear (dropout 0)
GPU times are triton.testing.do_bench medians (it flushes L2 between runs, so inputs need no
rotation); CPU times are the best of 7 round-robin rounds (every method in turn) of the median
of 3 timed calls, which keeps other processes on the cores from landing on one method. Each shape also checks the
fused output against unfused torch (max error relative to max |y|).
Writes lora_<device>.csv (one row per measurement) and lora_<device>.md (tables with ratios).
--profile (CUDA) adds, per shape, the GPU time of each method's kernels (torch.profiler) and the
host time one call takes to enqueue them (profile.txt); --cprofile the Python functions that
take the fused layer's host time at one shape (cprofile.txt); --launch-overhead the host
cost of one kernel launch by each mechanism (launch.txt).
"""
import argparse
import importlib
import csv
import datetime
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


def build_methods(tokens, d, r, dtype, device, paths=None):
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
        for path in (paths or lora_ops.CUDA_PATHS):
            methods[f"fused:{path}"] = (
                lambda path=path: lora_linear_triton(x, weight, lora_a, lora_b, scaling, bias, path=path),
                lora_params)
    methods["fused"] = (lambda: lora_linear(x, weight, lora_a, lora_b, scaling, bias), lora_params)
    from splitlora_kernels import FusedLoRALinear

    layer_base = torch.nn.Linear(d, d, device=device, dtype=dtype)
    with torch.no_grad():
        layer_base.weight.copy_(weight)
        layer_base.bias.copy_(bias)
    layer = FusedLoRALinear.from_linear(layer_base, r, 2 * r)
    with torch.no_grad():
        layer.lora_A.copy_(lora_a)
        layer.lora_B.copy_(lora_b)
    methods["layer"] = (lambda: layer(x), [x, layer.lora_A, layer.lora_B])
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


def bench_shape(tokens, d, r, dtype, device, measure, rounds=7, paths=None):
    methods, grad_out = build_methods(tokens, d, r, dtype, device, paths)
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
    cols = ["base", default, *extra, "layer", "unfused", "peft"]
    lines = []
    header = ["tokens", "d", "r", "mode"] + [f"{c} ms" for c in cols] + ["fused/base", "peft/fused", "unfused/fused",
                                                                          "peft/layer"]
    header += [f"{c}/base" for c in extra]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    table = {}
    for row in rows:
        table.setdefault((row["tokens"], row["d"], row["r"], row["mode"]), {})[row["method"]] = row["ms"]
    for (tokens, d, r, mode), ms in table.items():
        cells = [str(tokens), str(d), str(r), mode] + [f"{ms[c]:.3f}" for c in cols]
        cells += [f"{ms[default] / ms['base']:.3f}", f"{ms['peft'] / ms[default]:.3f}",
                  f"{ms['unfused'] / ms[default]:.3f}", f"{ms['peft'] / ms['layer']:.3f}"]
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
    bias = torch.randn(d, device=dev, dtype=dtype)
    dy = torch.randn(tokens, d, device=dev, dtype=dtype)
    xa = x @ a.t()
    out = torch.empty(tokens, d, device=dev, dtype=dtype)
    dyb = torch.empty(tokens, r, device=dev, dtype=dtype)
    ops = lora_ops
    colpass = dict(need_a=True, need_b=True, need_bias=True, scaling=2.0, p=0.0, seed=0, bias_dtype=dtype)

    def merged(fn):
        saved, ops._MERGED_ROWPASS_MAX = ops._MERGED_ROWPASS_MAX, float("inf")
        try:
            return fn()
        finally:
            ops._MERGED_ROWPASS_MAX = saved

    cases = {
        "cublas x@W.T": lambda: torch.mm(x, w.t()),
        "cublas dY@W": lambda: torch.mm(dy, w),
        "cublas addmm_ beta=1 (fused path's base GEMM)": lambda: out.addmm_(x, w.t()),
        "fwd: row pass xa + low-rank term of y (as dispatched)": lambda: ops._launch_rowpass(
            x, a, xa, r, out=out, up=b.t(), bias=bias, scaling=2.0),
        "fwd: row pass xa + low-rank term of y (merged, one launch)": lambda: merged(lambda: ops._launch_rowpass(
            x, a, xa, r, out=out, up=b.t(), bias=bias, scaling=2.0)),
        "fwd: row pass xa alone": lambda: ops._launch_rowpass(x, a, xa, r),
        "bwd: row pass dY@B + low-rank term of dX (as dispatched)": lambda: ops._launch_rowpass(
            dy, b.t(), dyb, r, out=out, up=a, scaling=2.0, out_dropout=True),
        "bwd: column pass dA + dB + dbias (+ finishing launch when split)": lambda: ops._launch_colpass(
            x, dyb, dy, xa, r, **colpass),
        "triton x@W.T (no LoRA)": lambda: ops._launch_matmul(x, w.t(), out),
        "triton dX GEMM, dY@B in K loop (stored)": lambda: ops._launch_matmul(
            dy, w, out, rank=r, lora_mode=2, lb=b, lr=a, l=dyb, store_l=True, scaling=2.0),
    }
    results = {}
    for name, fn in cases.items():
        fn()
        results[name] = measure(fn)
        print(f"  {name:58s} {results[name]:.4f} ms", flush=True)
    for key, meta in ops._TUNED.items():
        print(f"  tile config {key[0]} flags {key[2]} ints {key[3][:4]}: {meta}", flush=True)
    return results


def launch_overhead(n=2000, device="cuda"):
    """Host microseconds per launch of one small kernel by each mechanism, and of a few torch ops
    for scale: what a call of the fused layer pays per step on this machine's CPU."""
    dev = device
    x = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
    a = torch.randn(16, 64, device=dev, dtype=torch.bfloat16)
    xa = torch.empty(64, 16, device=dev, dtype=torch.bfloat16)
    w = torch.randn(64, 64, device=dev, dtype=torch.bfloat16)
    y = torch.empty(64, 64, device=dev, dtype=torch.bfloat16)
    ops = lora_ops
    meta = dict(ops._FIXED_META["rowpass"])
    # The row pass alone (xa = x @ a.T), every argument by name.
    kwargs = dict(in_ptr=x, proj_ptr=a, l_ptr=xa, out_ptr=x, up_ptr=x, bias_ptr=x, seed=0, p_drop=0.0,
                  drop_scale=1.0, scaling=1.0, M=64, K=64, N=0, R=16, stride_im=64, stride_ik=1, stride_pr=64,
                  stride_pk=1, stride_lm=16, stride_lr=1, stride_om=0, stride_on=0, stride_ur=0, stride_un=0,
                  stride_bias=0, IN_DROPOUT=False, LOAD_L=False, STORE_L=True, EPILOGUE=False, OUT_DROPOUT=False,
                  HAS_BIAS=False, R_PAD=16, UPCAST=ops._INTERPRETED, PRECISION="tf32")
    grid = (-(-64 // meta["BLOCK_M"]),)
    cases = {
        "torch.empty": lambda: torch.empty((64, 16), device=dev, dtype=torch.bfloat16),
        "torch addmm_ (cuBLAS)": lambda: y.addmm_(x, w.t()),
        "triton JITFunction.run (fn[grid](...))": lambda: ops._lora_rowpass_kernel[grid](**kwargs, **meta),
        "splitlora _launch (cached compiled kernel)": lambda: ops._launch_rowpass(x, a, xa, 16),
    }
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    lines = []
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        sync()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                fn()
            best = min(best, (time.perf_counter() - t0) / (n // 5) * 1e6)
            sync()
        lines.append(f"{name:45s} {best:7.2f} us per call (host)")
    print("\n".join(lines), flush=True)
    return lines


def cprofile_fused(tokens, d, r, dtype=torch.bfloat16, iters=200, top=25):
    """Where the fused layer's host time goes: cProfile of fwd+bwd (default path), by own time."""
    import cProfile
    import io
    import pstats

    methods, grad_out = build_methods(tokens, d, r, dtype, "cuda", paths=["cublas"])
    buf = io.StringIO()
    for name in ("fused", "layer"):
        fn, params = methods[name]
        call = lambda: torch.autograd.grad(fn(), params, grad_out)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(iters):
            call()
        prof.disable()
        wall = (time.perf_counter() - t0) / iters * 1e6
        torch.cuda.synchronize()
        buf.write(f"== {name} at {tokens}x{d} r{r}: {wall:.0f} us per fwd+bwd under cProfile\n")
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def profile(tokens, d, r, dtype=torch.bfloat16, iters=10, paths=None):
    """Device time per kernel (torch.profiler) of forward+backward for each method, and the host
    time one call takes to enqueue its work: tells slow kernels from launch overhead."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    methods, grad_out = build_methods(tokens, d, r, dtype, "cuda", paths)
    lines = []
    for name in ["base", "fused", *[m for m in methods if m.startswith("fused:")], "layer", "unfused", "peft"]:
        fn, params = methods[name]
        call = lambda: torch.autograd.grad(fn(), params, grad_out)
        call()
        # Host time to enqueue: best of 5 bursts of `iters` calls, each burst starting with an idle
        # GPU (the VM's CPU is noisy; the best burst is the least disturbed one).
        host_us = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            host_us = min(host_us, (time.perf_counter() - t0) / iters * 1e6)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                call()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
        events.sort(key=lambda e: -e.self_device_time_total)
        total = sum(e.self_device_time_total for e in events) / iters
        lines.append(f"{tokens}x{d} r{r} {name}: device {total:.0f} us per fwd+bwd, "
                     f"host enqueue {host_us:.0f} us per call")
        for e in events[:8]:
            lines.append(f"    {e.self_device_time_total / iters:8.1f} us  x{e.count // iters}  {e.key[:90]}")
    print("\n".join(lines), flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="runs/bench", help="folder for lora_<device>.csv and .md")
    parser.add_argument("--quick", action="store_true", help="key case only")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated TOKENSxDxR list to run instead of the sweep, "
                             "e.g. 8192x4096x16,2048x768x16")
    parser.add_argument("--paths", default=None,
                        help="CUDA: comma-separated subset of the fused:<path> methods (default: all CUDA_PATHS)")
    parser.add_argument("--profile", action="store_true",
                        help="CUDA: per shape, GPU time of fwd+bwd and host enqueue time per method (profile.txt)")
    parser.add_argument("--cprofile", nargs="?", const="first", default=None, metavar="TOKENSxDxR",
                        help="CUDA: cProfile of the fused layer's fwd+bwd at this shape (default: the first one) "
                             "(cprofile.txt)")
    parser.add_argument("--launch-overhead", action="store_true",
                        help="CUDA: host time of one kernel launch by each mechanism (launch.txt)")
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
    if args.device == "cuda" and args.launch_overhead:
        print("\nhost time per launch:")
        (out / "launch.txt").write_text("\n".join(launch_overhead()) + "\n")
    grid = shapes(args.device, args.quick)
    if args.shapes:
        grid = [tuple(int(v) for v in item.split("x")) for item in args.shapes.split(",")]
    profile_lines = []
    paths = args.paths.split(",") if args.paths else None
    for tokens, d, r in grid:
        t0 = time.time()
        shape_rows, errors[(tokens, d, r)] = bench_shape(tokens, d, r, dtype, args.device, timer(args.device),
                                                         paths=paths)
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
        if args.device == "cuda" and args.profile:
            print(f"\nprofile of fwd+bwd at tokens={tokens} d={d} r={r}:")
            profile_lines += profile(tokens, d, r, paths=paths) + [""]
            (out / "profile.txt").write_text("\n".join(profile_lines) + "\n")
        cprofile_at = grid[0] if args.cprofile == "first" else (
            tuple(int(v) for v in args.cprofile.split("x")) if args.cprofile else None)
        if args.device == "cuda" and (tokens, d, r) == cprofile_at:
            text = cprofile_fused(tokens, d, r)
            (out / "cprofile.txt").write_text(text)
            print("\n".join(text.splitlines()[:40]), flush=True)
        if (tokens, d, r) == KEY_CASE and args.device == "cuda":
            # Right after the key case, so a time-limited run still reports it.
            if args.breakdown:
                print(f"\nper-kernel breakdown at tokens={KEY_CASE[0]} d={KEY_CASE[1]} r={KEY_CASE[2]}:")
                parts = breakdown(*KEY_CASE)
                with open(out / "breakdown.csv", "w", newline="") as f:
                    f.write("kernel,ms\n" + "".join(f"{k},{v:.5f}\n" for k, v in parts.items()))
    print()
    print(markdown(rows, errors, args.device))


if __name__ == "__main__":
    main()
