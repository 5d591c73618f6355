"""Same-run before/after of the fused LoRA layer: a previous lora_linear.py (its "cublas" path)
against the current lora_linear and FusedLoRALinear, with the base layer and PEFT alongside, as
forward+backward do_bench medians (ms) and host enqueue time (us: best of 5 bursts of 10 calls,
each burst starting with an idle GPU). CUDA only.

    git show ca8a753:splitlora_kernels/ops/lora_linear.py > /tmp/lora_linear_before.py
    PYTHONPATH=$PWD python bench/lora_before_after.py /tmp/lora_linear_before.py
"""
import importlib
import importlib.util
import sys
import time

import torch
import triton.testing

import bench.bench_lora as bl


def load_before(path):
    # Loaded as a sibling of the current module, so its relative imports (.reference) resolve.
    spec = importlib.util.spec_from_file_location("splitlora_kernels.ops._before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(path, shapes=((8192, 4096, 16), (2048, 768, 16), (2048, 4096, 16))):
    before = load_before(path)
    now = importlib.import_module("splitlora_kernels.ops.lora_linear")
    for tokens, d, r in shapes:
        methods, grad_out = bl.build_methods(tokens, d, r, torch.bfloat16, "cuda", paths=["cublas"])
        lora_params = methods["fused"][1]
        x = lora_params[0]
        fn = methods["fused"][0]  # the "fused" method's own tensors, read from its closure
        cells = {k: c.cell_contents for k, c in zip(fn.__code__.co_freevars, fn.__closure__)}
        w, a, b, bias, s = cells["weight"], cells["lora_a"], cells["lora_b"], cells["bias"], cells["scaling"]
        calls = {
            "base": methods["base"],
            "before:cublas": (lambda: before.lora_linear_triton(x, w, a, b, s, bias, path="cublas"), lora_params),
            "now:default": (lambda: now.lora_linear(x, w, a, b, s, bias), lora_params),
            "now:layer": methods["layer"],
            "peft": methods["peft"],
        }
        out = []
        for name, (f, params) in calls.items():
            call = lambda f=f, params=params: torch.autograd.grad(f(), params, grad_out)
            call()
            call()
            ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
            host = float("inf")
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(10):
                    call()
                host = min(host, (time.perf_counter() - t0) / 10 * 1e6)
            torch.cuda.synchronize()
            out.append(f"{name} {ms:.3f} ms / host {host:.0f} us")
        print(f"{tokens}x{d} r{r} fwd+bwd: " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
