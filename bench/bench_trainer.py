"""Server throughput of split learning: all clients' activations in one batch vs one pass per client.

    python -m bench.bench_trainer --device cpu --out runs/bench            # small GPT-2 shape, fp32
    python -m bench.bench_trainer --device cuda --out runs/bench           # GPT-2 medium shape, bf16

What is timed: one server step of SplitLoRA on the server segment of a GPT-2-shaped model cut
after block 3 (layers 3..L-1, final norm, LM head, fused LoRA r=4 on c_attn, base frozen):
forward, cross-entropy loss, backward to the cut activations and the adapters, for N clients
that each sent a batch of B sequences of T tokens.
  batched     the server concatenates the N clients' activations and runs one forward/backward
              (what splitlora's server does)
  per-client  one forward/backward per client, one after another (what a server that handles
              clients separately would do)
Reports server tokens per second for N in {1, 4, 8}, the speed-up of batching, and the model
flops utilization (MFU) of the server segment on a GPU: counted training flops (2 x forward
flops: the frozen base needs input gradients only, see splitlora.timemodel) per second over the
GPU's dense bf16 peak. Times: median of --repeats timed steps after 2 warm-up steps (GPU: CUDA
synchronised). Writes trainer_<device>.csv and trainer_<device>.md.
"""
import argparse
import csv
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from splitlora.adapters import LoraSpec, add_lora
from splitlora.models import load_causal_lm
from splitlora.split import split_model
from splitlora.strategies.base import causal_lm_loss
from splitlora.timemodel import forward_flops, train_flops

# Dense bf16 tensor-core peak (TFLOPS, without sparsity) by device-name fragment.
GPU_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}

SHAPES = {
    # GPT-2 medium: the SplitLoRA paper's model.
    "cuda": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, seq_len=128, batch=8),
    # A small GPT-2 shape that a 2-core CPU steps through in about a second.
    "cpu": dict(n_layer=6, n_embd=256, n_head=4, vocab_size=8192, seq_len=64, batch=4),
}


def peak_tflops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


def build_server(shape, device, dtype, cut=3):
    config = dict(model_type="gpt2", n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                  n_positions=max(1024, shape["seq_len"]), vocab_size=shape["vocab_size"],
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh")
    model, _ = load_causal_lm(config=config, dtype=dtype, seed=0)
    _, server = split_model(model, cut)
    add_lora(server, ["c_attn"], LoraSpec(r=4, alpha=8.0), seed=0)
    return server.to(device).train(), cut


def time_steps(fns, device, repeats):
    """Median seconds of each function; rounds alternate between them, so a busy spell on a
    shared machine lands on every method rather than on one."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns:
        for _ in range(2):
            fn()
    sync()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SHAPES[device.type]
    server, cut = build_server(shape, device, dtype)
    b, t, h = shape["batch"], shape["seq_len"], shape["n_embd"]
    peak = peak_tflops(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [p for p in server.parameters() if p.requires_grad]

    def step(chunks):
        for hidden, labels in chunks:
            hidden = hidden.detach().requires_grad_(True)
            loss = causal_lm_loss(server(hidden), labels)
            loss.backward()
        for p in params:
            p.grad = None

    rows = []
    for n in [int(x) for x in args.clients.split(",")]:
        hidden = [torch.randn(b, t, h, generator=gen).to(device, dtype) for _ in range(n)]
        labels = [torch.randint(0, shape["vocab_size"], (b, t), generator=gen).to(device) for _ in range(n)]
        batched = [(torch.cat(hidden), torch.cat(labels))]
        separate = list(zip(hidden, labels))
        tokens = n * b * t
        flops = train_flops(forward_flops(server, n * b, t, shape["n_layer"] - cut, h))
        modes = (("batched", batched), ("per-client", separate))
        seconds_each = time_steps([lambda c=c: step(c) for _, c in modes], device, args.repeats)
        for (mode, _), seconds in zip(modes, seconds_each):
            achieved = flops / seconds / 1e12
            rows.append(dict(device=device.type, clients=n, mode=mode, tokens=tokens, ms=seconds * 1e3,
                             tokens_per_s=tokens / seconds, tflops=achieved,
                             mfu=(achieved / peak) if peak else None))
            print(f"N={n:<2} {mode:<10} {seconds * 1e3:9.2f} ms  {tokens / seconds:12,.0f} tok/s  "
                  f"{achieved:8.3f} TFLOPS" + (f"  MFU {achieved / peak:.1%}" if peak else ""), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"trainer_{device.type}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"Server step (forward + backward) of a GPT-2 shape, layers {cut}..{shape['n_layer'] - 1} + head, "
        f"d={h}, vocab {shape['vocab_size']}, {b} x {t} tokens per client, {dtype}, LoRA r=4 on c_attn; "
        f"{name}, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| clients | batched ms | per-client ms | batched tok/s | per-client tok/s | batching speed-up | "
        "batched TFLOPS | batched MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["clients"] for r in rows}):
        bt = next(r for r in rows if r["clients"] == n and r["mode"] == "batched")
        pc = next(r for r in rows if r["clients"] == n and r["mode"] == "per-client")
        mfu = f"{bt['mfu']:.1%}" if bt["mfu"] is not None else "-"
        lines.append(f"| {n} | {bt['ms']:.2f} | {pc['ms']:.2f} | {bt['tokens_per_s']:,.0f} | {pc['tokens_per_s']:,.0f} | "
                     f"{pc['ms'] / bt['ms']:.2f}x | {bt['tflops']:.3f} | {mfu} |")
    (out / f"trainer_{device.type}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
