"""The `splitlora` command.

    splitlora demo                                   SplitLoRA on the embedded default (CPU, ~2 min):
                                                     runs/demo/int8 and runs/demo/fp32
    splitlora train --config FILE.yaml [key=value]   a training run from a config (flags and
                                                     overrides in any order; --help: the sections)
    splitlora eval RUN_DIR                           held-out loss, perplexity, BLEU of a run (of
                                                     each run in RUN_DIR: splitlora eval runs/demo)
    splitlora export RUN_DIR OUT_DIR                 the run's adapters in PEFT format
    splitlora codec-demo                             the codec alone on a small model's smashed data
    splitlora certs DIR --clients a,b,c              a federation's CA and certificates
    splitlora federation-example DIR                 a first federation on one machine (data, config, certs)
    splitlora server --config FILE --certs DIR       a federation's server (README, "A real federation")
    splitlora client --config FILE --server HOST:PORT --name NAME --certs DIR --data FILE
                                                     one client of a federation, with its own data
"""
from __future__ import annotations

import argparse
import math
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


def _number(value, digits: int) -> str:
    """A number with `digits` decimals, in exponent form from a million on (a loss or perplexity
    of a diverged run stays one short cell); '-' when missing."""
    if value is None:
        return "-"
    value = float(value)
    if math.isfinite(value) and abs(value) >= 1e6:
        return f"{value:.3e}"
    return f"{value:.{digits}f}"


