"""Server throughput of split learning: all clients' activations in one batch vs one pass per client,
with the fused LoRA layers vs PEFT's, and the server segment's model flops utilization (MFU).

    python -m bench.bench_trainer --device cpu --out runs/bench                    # small GPT-2 shape, fp32
    python -m bench.bench_trainer --device cuda --out runs/bench                   # GPT-2 medium shape, bf16
    python -m bench.bench_trainer --device cuda --model llama-7b --out runs/bench  # Llama-7B shape, bf16

What is timed: one server step of SplitLoRA on the server segment of a decoder cut after block
`cut` (layers cut..L-1, final norm, LM head, LoRA on the attention projections, base frozen):
forward, cross-entropy loss, backward to the cut activations and the adapters, for N clients
that each sent a batch of B sequences of T tokens.
  batched     the server concatenates the N clients' activations and runs one forward/backward
              (what splitlora's server does)
  per-client  one forward/backward per client, one after another (what a server that handles
              clients separately would do)
each with the server's LoRA layers as this package's FusedLoRALinear ("fused", Triton kernels on a
GPU) and as PEFT's lora.Linear ("peft", injected with peft.inject_adapter_in_model on the same base
weights, the same adapter values: the script checks that both give the same loss before timing).
"fused batched" is what splitlora's server runs; "peft per-client" is the usual baseline.

Models (--model; MODELS below): gpt2-medium (the SplitLoRA paper's model; default on a GPU),
llama-7b (Llama-2-7B's shape: 32 layers, d 4096, MLP 11008, vocab 32000; random weights built
directly on the device, about 13 GB in bf16 per server copy), gpt2-small-cpu (default on a CPU) and
llama-tiny (the Llama code path at a size a CPU test runs). Reports server tokens per second per N,
the speed-up of batching, of the fused layers and of both together, and the MFU on a GPU: counted
training flops (2 x forward flops: the frozen base needs input gradients only, see
splitlora.timemodel) per second over the GPU's dense bf16 peak. Times: median of --repeats timed
steps after 2 warm-up steps (GPU: CUDA synchronised). Writes trainer_<device>[_<model>].csv and .md
(the default model of the device keeps the short name).
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

# Each model: its transformers config, the cut, the LoRA targets, per-client batch B x T and the
# client counts N timed by default.
MODELS = {
    # GPT-2 medium: the SplitLoRA paper's model.
    "gpt2-medium": dict(config=dict(model_type="gpt2", n_layer=24, n_embd=1024, n_head=16, vocab_size=50257),
                        cut=3, targets=["c_attn"], seq_len=128, batch=8, clients="1,4,8"),
    # A small GPT-2 shape that a 2-core CPU steps through in about a second.
    "gpt2-small-cpu": dict(config=dict(model_type="gpt2", n_layer=6, n_embd=256, n_head=4, vocab_size=8192),
                           cut=3, targets=["c_attn"], seq_len=64, batch=4, clients="1,4,8"),
    # Llama-2-7B's shape, cut after block 2: the server holds 30 of 32 layers. 2 x 512 tokens per
    # client, so N=4 is 4,096 tokens per step (about 20 GB of saved activations in bf16).
    "llama-7b": dict(config=dict(model_type="llama", num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096),
                     cut=2, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seq_len=512, batch=2, clients="1,4"),
    # The Llama code path at a size a CPU test runs in seconds.
    "llama-tiny": dict(config=dict(model_type="llama", num_hidden_layers=3, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                                   max_position_embeddings=128),
                       cut=1, targets=["q_proj", "k_proj", "v_proj", "o_proj"], seq_len=16, batch=2, clients="1,2"),
}
DEFAULT_MODEL = {"cuda": "gpt2-medium", "cpu": "gpt2-small-cpu"}


def model_dims(spec):
    """(decoder layers, hidden size, vocab size) of a MODELS entry, whatever the config's key names."""
    c = spec["config"]
    if c["model_type"] == "gpt2":
        return c["n_layer"], c["n_embd"], c["vocab_size"]
    return c["num_hidden_layers"], c["hidden_size"], c["vocab_size"]


def peak_tflops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)


