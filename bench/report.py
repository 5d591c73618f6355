"""The end-to-end results, regenerated from the run folders: never edit the section by hand.

    python -m bench.report                        # runs/e2e/ -> bench/RESULTS.md section + bench/plots/
    python -m bench.report --runs runs/e2e-gpu    # the GPU size (its own section and plot names)
    python -m bench.report --no-write             # print the section, touch nothing
    python -m bench.report --runs runs/quality    # the E2E quality runs (their own section, see below)

Reads every `<runs>/<name>/` holding config.yaml, summary.json and metrics.jsonl (and bench.json
from bench/e2e.py when present) and
  - replaces what lies between `<!-- e2e:begin -->` and `<!-- e2e:end -->` in bench/RESULTS.md
    (appends the markers at the end the first time; the rest of the file is left byte for byte);
  - writes PNG plots of held-out loss against steps, simulated time and measured time (one line
    per run) to bench/plots/<section>_*.png;
  - prints whether the issue's targets hold on this data.

Runs of a quality size (bench.e2e --size quality-cpu, quality-chat-cpu or quality-gpu, recorded in
suite.json) get a section of their own between `<!-- quality:begin -->` and `<!-- quality:end -->`
(`quality-chat` for the chat size, `quality-gpu` for the GPU size): per run BLEU, ROUGE-L, held-out loss and perplexity on the E2E test set, bytes at
the cut, steps and times, the SplitLoRA paper's BLEU for reference, a sample of what each run
generates, and bench/plots/<section>_scores.png.

Time to target: the first held-out evaluation (every `train.eval_every` steps, and at the end)
whose loss is at or below the target; its step, the simulated time there (the trainer's time
model) and the measured training time there (evaluation time excluded). The target is
`--target-loss`, else the one given to bench.e2e, else centralized's final held-out loss x
(1 + `--margin`). Runs whose config differs from the others in anything but the strategy, the
codec and the output folder (for example a `--steps 4` smoke run left behind) are left out and named.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import yaml

from splitlora.timemodel import SIM_LINK_KEYS, SimTime

ROOT = Path(__file__).resolve().parent.parent
# Keys that may differ between the runs of one comparison.
PER_RUN_KEYS = ("strategy", "output_dir", "codec", "resume")
KINDS = ("activations", "gradients", "labels", "adapters")


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_runs(runs_dir: Path) -> list:
    from bench.e2e import RUNS

    order = {name: i for i, name in enumerate(RUNS)}
    runs = []
    for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        files = [folder / f for f in ("config.yaml", "summary.json", "metrics.jsonl")]
        if not all(f.is_file() for f in files):
            continue
        bench_path = folder / "bench.json"
        generations = folder / "generations.jsonl"
        runs.append({
            "generations": _read_jsonl(generations) if generations.is_file() else None,
            "name": folder.name,
            "config": yaml.safe_load(files[0].read_text()),
            "summary": json.loads(files[1].read_text()),
            "metrics": _read_jsonl(files[2]),
            "bench": json.loads(bench_path.read_text()) if bench_path.is_file() else {},
        })
    runs.sort(key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    return runs


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and key != "model.config":
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _shared(cfg: dict) -> dict:
    flat = _flatten(cfg)
    return {k: v for k, v in flat.items() if k.split(".")[0] not in PER_RUN_KEYS}


def _declared(name: str) -> set:
    """Keys bench.e2e sets for this run on purpose (beyond strategy and codec)."""
    from bench.e2e import RUNS

    return {o.split("=", 1)[0] for o in RUNS.get(name, ("", []))[1]}


def split_consistent(runs: list) -> tuple:
    """(kept, excluded with reasons): runs must share every config key but the per-run ones and
    those bench.e2e sets for that run on purpose (which each kept run lists in r["differs"])."""
    if not runs:
        return [], []
    ref = next((r for r in runs if r["name"] == "centralized"), runs[0])
    base = _shared(ref["config"])
    kept, excluded = [], []
    for r in runs:
        mine = _shared(r["config"])
        diff = sorted(k for k in set(base) | set(mine) if base.get(k) != mine.get(k))
        undeclared = [k for k in diff if k not in _declared(r["name"])]
        if undeclared:
            excluded.append((r["name"], ", ".join(f"{k}={mine.get(k)!r} (vs {base.get(k)!r})" for k in undeclared[:3])))
        else:
            r["differs"] = {k: mine.get(k) for k in diff}
            kept.append(r)
    return kept, excluded


# --------------------------------------------------------------------------------------------
# Per-run figures
# --------------------------------------------------------------------------------------------

def bytes_by_side(summary: dict) -> dict:
    """Bytes summed over clients: cut (activations + gradients) and all kinds, up and down."""
    out = {"cut_up": 0, "cut_down": 0, "up": 0, "down": 0, "adapters": 0, "labels": 0}
    for client, dirs in summary.get("bytes", {}).items():
        if not isinstance(dirs, dict):
            continue
        for direction in ("up", "down"):
            kinds = dirs.get(direction, {})
            out[direction] += sum(kinds.values())
            out[f"cut_{direction}"] += kinds.get("activations", 0) + kinds.get("gradients", 0)
            out["adapters"] += kinds.get("adapters", 0)
            out["labels"] += kinds.get("labels", 0)
    out["cut"] = out["cut_up"] + out["cut_down"]
    return out


def curves(run: dict) -> dict:
    steps = [m for m in run["metrics"] if m.get("type") == "step"]
    wall_at = {m["step"]: m["wall_time_s"] for m in steps}
    evals = [m for m in run["metrics"] if m.get("type") == "eval"]
    return {
        "step": [m["step"] + 1 for m in evals],  # steps completed at the evaluation
        "loss": [m["eval_loss"] for m in evals],
        "sim": [m["sim_time_s"] for m in evals],
        # The link parts of each evaluation's simulated time (None in runs recorded before they were kept).
        "link": [tuple(m[k] for k in SIM_LINK_KEYS) if all(k in m for k in SIM_LINK_KEYS) else None for m in evals],
        "wall": [wall_at.get(m["step"], float("nan")) for m in evals],
        "train_step": [m["step"] + 1 for m in steps],
        "train_loss": [m["loss"] for m in steps],
    }


def last_mean(row: dict, k: int = 3) -> float:
    """Mean held-out loss of the last k evaluations: the final one alone moves with the noise."""
    losses = row["curves"]["loss"][-k:]
    return sum(losses) / len(losses)


def step_noise(row: dict, k: int = 5) -> str:
    """How much one run's held-out loss moves between consecutive evaluations at the end."""
    losses = row["curves"]["loss"][-k:]
    if len(losses) < 2:
        return "too few evaluations to tell the noise"
    moves = [abs(b - a) / a for a, b in zip(losses, losses[1:])]
    return (f"for scale, {row['name']}'s held-out loss moved by {sum(moves) / len(moves):.1%} on average "
            f"between consecutive evaluations over its last {len(losses)}")