def _summary_table(rows: list[tuple[str, dict]], baseline: dict | None = None) -> str:
    """One line per run: loss, perplexity, BLEU, bytes at the cut and in total, times. Every
    column is as wide as its widest cell (header included), two spaces apart: no value, however
    long, runs into the next column."""
    from splitlora.trainer import format_bytes

    header = ["run", "train loss", "eval loss", "ppl", "BLEU", "cut bytes", "vs fp32", "all bytes", "sim time",
              "wall"]
    base_cut = None
    if baseline is not None:
        base_cut = baseline["bytes_by_kind"]["activations"] + baseline["bytes_by_kind"]["gradients"]
    body = []
    for name, s in rows:
        cut = s["bytes_by_kind"]["activations"] + s["bytes_by_kind"]["gradients"]
        ratio = f"{base_cut / cut:.2f}x" if base_cut and cut else "-"
        bleu = _number(s["bleu"], 1) if "bleu" in s else "-"
        body.append([str(name), _number(s.get("final_train_loss"), 3), _number(s.get("eval_loss"), 3),
                     _number(s.get("eval_ppl"), 2), bleu, format_bytes(cut), ratio, format_bytes(s["bytes_total"]),
                     _number(s["sim_time_s"], 1) + "s", _number(s["wall_time_s"], 0) + "s"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(header)]
    out.append("-" * len(out[0]))
    out.extend(line(row) for row in body)
    return "\n".join(out)


def _describe_model(cfg) -> str:
    m = cfg.model
    if m.config is None:
        return f"the model {m.name or m.path}"
    c = m.config
    layers = c.get("n_layer", c.get("num_hidden_layers"))
    width = c.get("n_embd", c.get("hidden_size"))
    shape = f"{layers}-layer " if layers is not None else ""
    dims = f" (d={width}, random weights)" if width is not None else " (random weights)"
    return f"a {shape}{'GPT-2' if c.get('model_type') == 'gpt2' else c.get('model_type')}-shaped model{dims}"


# Set by the demo for each of its two runs; not overridable there.
_DEMO_KEYS = ("output_dir", "codec.bits", "resume", "overwrite")


def run_demo(args: argparse.Namespace) -> int:
    from splitlora.config import load_config
    from splitlora.preflight import check_output_dir
    from splitlora.trainer import train

    fixed = [o for o in args.overrides if o.partition("=")[0].strip() in _DEMO_KEYS]
    if fixed:
        args.subparser.error(f"{', '.join(fixed)}: set by the demo for its two runs; use --output-dir and "
                             f"--overwrite, or `splitlora train` for a single run")
    base = [f"train.steps={args.steps}", f"seed={args.seed}", *args.overrides]
    if args.overwrite:
        base.append("overwrite=true")
    runs = [("splitlora int8", [f"output_dir={args.output_dir}/int8", "codec.bits=8"]),
            ("splitlora fp32", [f"output_dir={args.output_dir}/fp32", "codec.bits=32"])]
    configs = [(name, load_config(None, base + overrides)) for name, overrides in runs]
    # Both folders checked before the first run trains: an earlier demo's runs are not replaced
    # unless asked, and a refusal comes now rather than after the first run.
    for _, cfg in configs:
        try:
            check_output_dir(cfg)
        except ValueError:
            raise ValueError(f"{cfg.output_dir} already holds a run (an earlier demo?); rerun with --overwrite to "
                             f"replace the demo's runs, or give another --output-dir") from None
    cfg0 = configs[0][1]
    print(f"SplitLoRA demo: {_describe_model(cfg0)} cut after block {cfg0.model.cut_layer}; {cfg0.train.clients} "
          f"clients with {cfg0.train.batch_size} synthetic data-to-text examples each per step; LoRA "
          f"r={cfg0.lora.client.r} on both sides; client adapters averaged every {cfg0.train.aggregate_every} steps; "
          f"{cfg0.train.steps} steps.")
    print("The same run twice: activations and gradients sent as int8 packets, then uncompressed fp32.\n")
    results = []
    for name, cfg in configs:
        results.append((name, train(cfg, progress=not args.no_progress)))
    print()
    print(_summary_table(results, baseline=results[1][1]))
    sample = results[0][1].get("samples") or []
    if sample:
        print(f"\nint8 run, a held-out example:\n  input:     {sample[0]['source']}\n"
              f"  generated: {sample[0]['hypothesis']}\n  reference: {sample[0]['references'][0]}")
    print(f"\ncut bytes: activations up + gradients down, summed over clients and steps; sim time: the time model "
          f"(clients {cfg0.network.client_tflops:g} TFLOPS, server {cfg0.network.server_tflops:g} TFLOPS, "
          f"{cfg0.network.bandwidth_mbps:g} Mbit/s links); runs, metrics, plots and PEFT adapters in "
          f"{args.output_dir}/int8 and {args.output_dir}/fp32 (`splitlora eval {args.output_dir}` evaluates both)")
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


def _runs(run_dir: str, command: str) -> list:
    """The run folders `run_dir` names: itself, or the runs in its subfolders (the demo's)."""
    from splitlora.preflight import runs_in

    runs = runs_in(run_dir)
    if not runs:
        raise ValueError(f"{run_dir} is not a run folder (no config.yaml, nor any run in its subfolders); pass the "
                         f"output_dir of a training run")
    if len(runs) > 1 and command == "export":
        names = ", ".join(p.name for p in runs)
        raise ValueError(f"{run_dir} holds {len(runs)} runs ({names}); export one of them, e.g. "
                         f"splitlora export {runs[0]} OUT_DIR")
    return runs


def run_eval(args: argparse.Namespace) -> int:
    import json

    from splitlora.trainer import evaluate, load_run, write_generations

    runs = _runs(args.run_dir, "eval")
    if len(runs) > 1 and args.generations:
        raise ValueError(f"--generations writes one run's outputs; {args.run_dir} holds {len(runs)} runs "
                         f"({', '.join(p.name for p in runs)}): evaluate one of them, e.g. "
                         f"splitlora eval {runs[0]} --generations {args.generations}")
    results = {}
    for run in runs:
        built, strategy, step = load_run(run)
        result = evaluate(strategy, built, generate=not args.no_generate)
        if args.generations:
            result = write_generations(args.generations, result)
        result.pop("outputs", None)
        result["step"] = step
        results[str(run)] = result
    # One run: its scores; a folder of runs (the demo's): {run folder: scores}.
    print(json.dumps(results[str(runs[0])] if len(runs) == 1 else results, indent=2))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from splitlora.trainer import export_adapter, export_whole_model, load_run

    (run,) = _runs(args.run_dir, "export")
    built, strategy, step = load_run(run)
    if hasattr(strategy, "export_model"):
        # With the tokenizer beside it, loadable by plain transformers (as a run's own model/ is).
        export_whole_model(strategy, built, Path(args.out_dir))
        print(f"wrote the fine-tuned model of step {step} (save_pretrained) to {args.out_dir}")
        return 0
    path = export_adapter(strategy, built, Path(args.out_dir))
    print(f"wrote the merged client+server adapters of step {step} in PEFT format to {path}")
    return 0


def run_server(args: argparse.Namespace) -> int:
    from splitlora.config import load_config
    from splitlora.federation.server import run_server as serve

    _check_security(args)
    cfg = load_config(args.config, args.overrides)
    summary = serve(cfg, listen=args.listen, certs_dir=args.certs, insecure=args.insecure,
                    progress=not args.no_progress)
    print()
    print(_summary_table([(f"{cfg.strategy} (federation)", summary)]))
    print(f"\nrun folder: {cfg.output_dir} (config.yaml, metrics.jsonl, summary.json, loss.png, adapter/)")
    return 0


def run_client(args: argparse.Namespace) -> int:
    from splitlora.config import load_config
    from splitlora.federation.client import run_client as join

    _check_security(args)
    cfg = load_config(args.config, args.overrides)
    return join(cfg, server=args.server, name=args.name, certs_dir=args.certs, insecure=args.insecure,
                data=args.data, output_dir=args.output_dir, progress=not args.no_progress)


def _check_security(args: argparse.Namespace) -> None:
    if args.insecure and args.certs:
        raise ValueError("--insecure turns TLS off and --certs turns it on; give one of them")
    if not args.insecure and not args.certs:
        raise ValueError("give --certs DIR (made by `splitlora certs DIR --clients ...`); --insecure turns TLS off, "
                         "for loopback tests only")


def run_federation_example(args: argparse.Namespace) -> int:
    from splitlora.federation.example import write_example

    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    commands = write_example(args.dir, names, port=args.port)
    print("start the server, then each client, each in its own terminal (or machine, see the README):")
    for command in commands:
        print(f"  {command}")
    return 0


def run_certs(args: argparse.Namespace) -> int:
    from splitlora.federation.certs import create_certs

    written = create_certs(args.dir, [args.clients] if args.clients else [], hosts=[args.hosts] if args.hosts else [],
                           days=args.days)
    for path in written:
        print(f"wrote {path}")
    print(f"keep {args.dir}/ca.key off the server and clients; give the server ca.crt, server.crt and server.key, "
          f"and each client ca.crt and its own client-<name>.crt and client-<name>.key")
    return 0


# One line per section of the config (splitlora.config.RunConfig), for `splitlora train --help`.
_SECTIONS = {
    "model": "name, path (+ gguf_file) or config (transformers, random weights); dtype, cut_layer",
    "data": "source (synthetic, e2e or your files), tokenizer, format, max_length, partition",
    "lora": "adapter_dtype; client.* and server.*: r, alpha, dropout, target_modules, rslora",
    "train": "clients, steps, batch_size, lr, lr_schedule, optimizer, aggregate_every, u_shape, ...",
    "codec": "compression at the cut: bits (32, 16, 8, 4, 2), group_size, error_feedback, ...",
    "network": "the time model's setting: client/server TFLOPS, bandwidth, latency, timeout",
    "eval": "held-out evaluation: generate, max_new_tokens, num_beams, max_sources, batch_size",
    "fedcybgd": "strategy fedcybgd: block order and size, downloads (configs/fedcybgd.yaml)",
    "hsplitlora": "strategy hsplitlora: devices, cut and rank ranges (configs/hsplitlora.yaml)",
    "federation": "splitlora server / client: listen, min_clients, step_timeout_s, wait_s, max_packet_bytes, ...",
    "privacy": "DP: clip + noise_multiplier (or epsilon) at the cut, adapter_clip, delta (README, Privacy)",
}
def _train_epilog() -> str:
    import dataclasses
    import typing

    from splitlora.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    fields = dataclasses.fields(RunConfig)
    top = [f.name for f in fields if not dataclasses.is_dataclass(hints[f.name])]
    sections = [f.name for f in fields if dataclasses.is_dataclass(hints[f.name])]
    width = max(len(n) for n in ["top-level", *sections])
    lines = ["config sections (every key with its default and meaning: configs/demo.yaml; the fedcybgd and",
             "hsplitlora sections: configs/fedcybgd.yaml, configs/hsplitlora.yaml):",
             f"  {'top-level':<{width}}  {', '.join(top)}"]
    for name in sections:
        lines.append(f"  {name:<{width}}  {_SECTIONS.get(name, 'see configs/demo.yaml')}")
    lines += ["",
              "overrides: section.key=value (a YAML value), before, between or after the flags, e.g.",
              "  splitlora train --config configs/demo.yaml train.steps=50 --no-progress codec.bits=4",
              "An unknown key, a wrong type or a value out of range stops the run before it starts."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitlora", description="Split federated fine-tuning of LLMs with LoRA.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="SplitLoRA on the embedded default model and data (CPU, about 2 minutes)",
                          description="Trains the demo twice (int8 and fp32 at the cut) into OUTPUT_DIR/int8 and "
                                      "OUTPUT_DIR/fp32. key=value overrides apply to both runs.",
                          usage="splitlora demo [-h] [--steps N] [--seed N] [--output-dir DIR] [--overwrite] "
                                "[--no-progress] [key=value ...]")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier demo in OUTPUT_DIR")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=run_demo, subparser=demo, takes_overrides=True)

    tr = sub.add_parser("train", help="train from a YAML config with key=value overrides",
                        usage="splitlora train [-h] [--config FILE] [--no-progress] [key=value ...]",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_train_epilog())
    tr.add_argument("--config", default=None, metavar="FILE", help="YAML config (default: the demo settings)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.set_defaults(handler=run_train, subparser=tr, takes_overrides=True)

    ev = sub.add_parser("eval", help="evaluate the last checkpoint of a run folder (or of each run in it)")
    ev.add_argument("run_dir", help="a run's output_dir, or a folder of runs (the demo's runs/demo): each is evaluated")
    ev.add_argument("--no-generate", action="store_true", help="loss and perplexity only, no decoding/BLEU")
    ev.add_argument("--generations", default=None, metavar="FILE",
                    help="write every decoded output (source, hypothesis, references) to FILE as JSON lines")
    ev.set_defaults(handler=run_eval, subparser=ev, takes_overrides=False)

    ex = sub.add_parser("export", help="write a run's adapters in PEFT format")
    ex.add_argument("run_dir")
    ex.add_argument("out_dir")
    ex.set_defaults(handler=run_export, subparser=ex, takes_overrides=False)

    sv = sub.add_parser("server", help="run a federation's server (clients join with `splitlora client`)",
                        usage="splitlora server [-h] --config FILE [--listen HOST:PORT] (--certs DIR | --insecure) "
                              "[--no-progress] [key=value ...]",
                        description="Listens for the federation's clients (mutual TLS) and trains: the server "
                                    "segment, aggregation, schedule, checkpoints and run folder. It never reads "
                                    "the clients' training data (it evaluates on data.eval_path).")
    sv.add_argument("--config", required=True, metavar="FILE", help="the run's YAML config (the clients use the same)")
    sv.add_argument("--listen", default=None, metavar="HOST:PORT", help="default: federation.listen (loopback)")
    sv.add_argument("--certs", default=None, metavar="DIR", help="ca.crt, server.crt and server.key")
    sv.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only; prints a warning)")
    sv.add_argument("--no-progress", action="store_true", help="no progress bar")
    sv.set_defaults(handler=run_server, subparser=sv, takes_overrides=True)

    cl = sub.add_parser("client", help="join a federation as one client, with your own data",
                        usage="splitlora client [-h] --config FILE --server HOST:PORT --name NAME "
                              "(--certs DIR | --insecure) [--data FILE] [--output-dir DIR] [--no-progress] "
                              "[key=value ...]",
                        description="Connects to the server, loads the client segment only and trains on FILE; "
                                    "the data never leaves this program.")
    cl.add_argument("--config", required=True, metavar="FILE", help="the run's YAML config (the server's)")
    cl.add_argument("--server", required=True, metavar="HOST:PORT")
    cl.add_argument("--name", required=True, help="this client's name (with --certs, the CN of its certificate)")
    cl.add_argument("--certs", default=None, metavar="DIR", help="ca.crt and client-NAME.crt/.key")
    cl.add_argument("--insecure", action="store_true", help="no TLS (loopback tests only; prints a warning)")
    cl.add_argument("--data", default=None, metavar="FILE", help="this client's training data (default: "
                                                                 "data.train_path)")
    cl.add_argument("--output-dir", default=None, metavar="DIR",
                    help="this client's checkpoints (default: OUTPUT_DIR-NAME beside the config's output_dir)")
    cl.add_argument("--no-progress", action="store_true", help="no progress bar")
    cl.set_defaults(handler=run_client, subparser=cl, takes_overrides=True)

    fx = sub.add_parser("federation-example", help="write a first federation on one machine: data, config, certificates",
                        description="Writes into DIR one data file per client, the server's held-out file, a tokenizer, "
                                    "run.yaml (the demo model) and the certificates, and prints the commands that run "
                                    "the server and each client. Nothing is downloaded.")
    fx.add_argument("dir", metavar="DIR")
    fx.add_argument("--clients", default="a,b,c", help="client names, comma-separated (default a,b,c)")
    fx.add_argument("--port", type=int, default=50051, help="the server's port on 127.0.0.1 (default 50051)")
    fx.set_defaults(handler=run_federation_example, subparser=fx, takes_overrides=False)

    ce = sub.add_parser("certs", help="create a federation's CA and the server's and clients' certificates",
                        description="Writes ca.crt/ca.key, server.crt/server.key and client-<name>.crt/.key into DIR "
                                    "(an existing CA there is reused; existing files are never overwritten).")
    ce.add_argument("dir", metavar="DIR")
    ce.add_argument("--clients", default="", help="client names, comma-separated (each becomes its certificate's CN)")
    ce.add_argument("--hosts", default="", help="extra names or addresses the server is reached at, comma-separated "
                                                "(localhost, 127.0.0.1 and ::1 are always in)")
    ce.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    ce.set_defaults(handler=run_certs, subparser=ce, takes_overrides=False)

    codec_demo = sub.add_parser("codec-demo", help="compress a small model's smashed data at every bit width")
    codec_demo.add_argument("--batch", type=int, default=8)
    codec_demo.add_argument("--seq-len", type=int, default=128)
    codec_demo.add_argument("--cut-layer", type=int, default=2, choices=range(0, 5))
    codec_demo.add_argument("--group-size", type=int, default=64)
    codec_demo.add_argument("--steps", type=int, default=20)
    codec_demo.add_argument("--seed", type=int, default=0)
    codec_demo.set_defaults(handler=run_codec_demo, subparser=codec_demo, takes_overrides=False)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Flags and key=value overrides in any order: what argparse does not take is an override when
    it reads key=value and the command takes overrides (train, demo), else argparse's usual error."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = [], []
    for item in rest:
        key, sep, _ = item.partition("=")
        (overrides if sep and key.strip() and not item.startswith("-") else unknown).append(item)
    if unknown:
        args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and not args.takes_overrides:
        args.subparser.error(f"unrecognized arguments: {' '.join(overrides)} (splitlora {args.command} takes "
                             f"no key=value overrides)")
    args.overrides = overrides
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as err:  # ConfigError included: a message the user can act on
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
