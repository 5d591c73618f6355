"""A PEFT LoRA training step three ways: plain PEFT, `patch_peft`, and torch.compile of the patched model.

    python -m bench.bench_peft_patch                        # 1 and 2 torch threads, inductor
    python -m bench.bench_peft_patch --threads 1 --repeats 10 --backend aot_eager --json out.json
    python -m bench.bench_peft_patch --device cuda --dtype bfloat16 --layers 2 --hidden 4096 \
        --intermediate 11008 --heads 32 --vocab 32000 --batch 4 --seq 512 --threads 1   # Llama-7B layers, GPU

What is timed: one training step of a Llama-shaped causal LM with random weights (LlamaConfig, no
model hub) wrapped by `peft.get_peft_model` (LoRA on q, k, v, o, gate, up, down; base frozen):
zero_grad, forward with labels (the model's cross-entropy loss), backward, AdamW step. Three copies
of the same model (the same base weights and the same random non-zero adapters, lora_dropout 0):

    A  plain PEFT (peft.tuners.lora.Linear's own forward)
    B  the same model after `splitlora_kernels.patch_peft(model)` (the fused `lora_linear` op; on a
       CPU its plain-torch reference)
    C  a third copy, patched, then `torch.compile(model, backend=--backend)` (the op as the
       torch.library custom ops splitlora::lora_linear_fwd / lora_linear_bwd)

Before timing, each copy runs forward + backward on the same batch without an optimizer step and the
script checks that B's and C's losses equal A's within 1e-4 relative (and prints the largest LoRA
gradient difference); it exits with status 1 otherwise. C's first call there is the compile, whose
time is reported separately (that call's time less C's median step). Then --warmup untimed and
--repeats timed steps per copy, interleaved A B C A B C ..., each copy with its own AdamW; the
median per copy and the ratios B/A and C/A (time per step: below 1 is faster than plain PEFT).
For each thread count in --threads (torch.set_num_threads) the copies are rebuilt and C recompiled.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.bench_codec import cpu_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_peft(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 64), bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                      target_modules=TARGETS)
    model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(1)  # B non-zero: the adapters change the loss
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.train()
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(model, opt, ids):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        return loss

    return step


def check_pass(model, ids):
    """forward + backward without an optimizer step: (loss, {lora param name: grad}, seconds)."""
    model.zero_grad(set_to_none=True)
    _sync(ids.device.type)
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    _sync(ids.device.type)
    dt = time.perf_counter() - t0
    grads = {n.replace("_orig_mod.", ""): p.grad.detach().clone()
             for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, dt


def run_threads(args, threads: int) -> dict:
    from splitlora_kernels import patch_peft

    torch.set_num_threads(threads)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    # The fused op and PEFT sum in other orders: float32 agrees to 1e-4 relative, 16-bit to 1e-2.
    tolerance = 1e-4 if args.dtype == "float32" else 1e-2

    model_a = build_peft(args)
    model_b = copy.deepcopy(model_a)
    model_c = copy.deepcopy(model_a)
    report = patch_peft(model_b, verbose=False)
    patch_peft(model_c, verbose=False)
    n_lora = len(report.patched)
    if report.skipped:
        raise SystemExit(f"patch_peft left layers on PEFT's path: {report.skipped}")
    compiled = torch.compile(model_c, backend=args.backend)

    # Correctness before timing: the same batch, no optimizer step.
    loss_a, grads_a, _ = check_pass(model_a, ids)
    loss_b, grads_b, _ = check_pass(model_b, ids)
    loss_c, grads_c, first_c = check_pass(compiled, ids)
    check = {}
    ok = True
    for tag, loss, grads in (("B", loss_b, grads_b), ("C", loss_c, grads_c)):
        diff = abs(loss - loss_a)
        rel = diff / abs(loss_a)
        gdiff = max((grads[n] - g).abs().max().item() for n, g in grads_a.items()) if grads.keys() == grads_a.keys() else float("inf")
        check[tag] = dict(loss=loss, loss_abs_diff=diff, loss_rel_diff=rel, lora_grad_max_abs_diff=gdiff)
        print(f"  [{threads} thr] check {tag}: loss {loss:.6f} vs A {loss_a:.6f}: max abs diff {diff:.3e} "
              f"(rel {rel:.3e}); LoRA grads max abs diff {gdiff:.3e}", flush=True)
        if not rel <= tolerance:
            ok = False
    if not ok:
        print(f"FAIL: a patched loss differs from plain PEFT's by more than {tolerance} relative", file=sys.stderr)
        sys.exit(1)

    steps = {}
    for tag, model in (("A", model_a), ("B", model_b), ("C", compiled)):
        params = [p for p in model.parameters() if p.requires_grad]
        steps[tag] = make_step(model, torch.optim.AdamW(params, lr=1e-4), ids)
    times = {t: [] for t in steps}
    for i in range(args.warmup + args.repeats):
        for tag, step in steps.items():
            _sync(args.device)
            t0 = time.perf_counter()
            step()
            _sync(args.device)
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[tag].append(dt)
    med = {t: statistics.median(v) for t, v in times.items()}
    res = dict(threads=threads, lora_layers=n_lora, loss_A=loss_a, check=check,
               compile_s=first_c - med["C"], first_compiled_call_s=first_c,
               median_s=med, min_s={t: min(v) for t, v in times.items()},
               max_s={t: max(v) for t, v in times.items()}, times_s=times,
               ratio_B_over_A=med["B"] / med["A"], ratio_C_over_A=med["C"] / med["A"])
    print(f"  [{threads} thr] median s/step: A {med['A']:.4f}  B {med['B']:.4f}  C {med['C']:.4f}   "
          f"B/A {res['ratio_B_over_A']:.3f}  C/A {res['ratio_C_over_A']:.3f}   "
          f"(C compile {res['compile_s']:.1f} s, {args.backend})", flush=True)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda (the fused op's Triton kernels)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the base model's dtype (PEFT keeps its adapters in float32)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts, each a separate measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--backend", default="inductor", help="torch.compile backend for C (inductor, aot_eager)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    import peft
    import transformers

    shape = (f"Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, "
             f"{args.heads} heads, vocab {args.vocab}, batch {args.batch} x {args.seq} tokens, "
             f"LoRA r {args.rank} on {','.join(TARGETS)}, {args.dtype} base")
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"CPU {cpu_model()}, {torch.get_num_threads()} threads available")
    print(f"{shape}\n{where}; torch {torch.__version__}, "
          f"peft {peft.__version__}, transformers {transformers.__version__}; backend {args.backend}; "
          f"warmup {args.warmup}, repeats {args.repeats}", flush=True)
    results = [run_threads(args, int(t)) for t in args.threads.split(",")]

    print("\n| threads | A plain PEFT | B patch_peft | C compiled | B/A | C/A | C compile |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_s"]
        print(f"| {r['threads']} | {m['A']:.3f} s | {m['B']:.3f} s | {m['C']:.3f} s | {r['ratio_B_over_A']:.3f} | "
              f"{r['ratio_C_over_A']:.3f} | {r['compile_s']:.1f} s ({args.backend}) |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(), shape=shape, args=vars(args),
            cpu=cpu_model(), torch=torch.__version__, peft=peft.__version__, transformers=transformers.__version__,
            results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