def time_to_target(c: dict, target: float):
    for step, loss, sim, wall, link in zip(c["step"], c["loss"], c["sim"], c["wall"], c["link"]):
        if loss <= target:
            return {"step": step, "sim": sim, "wall": wall, "link": link}
    return None


# Links to re-price the simulated times at: (label, Mbit/s, ms). The configured link is added first.
LINK_SETTINGS = [("10 Mbit/s, 50 ms", 10.0, 50.0), ("1 Gbit/s, 1 ms", 1e3, 1.0), ("10 Gbit/s, 0.1 ms", 1e4, 0.1),
                 ("100 Gbit/s, 0.01 ms", 1e5, 0.01), ("free links", math.inf, 0.0)]


def repriced(sim: float, link, bandwidth_mbps: float, latency_ms: float):
    """Simulated seconds with every transfer at another link (splitlora.timemodel.SimTime.at), from
    the recorded (link seconds, messages, bits); None when they were not recorded."""
    if link is None or any(math.isnan(x) for x in link):
        return None
    link_s, messages, bits = link
    return SimTime(sim, messages=messages, bits=bits, link_seconds=link_s).at(bandwidth_mbps, latency_ms)


def link_sweep_lines(rows: list, target: float) -> list:
    """Time to target re-priced at other links: the runs are the same (the time model does not
    change training), only what each transfer costs changes."""
    net = rows[0]["run"]["config"]["network"]
    configured = (f"{net['bandwidth_mbps']:g} Mbit/s, {net['latency_ms']:g} ms (configured)",
                  net["bandwidth_mbps"], net["latency_ms"])
    settings = [configured] + [x for x in LINK_SETTINGS if x[1:] != configured[1:]]
    missing = [r["name"] for r in rows if r["hit"] and r["hit"]["link"] is None]
    hit_rows = [r for r in rows if r["hit"] and r["hit"]["link"] is not None]
    if not hit_rows:
        return []
    table = {r["name"]: [repriced(r["hit"]["sim"], r["hit"]["link"], bw, lat) for _, bw, lat in settings]
             for r in hit_rows}
    best = [min(v[i] for v in table.values()) for i in range(len(settings))]
    lines = [
        "Simulated seconds to the target at other links: each run's time to target re-priced with every "
        "transfer at the given bandwidth and latency (the same runs: the time model does not change training; "
        "each step and evaluation record keeps the link seconds, transfers and bits of its simulated time, "
        "`splitlora.timemodel.SimTime`; exact when the clients are alike, as here). Fastest per column in bold.",
        "",
        "| run | " + " | ".join(label for label, _, _ in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for name, values in table.items():
        cells = [f"**{fmt_s(v)}**" if v == best[i] else fmt_s(v) for i, v in enumerate(values)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    baselines = [b for b in ("centralized", "fedlora") if b in table]
    for name in ("splitlora-fp32", "splitlora-int8", "splitlora-int4-ef"):
        if name not in table or not baselines:
            continue
        parts = []
        for b in baselines:
            wins = [label for i, (label, _, _) in enumerate(settings) if table[name][i] < table[b][i]]
            parts.append(f"before {b} at: " + (", ".join(wins) if wins else "none of these links"))
        lines.append(f"- {name} reaches the target " + "; ".join(parts) + ".")
    if missing:
        lines.append(f"- Not re-priced (run recorded before the link parts were kept): {', '.join(missing)}.")
    return lines + [""]


def fp32_reference(runs: list, run: dict):
    """The uncompressed run a cut's bytes are compared with: same strategy at fp32, else splitlora-fp32."""
    same = [r for r in runs if r["summary"]["strategy"] == run["summary"]["strategy"] and r["summary"]["codec"] == "fp32"]
    if same:
        return same[0]
    return next((r for r in runs if r["name"] == "splitlora-fp32"), None)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------

def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def fmt_s(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_num(x, spec=".3f") -> str:
    return "-" if x is None else format(x, spec)


# How a run's config pads its batches and schedules its learning rate, in words (runs recorded
# before these keys existed padded every batch to the longest and kept the rate constant).
PADDING = {"batch": "each batch padded to its own longest sequence",
           "dataset": "every batch padded to the longest of the training set"}
LR_SCHEDULE = {"constant": "", "linear": " decaying linearly to 0", "cosine": " decaying along a cosine to 0"}


def describe_setting(cfg: dict, runs: list) -> str:
    m, d, t, lo, n, e = (cfg["model"], cfg["data"], cfg["train"], cfg["lora"], cfg["network"], cfg["eval"])
    mc = m.get("config") or {}
    if mc:
        shape = (f"{mc.get('model_type', '?')}-shaped model with random weights ({mc.get('n_layer', mc.get('num_hidden_layers'))} "
                 f"layers, d {mc.get('n_embd', mc.get('hidden_size'))}, {mc.get('n_head', mc.get('num_attention_heads'))} heads)")
    else:
        shape = f"model {m.get('name') or m.get('path')}"
    tok = "a word tokenizer built from the examples" if d["tokenizer"] is None else f"tokenizer {Path(d['tokenizer']).name}"
    return (
        f"Setting: a {shape}, {m['dtype']}, cut after block {m['cut_layer']}; E2E: train on "
        f"`{Path(d['train_path']).name}` ({'a sample of ' + str(d['num_train']) + ' lines' if d['num_train'] else 'every line'}), "
        f"held-out loss on `{Path(d['eval_path']).name}` (up to {d['num_eval']} lines, whole meaning representations "
        f"with all their references), {tok}, "
        f"max {d['max_length']} tokens ({PADDING[d.get('pad_to', 'dataset')]}); {t['clients']} clients "
        f"({d['partition']}), batch {t['batch_size']} per client, {t['steps']} steps, AdamW lr {t['lr']:g}"
        f"{LR_SCHEDULE[t.get('lr_schedule', 'constant')]}, FedAvg every {t['aggregate_every']} steps; "
        f"LoRA r {lo['client']['r']} "
        f"on client {lo['client']['target_modules']}, r {lo['server']['r']} on server {lo['server']['target_modules']}; "
        f"held-out loss every {t['eval_every']} steps; "
        + (f"BLEU and ROUGE-L at the end on the first {e['max_sources']} meaning representations (greedy, "
           f"{e['max_new_tokens']} new tokens, all references)" if e.get("generate", True) else
           "no BLEU or ROUGE-L (generation switched off, eval.generate false)")
        + f". Time model: clients "
        f"{n['client_tflops']:g} TFLOPS, server {n['server_tflops']:g} TFLOPS, links {n['bandwidth_mbps']:g} Mbit/s "
        f"with {n['latency_ms']:g} ms latency; seed {cfg['seed']}."
    )


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def analyse(runs: list, target: float) -> list:
    rows = []
    for r in runs:
        s = r["summary"]
        c = curves(r)
        b = bytes_by_side(s)
        ref = fp32_reference(runs, r)
        ratio = None
        if b["cut"] and ref is not None:
            ratio = bytes_by_side(ref["summary"])["cut"] / b["cut"]
        rows.append({"run": r, "name": r["name"], "summary": s, "curves": c, "bytes": b, "cut_ratio": ratio,
                     "hit": time_to_target(c, target), "bench": r["bench"]})
    return rows


def check_targets(rows: list, target: float) -> list:
    """Lines saying whether the issue's targets hold on this data."""
    by = {r["name"]: r for r in rows}
    lines = []
    for name in ("splitlora-fp32", "splitlora-int8", "splitlora-int4-ef"):
        if name not in by:
            continue
        mine = by[name]["hit"]
        parts, ok = [], mine is not None
        for other in ("fedlora", "centralized"):
            if other not in by:
                parts.append(f"{other} not run")
                ok = False
                continue
            theirs = by[other]["hit"]
            if mine is None:
                parts.append(f"{other} {'reaches it in ' + fmt_s(theirs['sim']) + ' s' if theirs else 'does not reach it either'}")
            elif theirs is None:
                parts.append(f"{other} does not reach it")
            else:
                parts.append(f"{other} {fmt_s(theirs['sim'])} s (step {theirs['step']}; {name} takes "
                             f"{mine['sim'] / theirs['sim']:.3g}x as long)")
                ok = ok and mine["sim"] < theirs["sim"]
        where = f"{fmt_s(mine['sim'])} s simulated (step {mine['step']})" if mine else "does not reach the target"
        lines.append(f"- {name} reaches the target in less simulated time than fedlora and centralized: "
                     f"**{'holds' if ok else 'does not hold'}**. {name}: {where}; " + "; ".join(parts) + ".")
    fp = by.get("splitlora-fp32")
    for name in ("splitlora-int8", "splitlora-int4-ef"):
        if fp is None or name not in by:
            continue
        q = by[name]
        ratio = q["cut_ratio"]
        l_fp, l_q = fp["summary"]["eval_loss"], q["summary"]["eval_loss"]
        rel = (l_q - l_fp) / l_fp
        if name == "splitlora-int8":
            ok = ratio is not None and ratio >= 4.0 and rel <= 0.01
            verdict = (f"bytes {'hold' if ratio is not None and ratio >= 4.0 else 'do not hold'}, "
                       f"loss {'holds' if rel <= 0.01 else 'does not hold'}")
            lines.append(
                f"- int8 cuts the bytes at the cut >= 4x against fp32 with a final held-out loss within 1%: "
                f"**{'holds' if ok else 'does not hold'}** ({verdict}). Measured {ratio:.2f}x "
                f"({fmt_bytes(fp['bytes']['cut'])} vs {fmt_bytes(q['bytes']['cut'])}: every packet carries a header "
                f"and one scale per group of {q['run']['config']['codec']['group_size']} values, so 8 bits "
                f"cannot reach 4.00x); final held-out loss {l_q:.4f} vs {l_fp:.4f} ({rel:+.2%}; mean of the "
                f"last 3 evaluations {last_mean(q):.4f} vs {last_mean(fp):.4f}, "
                f"{(last_mean(q) - last_mean(fp)) / last_mean(fp):+.2%}; {step_noise(fp)}).")
        else:
            lines.append(f"- {name}: {ratio:.2f}x fewer bytes at the cut than fp32, final held-out loss {l_q:.4f} vs "
                         f"{l_fp:.4f} ({rel:+.2%}; last 3 evaluations {last_mean(q):.4f} vs {last_mean(fp):.4f}, "
                         f"{(last_mean(q) - last_mean(fp)) / last_mean(fp):+.2%}).")
    return lines


def trainable_params(tp) -> str:
    """"client / server": LoRA strategies report one number per side; full-parameter and
    heterogeneous ones a record per client (the largest client is shown)."""
    if not isinstance(tp, dict):
        return "-"
    client, server = tp.get("client"), tp.get("server")
    if client is None and isinstance(tp.get("clients"), list):
        counts = [c.get("trainable_params") for c in tp["clients"] if isinstance(c, dict)]
        counts = [c for c in counts if isinstance(c, int)]
        client = max(counts) if counts else None
    fmt = lambda n: f"{n:,}" if isinstance(n, int) else "-"
    return f"{fmt(client)} / {fmt(server)}"


def tables(rows: list, target: float) -> str:
    out = ["| run | strategy | codec | held-out loss | last 3 evals | ppl | BLEU | ROUGE-L | steps to target "
           "| sim s to target | measured s to target | sim s total | measured s total |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, hit = r["summary"], r["hit"]
        out.append(
            f"| {r['name']} | {s['strategy']} | {s['codec']} | {s['eval_loss']:.4f} | {last_mean(r):.4f} "
            f"| {s['eval_ppl']:.2f} "
            f"| {fmt_num(s.get('bleu'), '.1f')} | {fmt_num(s.get('rouge_l'), '.1f')} "
            f"| {hit['step'] if hit else 'not reached'} | {fmt_s(hit['sim']) if hit else '-'} "
            f"| {fmt_s(hit['wall']) if hit else '-'} | {fmt_s(s['sim_time_s'])} | {fmt_s(s['wall_time_s'])} |")
    out += ["", "| run | cut up | cut down | cut vs fp32 | all up | all down | adapters | trainable params "
            "(client / server) | peak memory |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, s, bench = r["bytes"], r["summary"], r["bench"]
        params = trainable_params(s.get("trainable_params"))
        if bench.get("cuda_peak_bytes"):
            mem = f"{fmt_bytes(bench['cuda_peak_bytes'])} (CUDA)"
        elif bench.get("peak_rss_bytes"):
            mem = f"{fmt_bytes(bench['peak_rss_bytes'])} (RSS)"
        else:
            mem = "-"
        ratio = f"{r['cut_ratio']:.2f}x" if r["cut_ratio"] else "-"
        out.append(f"| {r['name']} | {fmt_bytes(b['cut_up'])} | {fmt_bytes(b['cut_down'])} | {ratio} "
                   f"| {fmt_bytes(b['up'])} | {fmt_bytes(b['down'])} | {fmt_bytes(b['adapters'])} | {params} | {mem} |")
    return "\n".join(out + memory_per_side_table(rows))


def _side_cells(side) -> list:
    if side is None:
        return ["-"] * 4
    return [fmt_bytes(side["weights_bytes"]), fmt_bytes(side["gradient_bytes"] + side["optimizer_bytes"]),
            fmt_bytes(side["activation_bytes"]) if side["activation_bytes"] is not None else "not measured here",
            f"**{fmt_bytes(side['total_bytes'])}**" if side["total_bytes"] is not None else "-"]


def memory_per_side_table(rows: list) -> list:
    """What one client and the server each hold during a step (splitlora.memory.side_memory)."""
    recorded = [r for r in rows if r["summary"].get("memory_per_side")]
    if not recorded:
        return []
    out = ["", "Memory per side (`summary.json` memory_per_side): what one device of that side holds during a "
           "training step: its weights (frozen and adapters), the adapters' gradients and optimizer state "
           "(counted from the tensors), and the activations its forward saved for the backward (measured, the "
           "peak over the run's steps). For the clients, the most demanding one. Centralized is one party, listed "
           "as the server; fedlora's clients each hold the whole model. No allocator overhead, workspace or "
           "packets in flight.", "",
           "| run | client weights | client grads + optimizer | client activations | client total | server weights "
           "| server grads + optimizer | server activations | server total |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r["summary"].get("memory_per_side")
        if mem is None:
            out.append(f"| {r['name']} | " + " | ".join(["-"] * 8) + " |")
            continue
        out.append(f"| {r['name']} | " + " | ".join(_side_cells(mem.get("client")) + _side_cells(mem.get("server")))
                   + " |")
    missing = [r["name"] for r in rows if not r["summary"].get("memory_per_side")]
    if missing:
        out += ["", f"Not reported per side: {', '.join(missing)} (FedCyBGD's per-client memory is in its "
                "summary's trainable_params; runs recorded before memory_per_side existed have none)."]
    return out


def time_model_note(rows: list) -> list:
    """Why the simulated times come out as they do: compute against link latency per step."""
    by = {r["name"]: r for r in rows}
    central = by.get("centralized")
    split = [r for r in rows if r["bytes"]["cut"]]
    if central is None or not split:
        return []
    net = central["run"]["config"]["network"]
    steps = central["summary"]["steps"]
    c_ms = 1e3 * central["summary"]["sim_time_s"] / steps
    per_step = ", ".join(f"{r['name']} {1e3 * r['summary']['sim_time_s'] / r['summary']['steps']:.3g} ms"
                         for r in rows if r["name"] != "centralized")
    return [f"Simulated time per step: centralized {c_ms:.3g} ms (the whole model on all clients' batches at "
            f"{net['server_tflops']:g} TFLOPS); {per_step}. Every step of a split strategy sends activations up "
            f"and gradients down, so it pays at least two link latencies ({2 * net['latency_ms']:g} ms) plus the "
            f"bytes at {net['bandwidth_mbps']:g} Mbit/s, whatever the model's size; at this model size that, not "
            "compute, decides the simulated times.", ""]


def machine_line(rows: list) -> str:
    machines = {json.dumps(r["bench"].get("machine"), sort_keys=True) for r in rows if r["bench"].get("machine")}
    if not machines:
        return "Machine: not recorded (runs without bench.json)."
    parts = []
    for text in sorted(machines):
        m = json.loads(text)
        gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
        threads = f"{m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''} per run"
        parts.append(f"{m['platform']}, CPU {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
                     f"({threads}), Python {m['python']}{gpu}")
    return "Machine: " + "; ".join(parts) + "."


def dates_line(rows: list) -> str:
    started = [r["bench"]["started_utc"] for r in rows if r["bench"].get("started_utc")]
    finished = [r["bench"]["finished_utc"] for r in rows if r["bench"].get("finished_utc")]
    loads = [r["bench"]["loadavg_start"][0] for r in rows if r["bench"].get("loadavg_start")]
    wall = sum(r["bench"].get("process_wall_s", 0.0) for r in rows)
    text = ""
    if started and finished:
        text = f"Date: {min(started)} to {max(finished)} (UTC); the runs took {wall:.0f} s of process time in all."
    if loads:
        text += (f" 1-minute load average when each run started: {min(loads):.2f} to {max(loads):.2f} "
                 f"(other processes were sharing the cores when it is above the core count; measured times "
                 f"are then slower and noisier).")
    return text


def provenance_lines(rows: list, commands) -> list:
    """What every generated section opens with: the commands that produced its runs, the machine,
    the dates (each line followed by a blank one)."""
    command = ("Command(s) that produced these runs: " + "; ".join(f"`{c}`" for c in commands) + "."
               if commands else "Command: not recorded.")
    return [command, "", machine_line(rows), "", dates_line(rows), ""]


def differs_lines(rows: list) -> list:
    """The settings some runs change on purpose (e.g. fedcybgd's learning rate), if any."""
    differ = [r for r in rows if r["run"].get("differs")]
    if not differ:
        return []
    return ["Set per run on purpose: " + "; ".join(
        f"{r['name']} " + ", ".join(f"{k}={v!r}" for k, v in r["run"]["differs"].items()) for r in differ) + ".", ""]


def excluded_lines(excluded: list) -> list:
    if not excluded:
        return []
    return ["Left out (config differs from the others): " + "; ".join(f"{n}: {why}" for n, why in excluded) + ".", ""]


def plot(rows: list, target: float, plots_dir: Path, prefix: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    specs = [("steps", "step", "steps", False), ("sim_time", "sim", "simulated time (s, time model)", True),
             ("measured_time", "wall", "measured training time (s)", False)]
    for suffix, key, xlabel, logx in specs:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for r in rows:
            c = r["curves"]
            xs = c[key]
            ax.plot(xs, c["loss"], marker="o", markersize=3, label=r["name"])
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"held-out loss vs {xlabel.split(' (')[0]}")
        fig.tight_layout()
        path = plots_dir / f"{prefix}_loss_vs_{suffix}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def section(rows, excluded, target, target_note, suite, plots, results_path) -> str:
    cfg = rows[0]["run"]["config"]
    size = suite.get("size", "cpu")
    title = "CPU size" if size == "cpu" else f"{size.upper()} size"
    commands = sorted({r["bench"].get("command") or suite.get("runs", {}).get(r["name"], {}).get("command", "")
                       for r in rows} - {""})
    lines = [
        f"## End to end: SplitLoRA against its baselines ({title}, `bench/e2e.py`)",
        "",
        "Generated by `python -m bench.report` from the run folders; do not edit by hand. Regenerate with "
        f"`python -m bench.e2e --size {size} && python -m bench.report{'' if size == 'cpu' else f' --runs runs/e2e-{size}'}` "
        f"(or `python -m bench.e2e --size {size} --report`).",
        "",
        *provenance_lines(rows, commands),
        describe_setting(cfg, [r["run"] for r in rows]),
        "",
        *differs_lines(rows),
        f"Target held-out loss: **{target:.4f}** ({target_note}). \"steps to target\": steps done at the first "
        f"held-out evaluation at or below it (evaluations every {cfg['train']['eval_every']} steps and at the end); "
        "\"sim s\": the trainer's time model; \"measured s\": training time on this machine (evaluations excluded). "
        "Cut bytes: activations up and gradients down, summed over clients and steps (labels and attention masks "
        "travel beside them and count in \"all\"); \"cut vs fp32\": the same strategy's fp32 cut bytes over this "
        "run's; \"adapters\": FedAvg uploads and downloads (also in \"all\"). Peak memory: of the whole process "
        "(every party runs in it): on a GPU the peak CUDA memory torch allocated (CUDA), else the peak resident "
        "set size (RSS).",
        "",
        tables(rows, target),
        "",
        *time_model_note(rows),
        *link_sweep_lines(rows, target),
        # Where the targets hold at other settings: bench.crossover's section (its finding, stated here).
        "Targets of issue 7 on this data, at this section's time model only (the setting above): at the real "
        "model shapes, split fine-tuning reaches the target before federated LoRA with clients weaker than the "
        "server on links fast enough, and before centralized LoRA only marginally and only against a 35.6-TFLOPS "
        "server, never against an H100-class one; the settings, with the factors, are in [Where split fine-tuning "
        "wins](#where-split-fine-tuning-wins-time-to-target-over-client-compute-and-links-benchcrossoverpy) "
        "(`python -m bench.crossover`).",
        "",
        *check_targets(rows, target),
        "",
    ]
    lines += excluded_lines(excluded)
    rel = [os.path.relpath(p, results_path.parent) for p in plots]
    if rel:
        lines += ["Plots: " + ", ".join(f"[{Path(p).stem}]({p})" for p in rel), ""]
        lines += [f"![held-out loss vs simulated time]({rel[1]})", ""]
    return "\n".join(lines)


def replace_section(path: Path, name: str, body: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.is_file() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text and text.index(begin) < text.index(end):
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    elif begin in text or end in text:
        raise SystemExit(f"{path}: found only one of {begin} / {end}; fix the markers by hand first")
    else:
        new = text + ("" if text.endswith("\n") or not text else "\n") + "\n" + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# The E2E quality section (bench.e2e --size quality-cpu / quality-gpu)
# --------------------------------------------------------------------------------------------

# The SplitLoRA paper's E2E table (arXiv 2407.00952): GPT-2 medium, LoRA r = 1, on the standard E2E
# split. Its BLEU for the runs that correspond to ours.
PAPER_BLEU = {"splitlora-fp32": ("SplitLoRA", 70.26), "centralized": ("centralized LoRA", 69.86),
              "fedlora": ("federated LoRA", 67.02)}
UNTRAINED = "pretrained"


def _cell(text: str, limit: int = 160) -> str:
    """Generated text inside a markdown table cell: one line, no column breaks, bounded length."""
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= limit else text[:limit] + " ..."


# What the chat size (bench.e2e --size quality-chat-cpu) changes, for its section.
CHAT_SETTING = (
    "Through the user-data path: `bench/e2e_chat.py` writes each E2E line as a JSON-lines conversation (a user turn "
    "\"Describe this restaurant in one sentence. Attributes: \" + the meaning representation, an assistant turn "
    "with the reference), read with HF datasets (`data.source: jsonl`, `data.format: chat`) and rendered with "
    "SmolLM2's own chat template (its default system turn included); the loss is on the assistant turn only "
    "(its text and `<|im_end|>`), generation stops at `<|im_end|>`. The held-out loss is per assistant token of "
    "the chat rendering, not comparable with the plain-prompt section's; BLEU and ROUGE-L are, on the same "
    "meaning representations.")


def describe_quality_setting(cfg: dict, n_mrs, n_lines) -> str:
    m, d, t, lo, e = cfg["model"], cfg["data"], cfg["train"], cfg["lora"], cfg["eval"]
    seqs = t["clients"] * t["batch_size"]
    sources = f"all {n_mrs}" if n_mrs is not None else "the"
    if not d["num_eval"]:
        held_out = "every line"
    else:
        picked = f"whole meaning representations with all their references, picked at random up to {d['num_eval']} lines"
        held_out = f"{n_lines} lines ({picked})" if n_lines is not None else picked
    return (
        f"Setting: model `{m.get('name') or m.get('path')}` ({m['dtype']}), cut after block {m['cut_layer']}; "
        f"fine-tuned on `{Path(d['train_path']).name}` "
        f"({'a sample of ' + str(d['num_train']) + ' lines' if d['num_train'] else 'every line available'}; "
        f"{t['steps']} steps of {t['clients']} clients x {t['batch_size']} sequences = {t['steps'] * seqs} sequences), "
        f"max {d['max_length']} tokens, AdamW lr {t['lr']:g}, warmup {t['warmup_steps']}, FedAvg every "
        f"{t['aggregate_every']} steps; LoRA r {lo['client']['r']} (alpha {lo['client']['alpha']:g}) on "
        f"{', '.join(lo['client']['target_modules'])} on the client side, r {lo['server']['r']} (alpha "
        f"{lo['server']['alpha']:g}) on {', '.join(lo['server']['target_modules'])} on the server side. Scored on "
        f"`{Path(d['eval_path']).name}`, read in the training file's form (meaning representations as "
        "`name : X | Type : pub`, references split into words as in valid.txt): "
        + held_out
        + f" for the held-out loss and perplexity (per target token, eos included); BLEU (sacrebleu, corpus) and ROUGE-L "
        f"(F1, best reference, mean) against all references of each meaning representation, on {sources} of "
        f"them, {'greedy' if e['num_beams'] == 1 else str(e['num_beams']) + '-beam'} decoding of up to "
        f"{e['max_new_tokens']} new tokens; seed {cfg['seed']}."
    )


def quality_rows(runs: list) -> list:
    rows = []
    for r in runs:
        s = r["summary"]
        b = bytes_by_side(s)
        ref = fp32_reference(runs, r)
        ratio = bytes_by_side(ref["summary"])["cut"] / b["cut"] if b["cut"] and ref is not None else None
        steps = [m for m in r["metrics"] if m.get("type") == "step"]
        rows.append({"run": r, "name": r["name"], "summary": s, "bytes": b, "cut_ratio": ratio, "bench": r["bench"],
                     "train_step": [m["step"] + 1 for m in steps], "train_loss": [m["loss"] for m in steps]})
    return rows


BOOTSTRAP_SAMPLES = 1000


def bleu_statistics(rows: list, baseline: str = "splitlora-fp32") -> dict:
    """From every run's decoded outputs (generations.jsonl): its BLEU's bootstrap 95% interval
    (sacrebleu, resampling the meaning representations) and, for each other fine-tuned run, the
    paired bootstrap p-value of its BLEU difference with `baseline` (sacrebleu's PairedTest).
    Empty when some run has no outputs, they are not for the same sources, or a run's outputs do
    not reproduce its recorded BLEU (then they are not that run's)."""
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    from splitlora.evaluate import corpus_bleu, reference_streams

    tuned = [r for r in rows if r["name"] != UNTRAINED]
    if not tuned or any(not r["run"].get("generations") for r in rows):
        return {}
    sources = [o["source"] for o in tuned[0]["run"]["generations"]]
    refs = [o["references"] for o in tuned[0]["run"]["generations"]]
    hyps = {}
    for r in rows:
        outputs = r["run"]["generations"]
        if [o["source"] for o in outputs] != sources:
            return {}
        hyps[r["name"]] = [o["hypothesis"] for o in outputs]
        recorded = r["summary"].get("bleu")
        if recorded is None or abs(corpus_bleu(hyps[r["name"]], refs) - recorded) > 1e-6:
            return {}
    streams = reference_streams(refs)
    stats = {"n_sources": len(sources), "ci": {}, "paired": {}, "baseline": baseline}
    for name, h in hyps.items():
        score = BLEU(force=True).corpus_score(h, streams, n_bootstrap=BOOTSTRAP_SAMPLES)
        stats["ci"][name] = (score._mean, score._ci)
    if baseline in hyps:
        others = [r["name"] for r in tuned if r["name"] != baseline]
        systems = [(baseline, hyps[baseline])] + [(n, hyps[n]) for n in others]
        _, results = PairedTest(systems, {"BLEU": BLEU(force=True, references=streams)}, references=None,
                                test_type="bs", n_samples=BOOTSTRAP_SAMPLES)()
        for name, result in zip(others, results["BLEU"][1:]):
            stats["paired"][name] = result.p_value
    return stats


def quality_table(rows: list, stats: dict | None = None) -> str:
    ci = (stats or {}).get("ci", {})
    out = ["| run | strategy | codec at the cut | steps | BLEU | " + ("BLEU bootstrap mean ± 95% CI | " if ci else "")
           + "ROUGE-L | held-out loss | perplexity | final train loss "
           "| cut bytes (up + down) | cut vs fp32 | training s | process s | paper BLEU (GPT-2 M, r 1) |",
           "|---|---|---|---|---|" + ("---|" if ci else "") + "---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, b = r["summary"], r["bytes"]
        paper = PAPER_BLEU.get(r["name"])
        ratio = f"{r['cut_ratio']:.2f}x" if r["cut_ratio"] else "-"
        train_loss = s.get("final_train_loss")
        out.append(
            f"| {r['name']} | {s['strategy'] if r['name'] != UNTRAINED else 'none (as loaded)'} | {s['codec']} | {s['steps']} "
            f"| {fmt_num(s.get('bleu'), '.2f')} | "
            + (f"{ci[r['name']][0]:.1f} ± {ci[r['name']][1]:.1f} | "
               if r["name"] in ci else ("- | " if ci else ""))
            + f"{fmt_num(s.get('rouge_l'), '.2f')} | {s['eval_loss']:.4f} "
            f"| {s['eval_ppl']:.2f} | {fmt_num(train_loss, '.4f')} | {fmt_bytes(b['cut']) if b['cut'] else '-'} | {ratio} "
            f"| {fmt_s(s.get('wall_time_s'))} | {fmt_s(r['bench'].get('process_wall_s'))} "
            f"| {f'{paper[1]:.2f} ({paper[0]})' if paper else '-'} |")
    return "\n".join(out)


def quality_checks(rows: list, stats: dict | None = None) -> list:
    """What the numbers say: did fine-tuning help, how the runs order against the paper's table,
    and what compression at the cut cost."""
    by = {r["name"]: r for r in rows}
    lines = []
    base = by.get(UNTRAINED)
    tuned = [r for r in rows if r["name"] != UNTRAINED]
    if base is not None and tuned:
        b = base["summary"]
        better = [r for r in tuned if (r["summary"].get("bleu") or 0) > (b.get("bleu") or 0)
                  and r["summary"]["eval_loss"] < b["eval_loss"]]
        lines.append(
            f"- Every fine-tuned run has a higher BLEU and a lower held-out loss than the model before fine-tuning: "
            f"**{'holds' if len(better) == len(tuned) else 'does not hold'}**. Before: BLEU {fmt_num(b.get('bleu'), '.2f')}, "
            f"ROUGE-L {fmt_num(b.get('rouge_l'), '.2f')}, held-out loss {b['eval_loss']:.4f} (perplexity {b['eval_ppl']:.2f}); "
            f"after: BLEU {min(r['summary'].get('bleu') or 0 for r in tuned):.2f} to "
            f"{max(r['summary'].get('bleu') or 0 for r in tuned):.2f}, held-out loss "
            f"{min(r['summary']['eval_loss'] for r in tuned):.4f} to {max(r['summary']['eval_loss'] for r in tuned):.4f}.")
    present = [n for n in ("splitlora-fp32", "centralized", "fedlora") if n in by]
    if len(present) == 3:
        ours = ", ".join(f"{n} {by[n]['summary'].get('bleu') or 0:.2f}" for n in
                         sorted(present, key=lambda n: -(by[n]["summary"].get("bleu") or 0)))
        paper = ", ".join(f"{PAPER_BLEU[n][0]} {PAPER_BLEU[n][1]:.2f}" for n in present)
        # Strictly in the paper's order (a tie is not the paper's order).
        ranked = sorted(present, key=lambda n: -PAPER_BLEU[n][1])
        bleu = {n: by[n]["summary"].get("bleu") or 0 for n in present}
        same = all(bleu[a] > bleu[b] for a, b in zip(ranked, ranked[1:]))
        lines.append(f"- BLEU order of SplitLoRA (fp32), centralized and federated LoRA, here: {ours}; in the paper: "
                     f"{paper} (the same order: **{'yes' if same else 'no'}**). Held-out loss here: "
                     + ", ".join(f"{n} {by[n]['summary']['eval_loss']:.4f}" for n in present) + ".")
    paired = (stats or {}).get("paired", {})
    if paired:
        base = stats["baseline"]
        b = by[base]["summary"].get("bleu") or 0
        parts = [f"{n} {(by[n]['summary'].get('bleu') or 0) - b:+.2f} (p = {p:.3f})" for n, p in paired.items()]
        significant = [n for n, p in paired.items() if p < 0.05]
        lines.append(f"- Is a BLEU difference with {base} more than noise? Paired bootstrap over the "
                     f"{stats['n_sources']} meaning representations ({BOOTSTRAP_SAMPLES} resamples, sacrebleu): "
                     + "; ".join(parts) + ". "
                     + (f"Below 0.05: {', '.join(significant)}." if significant else
                        "None is below 0.05: on this subset the fine-tuned runs' BLEU scores are not told apart."))
    fp = by.get("splitlora-fp32")
    for name in ("splitlora-int8", "splitlora-int4-ef"):
        if fp is None or name not in by:
            continue
        q, f = by[name]["summary"], fp["summary"]
        rel = (q["eval_loss"] - f["eval_loss"]) / f["eval_loss"]
        ratio = by[name]["cut_ratio"]
        lines.append(f"- {name} against splitlora-fp32: {fmt_num(ratio, '.2f')}x fewer bytes at the cut, BLEU "
                     f"{fmt_num(q.get('bleu'), '.2f')} vs {fmt_num(f.get('bleu'), '.2f')} "
                     f"({(q.get('bleu') or 0) - (f.get('bleu') or 0):+.2f}), held-out loss {q['eval_loss']:.4f} vs "
                     f"{f['eval_loss']:.4f} ({rel:+.2%}).")
    return lines


def quality_samples(rows: list) -> list:
    """The first meaning representation every run decoded, and what each run made of it."""
    first = [r["summary"].get("samples") or [] for r in rows]
    if not all(first):
        return []
    source = first[0][0]["source"]
    if any(f[0]["source"] != source for f in first):
        return []
    # A chat prompt is the whole rendered template: one line here, newlines shown as \n.
    lines = [f"What each run generates for the first meaning representation, `{_cell(source, 400)}` "
             f"({len(first[0][0]['references'])} references; one of them: \"{first[0][0]['references'][0]}\"):", "",
             "| run | generated (greedy, up to the eos or the token limit) |", "|---|---|"]
    for r, f in zip(rows, first):
        lines.append(f"| {r['name']} | {_cell(f[0]['hypothesis']) or '(nothing: eos first)'} |")
    return lines + [""]


def quality_plot(rows: list, plots_dir: Path, prefix: str) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in rows]
    xs = range(len(rows))
    width = 0.38
    left.bar([x - width / 2 for x in xs], [r["summary"].get("bleu") or 0 for r in rows], width, label="BLEU")
    left.bar([x + width / 2 for x in xs], [r["summary"].get("rouge_l") or 0 for r in rows], width, label="ROUGE-L")
    paper = [(x, PAPER_BLEU[n][1]) for x, n in zip(xs, names) if n in PAPER_BLEU]
    if paper:
        left.scatter([x - width / 2 for x, _ in paper], [v for _, v in paper], marker="_", s=400, color="black",
                     zorder=3, label="paper BLEU (GPT-2 M, r 1)")
    left.set_xticks(list(xs))
    left.set_xticklabels(names, rotation=25, ha="right", fontsize=8)
    left.set_ylabel("score (0-100)")
    left.set_ylim(0, 90)  # room above the paper's markers for the legend
    left.set_title("BLEU and ROUGE-L on the E2E test subset")
    left.grid(axis="y", alpha=0.3)
    left.legend(fontsize=8, loc="upper center", ncol=3)
    window = rows[0]["run"]["config"]["train"]["log_every"]
    for r in rows:
        if r["train_step"]:
            # One step's loss is one batch's (6 sequences here) and swings by +-0.5: show a moving mean.
            losses = r["train_loss"]
            smooth = [sum(losses[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window))
                      for i in range(len(losses))]
            line, = right.plot(r["train_step"], smooth, linewidth=1.2, alpha=0.9, label=f"{r['name']} (train)")
            right.scatter([r["summary"]["steps"]], [r["summary"]["eval_loss"]], color=line.get_color(), zorder=3)
        elif r["name"] == UNTRAINED:
            right.axhline(r["summary"]["eval_loss"], color="gray", linestyle="--", linewidth=1,
                          label=f"{UNTRAINED}: held-out loss")
    right.set_xlabel("step")
    right.set_ylabel("loss per target token")
    right.set_title(f"training loss (mean of the last {window} steps) and final held-out loss (dots)", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    path = plots_dir / f"{prefix}_scores.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return [path]


def quality_section(rows, excluded, suite, plots, results_path, runs_arg: str, stats: dict | None = None) -> str:
    cfg = rows[0]["run"]["config"]
    size = suite.get("size", "quality-cpu")
    where = "GPU, the full test set" if size == "quality-gpu" else "CPU, a subset"
    chat = cfg["data"].get("format") == "chat"
    if chat:
        where += ", E2E as chat data through the model's chat template"
    commands = sorted({r["bench"].get("command") or "" for r in rows} - {""})
    stats = bleu_statistics(rows) if stats is None else stats
    n_lines = n_mrs = None
    try:
        from splitlora.data import load_dataset

        d = cfg["data"]
        _, evals = load_dataset(d["source"], train_path=d["train_path"], eval_path=d["eval_path"],
                                num_train=1, num_eval=d["num_eval"], seed=cfg["seed"])
        n_lines, n_mrs = len(evals), min(len({e.source for e in evals}), cfg["eval"]["max_sources"])
    except (OSError, ValueError):
        pass  # the data is not here: the description says "up to" instead of the counts
    lines = [
        f"## E2E quality: SmolLM2-135M fine-tuned with LoRA ({where}, `bench/e2e.py --size {size}`)",
        "",
        f"Generated by `python -m bench.report --runs {runs_arg}` from the run folders; do not edit by hand. "
        f"Rerun and regenerate with `python -m bench.e2e --size {size} --report`.",
        "",
        *provenance_lines(rows, commands),
        describe_quality_setting(cfg, n_mrs, n_lines),
        "",
        *differs_lines(rows),
        *([CHAT_SETTING, ""] if chat else []),
        f"`{UNTRAINED}` is the model as loaded, evaluated in the same way with no training step (its adapters start "
        "with B = 0 and add nothing), prompted as the fine-tuned runs are ("
        + ("the chat template, the instruction and the meaning representation): it shows how far the instruction "
           "alone gets the model. " if chat else
           "the meaning representation and ` ||`, no chat template or instruction): it shows what fine-tuning taught, "
           "not how well the model follows instructions. ") +
        "Cut bytes: activations up and gradients down over the whole run, summed "
        "over clients; \"cut vs fp32\": splitlora-fp32's over this run's. \"final train loss\": mean of the last "
        f"{cfg['train']['log_every']} steps. The paper's BLEU is for reference only: GPT-2 medium on the standard E2E "
        "split, whose 42k-example training set is not in this workplace; not this model, data or budget.",
        "",
        quality_table(rows, stats),
        "",
        "What the numbers say:",
        "",
        *quality_checks(rows, stats),
        "",
        *quality_samples(rows),
    ]
    lines += excluded_lines(excluded)
    rel = [os.path.relpath(p, results_path.parent) for p in plots]
    if rel:
        lines += [f"![BLEU, ROUGE-L and losses per run]({rel[0]})", ""]
    return "\n".join(lines)


def quality_main(args, runs_dir: Path, suite: dict) -> int:
    runs, excluded = split_consistent(load_runs(runs_dir))
    if not runs:
        raise SystemExit(f"no complete run in {runs_dir} (each needs config.yaml, summary.json, metrics.jsonl)")
    for r in runs:
        r["bench"].setdefault("command", suite.get("runs", {}).get(r["name"], {}).get("command"))
    rows = quality_rows(runs)
    # quality-cpu -> quality, quality-gpu -> quality-gpu, quality-chat-cpu -> quality-chat.
    size = suite.get("size", "quality-cpu")
    name = args.section or {"quality-cpu": "quality", "quality-chat-cpu": "quality-chat"}.get(size, size)
    results_path = ROOT / args.results
    plots = [] if args.no_write else quality_plot(rows, ROOT / args.plots, name)
    stats = bleu_statistics(rows)
    body = quality_section(rows, excluded, suite, plots, results_path, args.runs, stats)
    if args.no_write:
        print(body)
    else:
        replace_section(results_path, name, body)
        print(f"wrote the {name} section of {results_path.relative_to(ROOT)} and {len(plots)} plot in {args.plots}/")
        print()
        print(quality_table(rows, stats))
        print()
        for line in quality_checks(rows, stats):
            print(line.replace("**", ""))
    for n, why in excluded:
        print(f"left out {n}: {why}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="runs/e2e", help="folder of the run folders (default runs/e2e)")
    parser.add_argument("--results", default="bench/RESULTS.md")
    parser.add_argument("--plots", default="bench/plots")
    parser.add_argument("--section", default=None, help="marker name (default e2e; e2e-gpu for the GPU size; quality "
                        "and quality-gpu for the quality sizes)")
    parser.add_argument("--target-loss", type=float, default=None)
    parser.add_argument("--margin", type=float, default=0.05,
                        help="target = centralized's final held-out loss x (1 + margin) (default 0.05)")
    parser.add_argument("--no-write", action="store_true", help="print the section; write neither RESULTS.md nor plots")
    args = parser.parse_args(argv)

    runs_dir = (ROOT / args.runs) if not Path(args.runs).is_absolute() else Path(args.runs)
    if not runs_dir.is_dir():
        raise SystemExit(f"no run folder {runs_dir}; run python -m bench.e2e first")
    suite_path = runs_dir / "suite.json"
    suite = json.loads(suite_path.read_text()) if suite_path.is_file() else {}
    if str(suite.get("size", "")).startswith("quality"):
        return quality_main(args, runs_dir, suite)
    runs, excluded = split_consistent(load_runs(runs_dir))
    if not runs:
        raise SystemExit(f"no complete run in {runs_dir} (each needs config.yaml, summary.json, metrics.jsonl)")
    for r in runs:
        entry = suite.get("runs", {}).get(r["name"], {})
        r["bench"].setdefault("command", entry.get("command"))

    central = next((r for r in runs if r["name"] == "centralized"), None)
    if args.target_loss is not None:
        target, note = args.target_loss, "given with --target-loss"
    elif suite.get("target_loss") is not None:
        target, note = suite["target_loss"], "given to bench.e2e with --target-loss"
    elif central is not None:
        final = central["summary"]["eval_loss"]
        target, note = final * (1 + args.margin), f"centralized's final held-out loss {final:.4f} + {args.margin:.0%}"
    else:
        best = min(r["summary"]["eval_loss"] for r in runs)
        target, note = best * (1 + args.margin), f"no centralized run: the best final held-out loss {best:.4f} + {args.margin:.0%}"

    rows = analyse(runs, target)
    name = args.section or ("e2e" if suite.get("size", "cpu") == "cpu" else f"e2e-{suite['size']}")
    results_path = ROOT / args.results
    plots = []
    if not args.no_write:
        plots = plot(rows, target, ROOT / args.plots, name)
    body = section(rows, excluded, target, note, suite, plots, results_path)
    if args.no_write:
        print(body)
    else:
        replace_section(results_path, name, body)
        print(f"wrote the {name} section of {results_path.relative_to(ROOT)} and {len(plots)} plots in {args.plots}/")
        print()
        print(tables(rows, target))
    print()
    print(f"target held-out loss {target:.4f} ({note})")
    for line in check_targets(rows, target):
        print(line.replace("**", ""))
    for n, why in excluded:
        print(f"left out {n}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