RANK, ALPHA = 4, 8.0


def build_server(spec, device, dtype, layers="fused"):
    """The server segment with LoRA on spec["targets"]: FusedLoRALinear ("fused") or PEFT's
    ("peft"). Both are built from the same seed on the same device, so their base weights are equal.
    The model is created on `device` directly: a 7B model's random init on a CPU in fp32 would take
    minutes and 27 GB of host memory."""
    config = dict(spec["config"])
    if config["model_type"] == "gpt2":
        config.update(n_positions=max(1024, spec["seq_len"]), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      activation_function="gelu_pytorch_tanh")
    with torch.device(device):
        model, _ = load_causal_lm(config=config, dtype=dtype, seed=0)
    _, server = split_model(model, spec["cut"])
    del model  # split_model deep-copies: keep only the server's copy
    if layers == "fused":
        add_lora(server, spec["targets"], LoraSpec(r=RANK, alpha=ALPHA), seed=0)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        server = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                    fan_in_fan_out=config["model_type"] == "gpt2",
                                                    target_modules=spec["targets"]), server)
        for name, p in server.named_parameters():
            p.requires_grad_("lora_" in name)
    return server.to(device).train()


@torch.no_grad()
def same_adapters(fused, peft_server, seed=1):
    """Random (non-zero) adapters, the same values in both servers, so that the low-rank path
    does real work and the two compute the same function."""
    from splitlora_kernels.layers import lora_modules

    gen = torch.Generator().manual_seed(seed)
    peft_modules = dict(peft_server.named_modules())
    for name, m in lora_modules(fused).items():
        a = torch.randn(m.lora_A.shape, generator=gen) * 0.02
        b = torch.randn(m.lora_B.shape, generator=gen) * 0.02
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)
        pm = peft_modules[name]
        pm.lora_A["default"].weight.copy_(a)
        pm.lora_B["default"].weight.copy_(b)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, choices=sorted(MODELS),
                        help="the decoder's shape (default: gpt2-medium on cuda, gpt2-small-cpu on cpu)")
    parser.add_argument("--clients", default=None, help="comma-separated client counts N (default: the model's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", default="fused,peft",
                        help="LoRA layers to compare: fused (this package), peft, or both (default)")
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and a CUDA build of torch; use --device cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_name = args.model or DEFAULT_MODEL[device.type]
    spec = MODELS[model_name]
    layer_kinds = [k.strip() for k in args.layers.split(",") if k.strip()]
    unknown = sorted(set(layer_kinds) - {"fused", "peft"})
    if unknown or not layer_kinds:
        parser.error(f"--layers takes fused, peft or both, comma-separated; got {args.layers!r}")
    try:
        client_counts = [int(x) for x in (args.clients or spec["clients"]).split(",")]
    except ValueError:
        client_counts = []
    if not client_counts or min(client_counts) < 1:
        parser.error(f"--clients takes positive integers, comma-separated (e.g. 1,4,8); got {args.clients!r}")
    n_layer, h, vocab = model_dims(spec)
    cut = spec["cut"]
    servers = {kind: build_server(spec, device, dtype, layers=kind) for kind in layer_kinds}
    b, t = spec["batch"], spec["seq_len"]
    peak = peak_tflops(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    if set(servers) == {"fused", "peft"}:
        same_adapters(servers["fused"], servers["peft"])
        hidden = torch.randn(b, t, h, generator=gen).to(device, dtype)
        labels = torch.randint(0, vocab, (b, t), generator=gen).to(device)
        with torch.no_grad():
            losses = [float(causal_lm_loss(servers[k](hidden), labels)) for k in ("fused", "peft")]
        # The same function: equal up to the dtype's rounding (bf16 on a GPU).
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
        if abs(losses[0] - losses[1]) > tol * abs(losses[1]):
            raise SystemExit(f"fused and PEFT servers disagree: loss {losses[0]:.6f} vs {losses[1]:.6f}")
        print(f"fused and PEFT servers agree: loss {losses[0]:.5f} vs {losses[1]:.5f}", flush=True)

    def step(server, chunks):
        for hidden, labels in chunks:
            hidden = hidden.detach().requires_grad_(True)
            loss = causal_lm_loss(server(hidden), labels)
            loss.backward()
        for p in server.parameters():
            p.grad = None

    rows = []
    for n in client_counts:
        hidden = [torch.randn(b, t, h, generator=gen).to(device, dtype) for _ in range(n)]
        labels = [torch.randint(0, vocab, (b, t), generator=gen).to(device) for _ in range(n)]
        batched = [(torch.cat(hidden), torch.cat(labels))]
        separate = list(zip(hidden, labels))
        tokens = n * b * t
        # Counted on the fused server (the same flops for both: PEFT's adapters are the same size).
        flops = train_flops(forward_flops(next(iter(servers.values())), n * b, t, n_layer - cut, h))
        modes = [(kind, mode, chunks) for kind in servers
                 for mode, chunks in (("batched", batched), ("per-client", separate))]
        seconds_each = time_steps([lambda k=k, c=c: step(servers[k], c) for k, _, c in modes], device, args.repeats)
        for (kind, mode, _), seconds in zip(modes, seconds_each):
            achieved = flops / seconds / 1e12
            rows.append(dict(device=device.type, layers=kind, clients=n, mode=mode, tokens=tokens, ms=seconds * 1e3,
                             tokens_per_s=tokens / seconds, tflops=achieved,
                             mfu=(achieved / peak) if peak else None, model=model_name))
            print(f"N={n:<2} {kind:<5} {mode:<10} {seconds * 1e3:9.2f} ms  {tokens / seconds:12,.0f} tok/s  "
                  f"{achieved:8.3f} TFLOPS" + (f"  MFU {achieved / peak:.1%}" if peak else ""), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The device's default model keeps the file names that earlier runs and the README use.
    stem = f"trainer_{device.type}" + ("" if model_name == DEFAULT_MODEL[device.type] else f"_{model_name}")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    lines = [
        f"Server step (forward + backward) of the {model_name} shape, layers {cut}..{n_layer - 1} + head, "
        f"d={h}, vocab {vocab}, {b} x {t} tokens per client, {dtype}, LoRA r={RANK} on {', '.join(spec['targets'])}; "
        f"{name}, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
    ]

    def row(kind, n, mode):
        return next(r for r in rows if r["layers"] == kind and r["clients"] == n and r["mode"] == mode)

    for kind in servers:
        lines += [f"LoRA layers: {kind}", "",
                  "| clients | batched ms | per-client ms | batched tok/s | per-client tok/s | batching speed-up | "
                  "batched TFLOPS | batched MFU |",
                  "|---|---|---|---|---|---|---|---|"]
        for n in sorted({r["clients"] for r in rows}):
            bt, pc = row(kind, n, "batched"), row(kind, n, "per-client")
            mfu = f"{bt['mfu']:.1%}" if bt["mfu"] is not None else "-"
            lines.append(f"| {n} | {bt['ms']:.2f} | {pc['ms']:.2f} | {bt['tokens_per_s']:,.0f} | "
                         f"{pc['tokens_per_s']:,.0f} | {pc['ms'] / bt['ms']:.2f}x | {bt['tflops']:.3f} | {mfu} |")
        lines.append("")
    if set(servers) == {"fused", "peft"}:
        note = "" if device.type == "cuda" else (" On a CPU the fused layer runs the plain-torch reference "
                                                  "(the Triton kernels need a GPU): these ratios are not the kernels'.")
        lines += ["Fused + batched (splitlora's server) against PEFT + one pass per client, same run:" + note, "",
                  "| clients | fused batched ms | PEFT batched ms | PEFT per-client ms | fused vs PEFT (batched) | "
                  "fused batched vs PEFT per-client |",
                  "|---|---|---|---|---|---|"]
        for n in sorted({r["clients"] for r in rows}):
            fb, pb, pp = row("fused", n, "batched"), row("peft", n, "batched"), row("peft", n, "per-client")
            lines.append(f"| {n} | {fb['ms']:.2f} | {pb['ms']:.2f} | {pp['ms']:.2f} | {pb['ms'] / fb['ms']:.2f}x | "
                         f"{pp['ms'] / fb['ms']:.2f}x |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
