"""The `splitlora` command.

    splitlora demo                                   SplitLoRA on the embedded default (CPU, ~2 min)
    splitlora train --config FILE.yaml [key=value]   a training run from a config
    splitlora eval RUN_DIR                           held-out loss, perplexity, BLEU of a run
    splitlora export RUN_DIR OUT_DIR                 the run's adapters in PEFT format
    splitlora codec-demo                             the codec alone on a small model's smashed data
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


def run_codec_demo(args: argparse.Namespace) -> int:
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



# --- training commands ------------------------------------------------------------------------


def _summary_table(rows: list[tuple[str, dict]], baseline: dict | None = None) -> str:
    """One line per run: loss, perplexity, BLEU, bytes at the cut and in total, times."""
    from splitlora.trainer import format_bytes

    header = (f"{'run':<22}{'train loss':>11}{'eval loss':>10}{'ppl':>8}{'BLEU':>7}{'cut bytes':>12}"
              f"{'vs fp32':>9}{'all bytes':>12}{'sim time':>10}{'wall':>8}")
    lines = [header, "-" * len(header)]
    base_cut = None
    if baseline is not None:
        base_cut = baseline["bytes_by_kind"]["activations"] + baseline["bytes_by_kind"]["gradients"]
    for name, s in rows:
        cut = s["bytes_by_kind"]["activations"] + s["bytes_by_kind"]["gradients"]
        ratio = f"{base_cut / cut:.2f}x" if base_cut and cut else "-"
        bleu = f"{s['bleu']:.1f}" if "bleu" in s else "-"
        lines.append(f"{name:<22}{s['final_train_loss']:>11.3f}{s['eval_loss']:>10.3f}{s['eval_ppl']:>8.2f}{bleu:>7}"
                     f"{format_bytes(cut):>12}{ratio:>9}{format_bytes(s['bytes_total']):>12}"
                     f"{s['sim_time_s']:>9.1f}s{s['wall_time_s']:>7.0f}s")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from splitlora.config import load_config
    from splitlora.trainer import train

    base = [f"train.steps={args.steps}", f"seed={args.seed}"]
    runs = [("splitlora int8", [f"output_dir={args.output_dir}/int8", "codec.bits=8"]),
            ("splitlora fp32", [f"output_dir={args.output_dir}/fp32", "codec.bits=32"])]
    cfg0 = load_config(None, base + runs[0][1])
    print(f"SplitLoRA demo: a {cfg0.model.config['n_layer']}-layer GPT-2-shaped model (d={cfg0.model.config['n_embd']}, "
          f"random weights) cut after block {cfg0.model.cut_layer}; {cfg0.train.clients} clients with "
          f"{cfg0.train.batch_size} synthetic data-to-text examples each per step; LoRA r={cfg0.lora.client.r} on "
          f"both sides; client adapters averaged every {cfg0.train.aggregate_every} steps; {args.steps} steps.")
    print("The same run twice: activations and gradients sent as int8 packets, then uncompressed fp32.\n")
    results = []
    for name, overrides in runs:
        cfg = load_config(None, base + overrides)
        results.append((name, train(cfg, progress=not args.no_progress)))
    print()
    print(_summary_table(results, baseline=results[1][1]))
    sample = results[0][1].get("samples") or []
    if sample:
        print(f"\nint8 run, a held-out example:\n  input:     {sample[0]['source']}\n"
              f"  generated: {sample[0]['hypothesis']}\n  reference: {sample[0]['references'][0]}")
    print(f"\ncut bytes: activations up + gradients down, summed over clients and steps; sim time: the time model "
          f"(clients {cfg0.network.client_tflops:g} TFLOPS, server {cfg0.network.server_tflops:g} TFLOPS, "
          f"{cfg0.network.bandwidth_mbps:g} Mbit/s links); runs, metrics, plots and PEFT adapters in {args.output_dir}/")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from splitlora.config import load_config
    from splitlora.trainer import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, progress=not args.no_progress)
    if not summary:  # a client process under transport=dist: the server reports the run
        return 0
    print()
    print(_summary_table([(f"{cfg.strategy}", summary)]))
    print(f"\nrun folder: {cfg.output_dir} (config.yaml, metrics.jsonl, summary.json, loss.png, adapter/)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    from splitlora.trainer import evaluate, load_run, write_generations

    built, strategy, step = load_run(args.run_dir)
    result = evaluate(strategy, built, generate=not args.no_generate)
    if args.generations:
        result = write_generations(args.generations, result)
    result.pop("outputs", None)
    result["step"] = step
    print(json.dumps(result, indent=2))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splitlora.trainer import export_adapter, load_run

    built, strategy, step = load_run(args.run_dir)
    if hasattr(strategy, "export_model"):
        strategy.export_model(Path(args.out_dir))
        print(f"wrote the fine-tuned model of step {step} (save_pretrained) to {args.out_dir}")
        return 0
    path = export_adapter(strategy, built, Path(args.out_dir))
    print(f"wrote the merged client+server adapters of step {step} in PEFT format to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitlora", description="Split federated fine-tuning of LLMs with LoRA.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="SplitLoRA on the embedded default model and data (CPU, about 2 minutes)")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=run_demo)

    tr = sub.add_parser("train", help="train from a YAML config with key=value overrides")
    tr.add_argument("--config", default=None, help="YAML config (default: the demo settings)")
    tr.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.steps=50 codec.bits=4")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(handler=run_train)

    ev = sub.add_parser("eval", help="evaluate the last checkpoint of a run folder")
    ev.add_argument("run_dir")
    ev.add_argument("--no-generate", action="store_true", help="loss and perplexity only, no decoding/BLEU")
    ev.add_argument("--generations", default=None, metavar="FILE",
                    help="write every decoded output (source, hypothesis, references) to FILE as JSON lines")
    ev.set_defaults(handler=run_eval)

    ex = sub.add_parser("export", help="write a run's adapters in PEFT format")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.set_defaults(handler=run_export)

    codec_demo = sub.add_parser("codec-demo", help="compress a small model's smashed data at every bit width")
    codec_demo.add_argument("--batch", type=int, default=8)
    codec_demo.add_argument("--seq-len", type=int, default=128)
    codec_demo.add_argument("--cut-layer", type=int, default=2, choices=range(0, 5))
    codec_demo.add_argument("--group-size", type=int, default=64)
    codec_demo.add_argument("--steps", type=int, default=20)
    codec_demo.add_argument("--seed", type=int, default=0)
    codec_demo.set_defaults(handler=run_codec_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as err:  # ConfigError included: a message the user can act on, no traceback
        print(f"splitlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from splitlora.transport import TransportError

        if not isinstance(err, TransportError):
            raise
        print(f"splitlora {args.command}: stopped: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
