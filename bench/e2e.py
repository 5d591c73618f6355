"""End to end: SplitLoRA against its baselines on the same model, data and seed.

    python -m bench.e2e --size cpu --report                      # the CPU size, then bench.report
    python -m bench.e2e --size cpu --steps 4 --only splitlora-int8,centralized   # smoke check (runs/e2e-quick/)
    python -m bench.e2e --size gpu                               # GPT-2 medium shape (a GPU machine)
    python -m bench.bench_trainer --device cuda --model llama-7b # the GPU size's Llama-7B server MFU
    python -m bench.e2e --size quality-cpu --report              # BLEU, ROUGE-L, perplexity of SmolLM2-135M
    python -m bench.e2e --size quality-chat-cpu --report         # the same through chat JSON lines and its template

Each run is one `splitlora.trainer.train(cfg)` into `<out>/<name>/` (default `runs/e2e/`; quick tries
with --steps, --eval-every or --set into `runs/e2e-quick/`), in a
process of its own so that its peak memory is its own and a failing run does not stop the others:

    centralized        the whole model on the union of the clients' batches
    fedlora            every client trains the whole model with LoRA, FedAvg every round
    sl                 vanilla split learning (one client at a time), fp32 at the cut
    splitlora-fp32     SplitLoRA, uncompressed at the cut (codec.bits=32), as in the paper
    splitlora-int8     SplitLoRA, int8 packets at the cut (group 64)
    splitlora-int4-ef  SplitLoRA, int4 packets with error feedback
    fedcybgd           full-parameter cycle block descent (when the strategy exists)
    hsplitlora         heterogeneous-rank SplitLoRA (when the strategy exists)
    pretrained         no training: the model as loaded, evaluated like the others (quality sizes)

Each size runs its own list of these (SIZES[size]["runs"]). The quality sizes (`quality-cpu`, and
`quality-gpu` for a GPU machine) fine-tune the real pretrained SmolLM2-135M (configs/bench-quality.yaml)
with centralized, fedlora and splitlora at fp32, int8 and int4 with error feedback, and score
BLEU, ROUGE-L and perplexity on e2e/testset_w_refs.csv: the SplitLoRA paper's E2E comparison;
`python -m bench.report --runs runs/quality` writes their section of bench/RESULTS.md.

All runs share one config (`configs/bench-cpu.yaml` for the CPU size; the GPU size is
`configs/gpt2-medium-e2e.yaml` with the overrides in SIZES) and differ only in `strategy`, the
codec and `output_dir`, except fedcybgd, which trains full weights at a tenth of the LoRA runs'
learning rate. The time model is the SplitLoRA paper's setting: clients and server at
35.6 TFLOPS, links of `--bandwidth-mbps` (default 100 Mbit/s) with `--latency-ms` (10 ms).

The trainer writes `config.yaml`, `metrics.jsonl` (loss per step with measured and simulated
time, held-out loss every `train.eval_every` steps), `summary.json` (final held-out loss,
perplexity, BLEU, ROUGE-L, bytes per client, direction and kind). This script adds `bench.json`
(process wall time, peak resident memory or CUDA peak, threads, load average, machine) and
`log.txt` (the run's output) to each run folder, and `<out>/suite.json` (the command, the target
loss if given, and one entry per run). `python -m bench.report` turns them into the table between
the `<!-- e2e:begin -->`/`<!-- e2e:end -->` markers of bench/RESULTS.md and the plots in bench/plots/.
Data: `$SPLITLORA_DATA` (default `../shared/data`): trains on `e2e/valid.txt`, evaluates on
`e2e/test.txt` (all references of each meaning representation): the same test set as
`e2e/testset_w_refs.csv` written like the training file (see configs/bench-cpu.yaml for why);
`--set data.eval_path=$SPLITLORA_DATA/e2e/testset_w_refs.csv` evaluates on the CSV.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every run: name -> (strategy, overrides on top of the size's config).
RUNS = {
    # No training step: the pretrained model as loaded (the baseline that shows what fine-tuning
    # did). The trainer needs at least one step, so child() builds the run exactly as the trainer
    # does and runs only its final evaluation (see evaluate_untrained).
    "pretrained": ("centralized", []),
    "centralized": ("centralized", []),
    "fedlora": ("fedlora", []),
    "sl": ("sl", ["codec.bits=32"]),
    "splitlora-fp32": ("splitlora", ["codec.bits=32"]),
    "splitlora-int8": ("splitlora", ["codec.bits=8", "codec.group_size=64"]),
    "splitlora-int4-ef": ("splitlora", ["codec.bits=4", "codec.group_size=64", "codec.error_feedback=true"]),
    # Full-parameter training: at the LoRA runs' lr 1e-2 its held-out loss swung between 5.3 and
    # 8.0 and ended at 6.6 on the CPU size; at 1e-3 it learns (bench/report.py lists this difference).
    "fedcybgd": ("fedcybgd", ["train.lr=1e-3"]),
    "hsplitlora": ("hsplitlora", ["codec.bits=32"]),
}
# Runs that evaluate without training.
EVAL_ONLY = ("pretrained",)
# Strategies that exist only once their issue is done: run when the package has them.
OPTIONAL = ("fedcybgd", "hsplitlora")
# The runs of the comparison of SplitLoRA with its baselines (sizes cpu and gpu).
COMPARISON = ("centralized", "fedlora", "sl", "splitlora-fp32", "splitlora-int8", "splitlora-int4-ef",
              "fedcybgd", "hsplitlora")
# The runs of the E2E quality comparison (the SplitLoRA paper's table), and the untrained baseline.
QUALITY = ("pretrained", "centralized", "fedlora", "splitlora-fp32", "splitlora-int8", "splitlora-int4-ef")
# The same comparison through the user-data path (E2E as chat JSON lines): the runs.
QUALITY_CHAT = ("pretrained", "centralized", "fedlora", "splitlora-fp32", "splitlora-int8")
# Where bench.e2e_chat writes the chat files that configs/bench-quality-chat.yaml reads.
CHAT_DATA = "runs/data/e2e-chat"

SIZES = {
    # The CPU size: everything is in the config file (see its comments for the sizing).
    "cpu": {"config": "configs/bench-cpu.yaml", "out": "runs/e2e", "overrides": [], "runs": COMPARISON,
            "threads": 1, "data": {"data.train_path": "e2e/valid.txt", "data.eval_path": "e2e/test.txt"}},
    # The GPU size: the paper's GPT-2 medium shape (24 layers, d 1024) with random weights (no
    # pretrained GPT-2 medium is reachable here), GPT-2 tokenizer. 400 steps, sized so that the 8
    # runs fit two 10-minute calls on a lent H100 with the build (85 to 227 ms a step measured in a
    # shortened run, where every run reached the target by step 50); evaluations at FedAvg round
    # ends (every 50 steps), as on the CPU size.
    "gpu": {"config": "configs/gpt2-medium-e2e.yaml", "out": "runs/e2e-gpu", "overrides": [
        "device=cuda", "train.steps=400", "train.warmup_steps=40", "train.aggregate_every=50",
        "train.eval_every=50", "train.checkpoint_every=0",
        "train.lr=1e-3", "lora.server.target_modules=[c_attn,lm_head]", "eval.num_beams=1",
        "eval.max_sources=50"], "runs": COMPARISON, "threads": None, "matmul_precision": "high",
        "triton_autotune": False, "data": {
        "data.train_path": "e2e/valid.txt", "data.eval_path": "e2e/test.txt",
        "data.tokenizer": "gpt2-tokenizer"}},
    # E2E quality on a CPU: SmolLM2-135M fine-tuned for 80 steps on valid.txt (480 of its lines),
    # scored on a subset of testset_w_refs.csv (read in the training file's form, see
    # splitlora.data.read_e2e); sized in the config file so that the six runs take under an hour
    # with one torch thread each (measured: 47 minutes).
    "quality-cpu": {"config": "configs/bench-quality.yaml", "out": "runs/quality", "overrides": [],
                    "runs": QUALITY, "threads": 1, "data": {
                        "data.train_path": "e2e/valid.txt", "data.eval_path": "e2e/testset_w_refs.csv"}},
    # E2E quality through the user-data path: E2E written as chat JSON lines (bench.e2e_chat, before
    # the runs), read with HF datasets and rendered with SmolLM2's chat template; otherwise as
    # quality-cpu (same model, LoRA, steps, evaluation subset).
    "quality-chat-cpu": {"config": "configs/bench-quality-chat.yaml", "out": "runs/quality-chat", "overrides": [],
                         "runs": QUALITY_CHAT, "threads": 1, "data": {}, "chat_data": CHAT_DATA},
    # The full quality run, on a GPU: every line of valid.txt for 5 epochs (as the LoRA paper trains
    # E2E) at 3 x 8 sequences per step, held-out loss on all 4,693 lines of the test set and BLEU on
    # all its 630 meaning representations (630 greedy decodings per run, with the KV cache). Not run
    # yet (written in a session without a GPU): its length is a guess, and the learning rate (the CPU
    # size's 5e-3, with a warmup) is untested over 975 steps.
    "quality-gpu": {"config": "configs/bench-quality.yaml", "out": "runs/quality-gpu", "overrides": [
        "device=cuda", "data.pad_to=batch", "data.num_train=null", "data.num_eval=null", "train.batch_size=8",
        "train.steps=975",
        "train.warmup_steps=50", "train.aggregate_every=25", "train.eval_every=325", "eval.max_sources=630",
        "eval.batch_size=32"], "runs": QUALITY, "threads": None, "matmul_precision": "high",
        "triton_autotune": False, "data": {
        "data.train_path": "e2e/valid.txt", "data.eval_path": "e2e/testset_w_refs.csv"}},
}


def data_dir() -> Path:
    path = Path(os.environ.get("SPLITLORA_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "e2e" / "valid.txt").is_file():
        raise SystemExit(f"E2E data not found: {path / 'e2e' / 'valid.txt'} does not exist; set SPLITLORA_DATA "
                         f"to the folder holding e2e/ and gpt2-tokenizer/")
    return path


def available_strategies() -> set:
    """Strategies both the trainer and the config accept."""
    from splitlora.config import STRATEGIES
    from splitlora.strategies import STRATEGY_CLASSES

    return set(STRATEGY_CLASSES) & set(STRATEGIES)


def run_overrides(name: str, args, data: Path, out: Path) -> list[str]:
    size = SIZES[args.size]
    strategy, extra = RUNS[name]
    overrides = [f"{key}={data / rel}" for key, rel in size["data"].items()]
    overrides += list(size["overrides"])
    client_tflops = args.tflops if args.client_tflops is None else args.client_tflops
    overrides += [f"network.client_tflops={client_tflops:g}", f"network.server_tflops={args.tflops:g}",
                  f"network.bandwidth_mbps={args.bandwidth_mbps:g}", f"network.latency_ms={args.latency_ms:g}"]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.eval_every is not None:
        overrides.append(f"train.eval_every={args.eval_every}")
    # --set comes after the run's own overrides, so that it wins over them too (say
    # codec.group_size for splitlora-int8, or train.lr for fedcybgd): what the command line asks for
    # is what runs.
    overrides += [f"strategy={strategy}", *extra]
    overrides += list(args.set or [])
    overrides.append(f"output_dir={out / name}")
    return overrides


# --------------------------------------------------------------------------------------------
# One run, in its own process
# --------------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def evaluate_untrained(cfg) -> dict:
    """The run folder of a model that is not trained: config.yaml, metrics.jsonl (one evaluation) and
    summary.json as the trainer writes them, with 0 steps.

    Built by the trainer's own `build` (same data, tokenizer, cut and adapters as the trained runs)
    and scored by its own `evaluate`; the adapters are at their initial values, whose B = 0 makes
    them add nothing, so this is the model as loaded (checked: a non-zero B raises)."""
    from splitlora import config as config_mod
    from splitlora.strategies import make_strategy
    from splitlora.trainer import _codec_name, _trainable_params, build, evaluate, write_generations

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_mod.dump_config(cfg, out / "config.yaml")
    built = build(cfg)
    strategy = make_strategy(built.setup)
    state = strategy.export_state()[1]
    moved = [k for k, v in state.items() if k.endswith("lora_B") and bool(v.any())]
    if moved:
        raise RuntimeError(f"{len(moved)} adapters start with a non-zero B (e.g. {moved[0]}): the untrained run would "
                           "not be the pretrained model")
    result = write_generations(out / "generations.jsonl", evaluate(strategy, built, generate=cfg.eval.generate))
    (out / "metrics.jsonl").write_text(json.dumps({"type": "eval", "step": -1, "sim_time_s": 0.0, **result}) + "\n")
    zero = {"activations": 0, "gradients": 0, "labels": 0, "adapters": 0}
    summary = {
        "strategy": cfg.strategy, "codec": _codec_name(cfg), "transport": cfg.transport, "steps": 0,
        "clients": cfg.train.clients, "final_train_loss": None,
        **{k: v for k, v in result.items() if k != "samples"}, "samples": result.get("samples", []),
        "bytes": {}, "bytes_by_kind": zero, "bytes_total": 0, "sim_time_s": 0.0, "wall_time_s": 0.0,
        "client_compute_s": 0.0, "server_compute_s": 0.0,
        "trainable_params": _trainable_params(strategy, built.setup), "peak_memory_bytes": None, "adapter": None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def child(spec: dict) -> int:
    """Runs one config (spec: name, config, overrides) and writes bench.json next to its results."""
    from splitlora.config import load_config
    from splitlora.trainer import train

    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # float32 products on tensor cores (TF32) on the GPU sizes: the fused LoRA kernels already
    # take float32 operands as TF32 unless the precision is "highest", and cuBLAS then does too.
    # Series of other entry points (bench.hetero's "hetero") are no size of this file: defaults.
    settings = SIZES.get(spec["size"], {})
    torch.set_float32_matmul_precision(settings.get("matmul_precision", "highest"))
    # The fused LoRA kernels' fixed tiles on the GPU sizes: autotuning compiles and times every tile
    # config once per layer shape and power-of-two bucket of token counts, about 100 s per bucket
    # for GPT-2 medium on an H100, which the measured training time of a short run would carry.
    if not settings.get("triton_autotune", True):
        os.environ.setdefault("SPLITLORA_TRITON_AUTOTUNE", "0")
    cfg = load_config(ROOT / spec["config"], spec["overrides"])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    summary = evaluate_untrained(cfg) if spec["name"] in EVAL_ONLY else train(cfg, progress=False)
    elapsed = time.perf_counter() - t0
    # ru_maxrss is in KiB on Linux: the peak resident memory of this process, every party included.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record = {
        "name": spec["name"], "size": spec["size"], "strategy": cfg.strategy, "codec": summary.get("codec"),
        "config": spec["config"], "overrides": spec["overrides"],
        "started_utc": started.isoformat(timespec="seconds"),
        "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "process_wall_s": elapsed, "train_wall_s": summary.get("wall_time_s"),
        "peak_rss_bytes": rss, "cuda_peak_bytes": summary.get("peak_memory_bytes"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_autotune": os.environ.get("SPLITLORA_TRITON_AUTOTUNE", "1") != "0",
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "machine": machine(),
    }
    (Path(cfg.output_dir) / "bench.json").write_text(json.dumps(record, indent=2))
    return 0


def launch(name: str, config: str, overrides: list[str], size: str, out_dir: Path, threads) -> tuple[int, float]:
    """Runs `name` in a child process; its output goes to out_dir/log.txt. Returns (rc, seconds)."""
    if out_dir.exists():
        # A stale summary or metrics file from an earlier run must not survive a failed one.
        if not (out_dir / "config.yaml").is_file() and any(out_dir.iterdir()):
            raise SystemExit(f"{out_dir} exists and is not a run folder; move it away or pick another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    spec = {"name": name, "config": config, "overrides": overrides, "size": size, "threads": threads}
    t0 = time.perf_counter()
    with open(out_dir / "log.txt", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "bench.e2e", "--child", json.dumps(spec)], cwd=ROOT,
                             stdout=log, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - t0


def run_series(names, overrides_of, config: str, size: str, out: Path, threads, command: str) -> tuple[dict, list]:
    """Runs each of `names` in a process of its own (`launch`, with overrides_of(name)), one after
    another, printing a line per run; returns (suite entries by name, names that failed)."""
    entries, failed = {}, []
    width = max(len(n) for n in names) if names else 0
    for i, name in enumerate(names, 1):
        rc, seconds = launch(name, config, overrides_of(name), size, out / name, threads)
        entries[name] = {"rc": rc, "seconds": seconds, "command": command,
                         "finished_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        summary_path = out / name / "summary.json"
        if rc == 0 and summary_path.is_file():
            s = json.loads(summary_path.read_text())
            bleu = f"  BLEU {s['bleu']:5.1f}" if s.get("bleu") is not None else ""
            print(f"[{i}/{len(names)}] {name:<{width}}  held-out loss {s['eval_loss']:.4f}{bleu}  sim {s['sim_time_s']:9.3f} s"
                  f"  train {s['wall_time_s']:6.1f} s  process {seconds:6.1f} s", flush=True)
        else:
            failed.append(name)
            tail = (out / name / "log.txt").read_text().splitlines()[-15:]
            print(f"[{i}/{len(names)}] {name}: FAILED (exit {rc}); last lines of {out / name / 'log.txt'}:", flush=True)
            print("    " + "\n    ".join(tail), flush=True)
    return entries, failed


def update_suite(path: Path, entry: dict, runs: dict) -> None:
    """suite.json keeps one entry per run name across invocations (a rerun of one run with --only
    replaces its entry), plus the last invocation's command."""
    suite = json.loads(path.read_text()) if path.is_file() else {}
    suite.update(entry)
    suite.setdefault("runs", {}).update(runs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(suite, indent=2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all of the size's runs: "
                        + "; ".join(f"{size}: {', '.join(spec['runs'])}" for size, spec in SIZES.items()) + ")")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick tries)")
    parser.add_argument("--eval-every", type=int, default=None, help="override train.eval_every")
    parser.add_argument("--target-loss", type=float, default=None,
                        help="held-out loss to reach (default, in bench.report: centralized's final one + 5%%)")
    parser.add_argument("--bandwidth-mbps", type=float, default=100.0, help="simulated link bandwidth (Mbit/s)")
    parser.add_argument("--latency-ms", type=float, default=10.0, help="simulated link latency (ms)")
    parser.add_argument("--tflops", type=float, default=35.6, help="simulated client and server TFLOPS")
    parser.add_argument("--client-tflops", type=float, default=None,
                        help="simulated client TFLOPS when the clients are weaker (or stronger) than the server "
                             "(default: --tflops)")
    parser.add_argument("--out", default=None, help="folder of the run folders (default runs/e2e, gpu: runs/e2e-gpu, "
                        "quality-cpu: runs/quality, quality-gpu: runs/quality-gpu; with --steps, --eval-every or "
                        "--set: that folder + '-quick')")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: 1 on the CPU sizes, torch's default on the GPU sizes)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="extra config override for every run (applied last: wins over the run's own)")
    parser.add_argument("--report", action="store_true", help="run bench.report afterwards")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(json.loads(args.child))

    size = SIZES[args.size]
    # Quick tries (--steps, --eval-every, --set) go to a folder of their own unless --out says
    # otherwise, so that they never replace the runs that bench.report tabulates.
    tweaked = args.steps is not None or args.eval_every is not None or bool(args.set)
    out = Path(args.out or (size["out"] + "-quick" if tweaked else size["out"]))
    data = data_dir()
    if size.get("chat_data"):
        from bench.e2e_chat import write_chat_files

        # The config names these files relative to the project root, where the runs start.
        write_chat_files(data, ROOT / size["chat_data"])
    # One thread on the CPU size: on a machine whose cores other processes share, two threads
    # wait at every op's barrier for a descheduled peer (steps measured 10x slower here), and the
    # runs' measured times must stay comparable with each other.
    threads = args.threads if args.threads is not None else size["threads"]
    have = available_strategies()
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in size["runs"]]
        if unknown:
            parser.error(f"--only: unknown run(s) {', '.join(unknown)} for --size {args.size}; choose from "
                         f"{', '.join(size['runs'])}")
        missing = [n for n in names if RUNS[n][0] not in have]
        if missing:
            parser.error(f"--only: strategy not available in this checkout for {', '.join(missing)}")
    else:
        names = [n for n in size["runs"] if RUNS[n][0] in have]
        skipped = [n for n in size["runs"] if n not in names]
        if skipped:
            print(f"not available in this checkout, skipped: {', '.join(skipped)}")

    command = "python -m bench.e2e " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(f"e2e {args.size}: {len(names)} runs into {out}/ ({', '.join(names)}); config {size['config']}, "
          f"data {data}, "
          + (f"{args.tflops:g} TFLOPS per party, " if args.client_tflops is None else
             f"{args.client_tflops:g} TFLOPS per client, {args.tflops:g} for the server, ")
          + f"{args.bandwidth_mbps:g} Mbit/s, {args.latency_ms:g} ms, "
          f"torch threads {threads or 'default'}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    entries, failed = run_series(names, lambda name: run_overrides(name, args, data, out), size["config"], args.size,
                                 out, threads, command)
    total = time.perf_counter() - t0
    entry = {"size": args.size, "config": size["config"], "last_command": command, "last_started_utc": started,
             "last_seconds": total}
    if args.target_loss is not None:
        entry["target_loss"] = args.target_loss
    update_suite(out / "suite.json", entry, entries)
    print(f"e2e {args.size}: {len(names) - len(failed)} of {len(names)} runs done in {total:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if args.report:
        from bench import report

        report_args = ["--runs", str(out)]
        if tweaked and args.out is None:
            # Quick tries are printed, never written into RESULTS.md or the plots.
            report_args.append("--no-write")
        if args.target_loss is not None:
            report_args += ["--target-loss", str(args.target_loss)]
        rc = report.main(report_args)
        if rc:
            return rc
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
