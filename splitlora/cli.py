"""The `splitlora` command.

`splitlora demo` shows what crosses the cut: the hidden states of a small GPT-2-shaped model at a
split point ("smashed data"), compressed by the codec at every bit width, with the bytes sent, the
ratio against the fp32 exchange and the reconstruction error. It needs no files and no GPU.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence


def _smashed_data(batch: int, seq_len: int, cut_layer: int, seed: int):
    """Hidden states after `cut_layer` blocks of a small random GPT-2: what a client sends up."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=seq_len, vocab_size=4096,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    tokens = torch.randint(0, config.vocab_size, (batch, seq_len))
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    return out.hidden_states[cut_layer]


def run_demo(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from splitlora import codec

    activations = _smashed_data(args.batch, args.seq_len, args.cut_layer, args.seed)
    fp32_bytes = activations.numel() * 4
    print(
        f"smashed data: hidden states after block {args.cut_layer} of a 4-block GPT-2 "
        f"(d=256), batch {args.batch} x {args.seq_len} tokens = {tuple(activations.shape)}, "
        f"{fp32_bytes / 2**20:.2f} MiB as fp32; codec backend: {codec.backend_for(activations.device)}"
    )
    settings = [(16, False, False), (8, False, False), (8, True, False), (4, False, False),
                (4, False, True), (2, False, True)]
    rows = []
    for bits, stochastic, feedback in tqdm(settings, desc="compressing", unit="setting"):
        generator = torch.Generator().manual_seed(args.seed)
        ef = codec.ErrorFeedback() if feedback else None
        # A stream of `steps` messages: error feedback only shows its effect over a stream.
        sent = 0
        error_sum = torch.zeros_like(activations, dtype=torch.float64)
        elapsed = 0.0
        for step in range(args.steps):
            message = activations * (1.0 + 0.01 * step)
            start = time.perf_counter()
            if ef is not None:
                packet = ef.compress(message, bits=bits, group_size=args.group_size)
            else:
                packet = codec.compress(message, bits=bits, group_size=args.group_size,
                                        stochastic=stochastic, generator=generator)
            decoded = codec.decompress(packet)
            elapsed += time.perf_counter() - start
            sent += packet.numel()
            error_sum += (decoded.double() - message.double())
        mean_bytes = sent / args.steps
        last_error = (decoded - message).norm() / message.norm()
        stream_error = error_sum.norm() / (args.steps * message.double().norm())
        name = f"int{bits}" if bits < 16 else "bf16"
        name += " stochastic" if stochastic else ""
        name += " + error feedback" if feedback else ""
        rows.append((name, mean_bytes, fp32_bytes / mean_bytes, float(last_error), float(stream_error),
                     2 * args.steps * activations.numel() * 4 / elapsed / 1e9))

    header = f"{'exchange':<28}{'bytes/message':>14}{'vs fp32':>9}{'rel. error':>12}{'stream error':>14}{'GB/s':>8}"
    print()
    print(header)
    print("-" * len(header))
    print(f"{'fp32 (uncompressed)':<28}{fp32_bytes:>14,}{1.0:>8.2f}x{0.0:>12.2e}{0.0:>14.2e}{'-':>8}")
    for name, size, ratio, err, stream_err, gbps in rows:
        print(f"{name:<28}{size:>14,.0f}{ratio:>8.2f}x{err:>12.2e}{stream_err:>14.2e}{gbps:>8.2f}")
    print()
    print("rel. error: ||decoded - sent|| / ||sent|| for one message; stream error: the same for the sum over "
          f"{args.steps} messages (what error feedback keeps small); GB/s: fp32 input through compress+decompress.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitlora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress the smashed data of a small model at every bit width")
    demo.add_argument("--batch", type=int, default=8)
    demo.add_argument("--seq-len", type=int, default=128)
    demo.add_argument("--cut-layer", type=int, default=2, choices=range(0, 5))
    demo.add_argument("--group-size", type=int, default=64)
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
