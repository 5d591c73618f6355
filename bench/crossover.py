"""Where split fine-tuning wins: time to target over client compute and links.

    python -m bench.crossover               # bench/plots/crossover_<shape>.png + the crossover section of RESULTS.md
    python -m bench.crossover --no-write    # print the section, touch nothing

For each model shape (GPT-2 medium, the SplitLoRA paper's model, cut after block 3; a Llama-1B
and a Llama-7B shape, cut after block 2), a heat map of splitlora's time to the target (fp32 and
int8 at the cut) over fedlora's and over centralized's, across client compute from 0.5 to
35.6 TFLOPS and links from 10 Mbit/s with 50 ms to 10 Gbit/s with 0.1 ms, with the server at
35.6 TFLOPS (the SplitLoRA paper's setting) and at 989 TFLOPS (an H100's dense bf16). The line
where the ratio is 1 (split starts to win) is drawn on each map.

How a time to target is priced, without training again:
  - Steps to the target come from recorded runs: the run folders of `bench.e2e` (runs/e2e, the CPU
    size, and runs/e2e-gpu, the GPU size) when they are on disk, else bench/crossover_steps.json,
    the counts bench/RESULTS.md records for those sizes (with where they came from). The step count
    is a property of training (data, model, strategy); the setting below only prices it.
  - Each step's flops per party and bytes at the cut are counted at the real shape, as the trainer's
    time model counts them (splitlora.timemodel: 2 flops per multiply-add of every matrix weight a
    token passes through, LoRA adapters included; attention's scores and weighted values
    4 x tokens x seq x hidden per layer, the causal half not discounted; training with a frozen
    base = 2 forwards: forward plus input-gradient backward, `train_flops`), plus the LM head's
    matrix (2 x tokens x hidden x vocab), which the trainer leaves out of a tied GPT-2 head.
  - The bytes at the cut are the trainer's packets' (the codec's `packed_size`; float32 and the
    labels and mask in `pack_tensors`' safetensors packets); the FedAvg rounds count the adapters'
    float32 bytes without their packet's header.
  - The step is composed as the strategies compose it (splitlora.strategies: `_simulated_step` of
    SplitLoRA, FedLoRA's and Centralized's `train_step`, the FedAvg round of `_fedavg_round`) into a
    `splitlora.timemodel.SimTime` that keeps its flops per party and its link parts, and
    `SimTime.at(bandwidth, latency, client_tflops, server_tflops)` prices it at every point of the
    map: the same re-pricing that, for a recorded run, gives exactly what a run trained at the other
    setting simulates (tests/bench_reports/test_crossover.py).

Assumptions (said again in the section): homogeneous clients (every client the same device, link
and batch, so the re-pricing is exact; with unlike clients the slowest one sets each phase and this
is an estimate); 4 clients of 4 sequences x 512 tokens each per step, FedAvg every 10 steps (the
CPU size's clients, batch and FedAvg spacing, at the papers' sequence length); LoRA r 8 on the
attention's query/value projections (GPT-2: c_attn) and the LM head; int8 at the cut with one
float32 scale per 64 values, gradients coded as the activations; centralized trains the union of
the clients' batches on the server and its data is already there (the one-off upload of raw
tokens, 2 bytes a token, is left out: it is paid once, not per step); embedding lookups,
optimizer steps, softmax/norms and the server's FedAvg arithmetic cost nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitlora.codec import packed_size
from splitlora.timemodel import SimTime, TimeModel, train_flops

ROOT = Path(__file__).resolve().parent.parent
STEPS_FILE = Path(__file__).resolve().parent / "crossover_steps.json"
SECTION = "crossover"

# The map's axes. Client TFLOPS: log-spaced, with rough device classes as ticks (fp32/bf16 dense
# throughput orders of magnitude, not a benchmark of any one device).
CLIENT_TFLOPS = (0.5, 35.6)
DEVICE_TICKS = [(0.5, "phone\n0.5"), (4.0, "laptop\n4"), (12.0, "workstation\n12"), (35.6, "data-centre\nGPU 35.6")]
# Links: bandwidth and latency move together, log-spaced from the slow end to the fast end.
LINK_SLOW = (10.0, 50.0)      # Mbit/s, ms
LINK_FAST = (1e4, 0.1)
SERVER_TFLOPS = (35.6, 989.0)
GRID = 61


@dataclass(frozen=True)
class Shape:
    """A decoder's shape; `kv` is the width of the key and value projections (grouped-query
    attention makes it smaller than `hidden`)."""
    name: str
    label: str
    family: str         # "gpt2" or "llama"
    layers: int
    hidden: int
    mlp: int
    kv: int
    vocab: int
    cut: int            # blocks on the client (cut after block `cut`)


SHAPES = [
    Shape("gpt2-medium", "GPT-2 medium (24 layers, d 1024, cut after block 3)", "gpt2", 24, 1024, 4096, 1024, 50257, 3),
    Shape("llama-1b", "Llama-1B shape (Llama-3.2-1B: 16 layers, d 2048, MLP 8192, 8 KV heads, vocab 128256, "
          "cut after block 2)", "llama", 16, 2048, 8192, 512, 128256, 2),
    Shape("llama-7b", "Llama-7B shape (Llama-2-7B: 32 layers, d 4096, MLP 11008, vocab 32000, cut after block 2)",
          "llama", 32, 4096, 11008, 4096, 32000, 2),
]


@dataclass(frozen=True)
class Setting:
    clients: int = 4
    batch: int = 4            # sequences per client per step
    seq: int = 512
    aggregate_every: int = 10
    lora_r: int = 8
    group_size: int = 64


# --------------------------------------------------------------------------------------------
# Flops and bytes at the real shapes
# --------------------------------------------------------------------------------------------

def layer_matmul_params(shape: Shape, lora_r: int = 0) -> int:
    """Matrix weights of one decoder layer (what `timemodel.matmul_params` counts for it): GPT-2's
    c_attn (h x 3h), c_proj (h x h), c_fc (h x 4h), mlp c_proj (4h x h); Llama's q, k, v, o and
    gate, up, down. With `lora_r`, the adapters on the query/value projections too (GPT-2: c_attn)."""
    h = shape.hidden
    if shape.family == "gpt2":
        base = 3 * h * h + h * h + 2 * h * shape.mlp
        adapters = lora_r * (h + 3 * h)
    else:
        base = 2 * h * h + 2 * h * shape.kv + 3 * h * shape.mlp
        adapters = lora_r * (h + h) + lora_r * (h + shape.kv)
    return base + adapters


def layer_forward_flops(shape: Shape, rows: int, seq: int, lora_r: int = 0) -> float:
    """One layer's forward over rows x seq tokens, as `timemodel.forward_flops` counts it."""
    tokens = rows * seq
    return 2.0 * tokens * layer_matmul_params(shape, lora_r) + 4.0 * tokens * seq * shape.hidden


def head_forward_flops(shape: Shape, rows: int, seq: int, lora_r: int = 0) -> float:
    """The LM head's matrix (and its adapter) over rows x seq tokens."""
    return 2.0 * rows * seq * (shape.hidden * shape.vocab + lora_r * (shape.hidden + shape.vocab))


def adapter_bytes(shape: Shape, layers: int, lora_r: int, head: bool) -> int:
    """float32 LoRA adapters of `layers` layers (and the LM head's): what FedAvg moves each way."""
    per_layer = layer_matmul_params(shape, lora_r) - layer_matmul_params(shape, 0)
    return 4 * (layers * per_layer + (lora_r * (shape.hidden + shape.vocab) if head else 0))


def _safetensors_bytes(shapes: dict) -> int:
    """Bytes of `splitlora.wire.pack_tensors` for tensors of these {name: (shape, dtype)}: the
    safetensors header (its length depends on names and shapes) plus the data."""
    import torch

    from splitlora.wire import pack_tensors

    return pack_tensors({name: torch.zeros(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}).numel()


def cut_bytes(shape: Shape, setting: Setting, bits: int) -> tuple:
    """(bytes up, bytes down) of one client's step at the cut, as the trainer's packets hold them:
    its activations (rows x seq x hidden at `bits`: float32 in a safetensors packet, or the codec's
    packet with one float32 scale per group) plus the attention mask and labels (int64, a
    safetensors packet) up; the gradients, coded alike, down."""
    import torch

    rows_seq = (setting.batch, setting.seq)
    values = setting.batch * setting.seq * shape.hidden
    packet = (_safetensors_bytes({"x": ((*rows_seq, shape.hidden), torch.float32)}) if bits == 32
              else packed_size(values, bits=bits, group_size=setting.group_size))
    meta = _safetensors_bytes({"attention_mask": (rows_seq, torch.int64), "labels": (rows_seq, torch.int64)})
    return packet + meta, packet


def party_flops(shape: Shape, setting: Setting) -> dict:
    """Forward flops per step of each piece the strategies price: a client's blocks up to the cut
    over its batch, the server's rest over all clients' batches, the whole model over one client's
    batch (fedlora) and over all clients' (centralized)."""
    s, r = setting, setting.lora_r
    one, all_rows = s.batch, s.batch * s.clients
    return {
        "head": shape.cut * layer_forward_flops(shape, one, s.seq, r),
        "server": ((shape.layers - shape.cut) * layer_forward_flops(shape, all_rows, s.seq, r)
                   + head_forward_flops(shape, all_rows, s.seq, r)),
        "whole_client": (shape.layers * layer_forward_flops(shape, one, s.seq, r)
                         + head_forward_flops(shape, one, s.seq, r)),
        "whole_all": (shape.layers * layer_forward_flops(shape, all_rows, s.seq, r)
                      + head_forward_flops(shape, all_rows, s.seq, r)),
    }


# --------------------------------------------------------------------------------------------
# One step and one round, composed as the strategies compose them
# --------------------------------------------------------------------------------------------

# Any setting: SimTime.at re-prices every part; this one only gives the parts their recorded seconds.
_REFERENCE = TimeModel(client_tflops=35.6, server_tflops=35.6, bandwidth_mbps=100.0, latency_ms=10.0)


def step_and_round(strategy: str, shape: Shape, setting: Setting, bits: int = 32, tm: TimeModel = _REFERENCE) -> tuple:
    """(SimTime of one training step, SimTime of one FedAvg round) of `strategy`, with homogeneous
    clients (so every max() over clients is any one client's)."""
    f = party_flops(shape, setting)
    if strategy == "splitlora":
        # SplitLoRA._simulated_step: head forward + upload, the server's forward and backward over
        # the group, gradients down + the head's input-gradient backward (about one forward).
        up, down = cut_bytes(shape, setting, bits)
        head = tm.client_compute(f["head"])
        step = (head + tm.transfer(up)) + tm.server_compute(train_flops(f["server"])) + (tm.transfer(down) + head)
        adapters = adapter_bytes(shape, shape.cut, setting.lora_r, head=False)
        return step, tm.transfer(adapters) + tm.transfer(adapters)
    if strategy == "fedlora":
        step = tm.client_compute(train_flops(f["whole_client"]))
        adapters = adapter_bytes(shape, shape.layers, setting.lora_r, head=True)
        return step, tm.transfer(adapters) + tm.transfer(adapters)
    if strategy == "centralized":
        return tm.server_compute(train_flops(f["whole_all"])), SimTime(0.0)
    raise ValueError(f"no step model for strategy {strategy!r}")


def time_to_target(strategy: str, shape: Shape, setting: Setting, steps: int, bits: int = 32) -> SimTime:
    """Simulated time of `steps` steps and the FedAvg rounds that end within them (the trainer
    adds a round's time to the step that ends it)."""
    step, round_ = step_and_round(strategy, shape, setting, bits)
    total = SimTime(0.0)
    for _ in range(steps):
        total = total + step
    for _ in range(steps // setting.aggregate_every):
        total = total + round_
    return total


# --------------------------------------------------------------------------------------------
# Steps to target: run folders when present, else the recorded counts
# --------------------------------------------------------------------------------------------

RUNS = {"splitlora-fp32": ("splitlora", 32), "splitlora-int8": ("splitlora", 8), "fedlora": ("fedlora", 32),
        "centralized": ("centralized", 32)}


def steps_from_runs(runs_dir: Path, margin: float = 0.05):
    """{run: steps to target} from bench.e2e run folders (the target as bench.report sets it: the
    one given to bench.e2e, else centralized's final held-out loss + 5%), or None."""
    from bench import report

    if not runs_dir.is_dir():
        return None
    runs, _ = report.split_consistent(report.load_runs(runs_dir))
    by_name = {r["name"]: r for r in runs}
    if not all(n in by_name for n in RUNS):
        return None
    suite_path = runs_dir / "suite.json"
    suite = json.loads(suite_path.read_text()) if suite_path.is_file() else {}
    target = suite.get("target_loss") or by_name["centralized"]["summary"]["eval_loss"] * (1 + margin)
    steps = {}
    for name in RUNS:
        hit = report.time_to_target(report.curves(by_name[name]), target)
        steps[name] = hit["step"] if hit else None
    return {"source": f"run folders in {os.path.relpath(runs_dir, ROOT)} (target held-out loss {target:.4f})",
            "steps": steps}


def step_sources(runs_dirs=("runs/e2e", "runs/e2e-gpu")) -> list:
    """Per recorded size, where its steps to target come from and the counts."""
    recorded = json.loads(STEPS_FILE.read_text())
    out = []
    for size, runs_dir in zip(("cpu", "gpu"), runs_dirs):
        found = steps_from_runs(ROOT / runs_dir)
        entry = recorded["sizes"].get(size)
        if found is not None:
            out.append({"size": size, **found})
        elif entry is not None:
            out.append({"size": size, "source": f"{STEPS_FILE.name}: {entry['source']}", "steps": entry["steps"]})
    return out


# --------------------------------------------------------------------------------------------
# The maps
# --------------------------------------------------------------------------------------------

def axes(n: int = GRID):
    clients = np.geomspace(*CLIENT_TFLOPS, n)
    t = np.linspace(0.0, 1.0, n)
    bandwidth = LINK_SLOW[0] * (LINK_FAST[0] / LINK_SLOW[0]) ** t
    latency = LINK_SLOW[1] * (LINK_FAST[1] / LINK_SLOW[1]) ** t
    return clients, bandwidth, latency


def ratio_grid(split: SimTime, base: SimTime, server_tflops: float, n: int = GRID) -> np.ndarray:
    """split's time to target over base's, [link index, client index]."""
    clients, bandwidth, latency = axes(n)
    c = clients[None, :]
    bw, lat = bandwidth[:, None], latency[:, None]
    return split.at(bw, lat, c, server_tflops) / base.at(bw, lat, c, server_tflops)


PANELS = [("splitlora-fp32", "fedlora"), ("splitlora-fp32", "centralized"), ("splitlora-int8", "fedlora"),
          ("splitlora-int8", "centralized")]


def shape_results(shape: Shape, steps: dict, setting: Setting) -> dict:
    """Times to target (SimTime) per run at this shape."""
    return {name: time_to_target(strategy, shape, setting, steps[name], bits) for name, (strategy, bits) in RUNS.items()
            if steps.get(name)}


def link_label(bw: float, lat: float) -> str:
    bw_s = f"{bw / 1e3:.3g} Gbit/s" if bw >= 999.5 else f"{bw:.3g} Mbit/s"
    return f"{bw_s}, {lat:.2g} ms"


def plot_shape(shape: Shape, times: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    clients, bandwidth, latency = axes()
    fig, grid = plt.subplots(len(SERVER_TFLOPS), len(PANELS), figsize=(4.2 * len(PANELS), 3.9 * len(SERVER_TFLOPS)),
                             sharex=True, sharey=True, constrained_layout=True)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-2.0, vmax=2.0)
    mesh = None
    for i, server in enumerate(SERVER_TFLOPS):
        for j, (split, base) in enumerate(PANELS):
            ax = grid[i, j]
            if split not in times or base not in times:
                ax.set_axis_off()
                continue
            z = np.log10(ratio_grid(times[split], times[base], server))
            mesh = ax.pcolormesh(clients, np.arange(len(bandwidth)), np.clip(z, -2, 2), cmap="RdBu_r", norm=norm,
                                 shading="auto")
            if z.min() < 0 < z.max():
                cs = ax.contour(clients, np.arange(len(bandwidth)), z, levels=[0.0], colors="k", linewidths=2)
                ax.clabel(cs, fmt={0.0: "1x"}, fontsize=7)
            ax.set_xscale("log")
            ax.set_title(f"{split} / {base}\nserver {server:g} TFLOPS", fontsize=9)
            if i == len(SERVER_TFLOPS) - 1:
                ax.set_xticks([t for t, _ in DEVICE_TICKS])
                ax.set_xticklabels([lbl for _, lbl in DEVICE_TICKS], fontsize=7)
                ax.set_xlabel("client TFLOPS")
            if j == 0:
                idx = [0, len(bandwidth) // 3, 2 * len(bandwidth) // 3, len(bandwidth) - 1]
                ax.set_yticks(idx)
                ax.set_yticklabels([link_label(bandwidth[k], latency[k]) for k in idx], fontsize=7)
                ax.set_ylabel("link (bandwidth, latency)")
    if mesh is not None:
        bar = fig.colorbar(mesh, ax=grid, shrink=0.8)
        bar.set_label("log10(split time to target / baseline's)\nblue: split sooner, red: later")
    fig.suptitle(f"{shape.label}: time to target, splitlora over the baseline", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The table of reading and the section
# --------------------------------------------------------------------------------------------

def fmt_factor(r: float) -> str:
    f = 1 / r if r < 1 else r
    return (f"{f:.2f}" if f < 2 else f"{f:.2g}") + ("x sooner" if r < 1 else "x later")


def reading(shape: Shape, times: dict, server: float, split: str, base: str) -> dict:
    """Where split wins on one map: its share of the map, the factor at the corners, the weakest
    client at which it loses at the fastest link and the slowest link at which it still wins with
    phone-class clients."""
    clients, bandwidth, latency = axes()
    r = ratio_grid(times[split], times[base], server)
    wins = r < 1
    fast_row, slow_row = r[-1], r[0]
    out = {"share": float(wins.mean()), "best": float(r.min()),
           "phone_fast": float(r[-1, 0]), "phone_slow": float(r[0, 0]), "gpu_fast": float(r[-1, -1]),
           "gpu_slow": float(r[0, -1])}
    # The client TFLOPS at which split wins at the fastest link.
    winning = clients[fast_row < 1]
    out["clients_win"] = (float(winning.min()), float(winning.max())) if winning.size else None
    # The slowest link at which split still wins with the weakest clients.
    rows = np.nonzero(r[:, 0] < 1)[0]
    out["slowest_link"] = link_label(bandwidth[rows.min()], latency[rows.min()]) if rows.size else None
    out["slow_link_wins"] = bool(slow_row.min() < 1)
    out["slow_link_wins_phone"] = bool(rows.size and rows.min() == 0)
    return out


def reading_cell(x: dict) -> str:
    if x["share"] == 0:
        return f"never (best {fmt_factor(x['best'])})"
    if x["share"] == 1:
        return f"everywhere ({fmt_factor(x['phone_fast'])} with phones at 10 Gbit/s)"
    parts = []
    if x["clients_win"] is not None:
        lo, hi = x["clients_win"]
        which = ("of every speed on the map" if (lo, hi) == CLIENT_TFLOPS else
                 f"up to {hi:.2g}" if lo == CLIENT_TFLOPS[0] else f"from {lo:.2g}" if hi == CLIENT_TFLOPS[1]
                 else f"of {lo:.2g} to {hi:.2g}")
        parts.append(f"at 10 Gbit/s with clients {which} TFLOPS")
    if x["slowest_link"] is not None:
        parts.append("with 0.5-TFLOPS clients at every link on the map" if x["slow_link_wins_phone"]
                     else f"with 0.5-TFLOPS clients from {x['slowest_link']}")
    return (f"{x['share']:.0%} of the map: " + "; ".join(parts)
            + f" (phones at 10 Gbit/s: {fmt_factor(x['phone_fast'])}; data-centre clients at 10 Gbit/s: "
              f"{fmt_factor(x['gpu_fast'])})")


def step_lines(shape: Shape, setting: Setting) -> str:
    f = party_flops(shape, setting)
    up32, _ = cut_bytes(shape, setting, 32)
    up8, _ = cut_bytes(shape, setting, 8)
    return (f"| {shape.name} | {train_flops(f['head']) / 1e12:.3g} | {train_flops(f['server']) / 1e12:.3g} | "
            f"{train_flops(f['whole_client']) / 1e12:.3g} | {train_flops(f['whole_all']) / 1e12:.3g} | "
            f"{up32 / 2**20:.1f} / {up8 / 2**20:.1f} MiB | "
            f"{adapter_bytes(shape, shape.cut, setting.lora_r, False) / 2**20:.2f} / "
            f"{adapter_bytes(shape, shape.layers, setting.lora_r, True) / 2**20:.2f} MiB |")


def section(sources: list, setting: Setting, plots: dict, results_path: Path) -> str:
    src = sources[0]
    steps = src["steps"]
    lines = [
        "## Where split fine-tuning wins: time to target over client compute and links (`bench/crossover.py`)",
        "",
        "Generated by `python -m bench.crossover`; do not edit by hand. Each map prices, at a real model shape, the "
        "steps to the target that recorded runs took (no training again): splitlora's time to target over "
        "fedlora's and centralized's, across client compute (x axis) and links (y axis, bandwidth and latency "
        "together), server at 35.6 and at 989 TFLOPS (rows). Blue: split reaches the target sooner; the black line "
        "is where it starts to win.",
        "",
        "Steps to target (" + "; ".join(
            f"{s['size'].upper()} size: " + ", ".join(f"{n} {v}" for n, v in s["steps"].items())
            + f", from {s['source']}" for s in sources) + "). The maps use the "
        f"{src['size'].upper()} size's counts; "
        + ("every run reached the target at the same step in each size, so the maps are ratios of time per step "
           "(with the FedAvg rounds) and the other size's counts give the same maps."
           if all(len(set(s["steps"].values())) == 1 for s in sources) else
           "the other size's counts differ; rerun with them to compare."),
        "",
        f"Per step, at {setting.clients} clients x {setting.batch} sequences x {setting.seq} tokens, LoRA r "
        f"{setting.lora_r} on the query/value projections and the LM head, FedAvg every {setting.aggregate_every} "
        "steps (Tflop = 1e12 flops; training = forward + input-gradient backward, `timemodel.train_flops`):",
        "",
        "| shape | client to the cut (splitlora) | server rest (splitlora, all clients) | fedlora client (whole model) "
        "| centralized (whole model, all clients) | one client's upload, fp32 / int8 | adapters each way, splitlora / "
        "fedlora |",
        "|---|---|---|---|---|---|---|",
        *[step_lines(s, setting) for s in SHAPES],
        "",
        "How it is priced: flops per party and bytes at the cut counted at the real shape as the trainer's time "
        "model counts them (plus the LM head's matrix), each step composed as the strategies compose it into a "
        "`SimTime`, and `SimTime.at(bandwidth, latency, client_tflops, server_tflops)` at each point. Re-pricing a "
        "recorded run this way gives exactly what a run trained at the other setting simulates when the clients "
        "are alike, and at a tiny Llama shape the step composed here has the flops per party, transfers and bits "
        "of the step the trainer simulates (both tested: `tests/bench_reports/test_crossover.py`); the FedAvg "
        "rounds count the adapters' float32 bytes without their packet's header. **Estimates**: with unlike "
        "clients (each "
        "padding its batch to its own length, other devices or links) the slowest client at the recorded setting "
        "is held as the critical path; the flop counts price compute at peak TFLOPS (no utilisation, no memory "
        "bandwidth, no overlap of compute with transfers); the steps to target were measured on small models "
        "(CPU size: 4 layers, d 128; GPU size: GPT-2 medium shape, 100 steps, random weights) and are carried "
        "to the real shapes. Centralized's data is taken to be on the server already (its one-off upload is not "
        "counted); int8 codes gradients as well as activations, one float32 scale per 64 values.",
        "",
    ]
    for shape in SHAPES:
        times = shape_results(shape, steps, setting)
        lines += [f"### {shape.label}", ""]
        if shape.name in plots:
            rel = os.path.relpath(plots[shape.name], results_path.parent)
            lines += [f"![time to target, {shape.name}]({rel})", ""]
        lines += ["| server | splitlora-fp32 vs fedlora | splitlora-fp32 vs centralized | splitlora-int8 vs fedlora "
                  "| splitlora-int8 vs centralized |", "|---|---|---|---|---|"]
        for server in SERVER_TFLOPS:
            cells = [reading_cell(reading(shape, times, server, a, b)) for a, b in PANELS]
            lines.append(f"| {server:g} TFLOPS | " + " | ".join(cells) + " |")
        lines.append("")
    lines += corner_lines(steps, setting)
    lines += finding_lines(steps, setting)
    return "\n".join(lines)


CORNERS = [("phone (0.5 TFLOPS)", 0.5), ("laptop (4)", 4.0), ("data-centre GPU (35.6)", 35.6)]
CORNER_LINKS = [("10 Mbit/s, 50 ms", 10.0, 50.0), ("1 Gbit/s, 1 ms", 1e3, 1.0), ("10 Gbit/s, 0.1 ms", 1e4, 0.1)]


def corner_lines(steps: dict, setting: Setting) -> list:
    """The table of reading: at a few settings, which run reaches the target first and by what factor
    over the next fastest."""
    out = ["### Who reaches the target first, where", "",
           "Fastest run at each setting and its lead over the next fastest (time to target; the maps' runs: "
           "centralized, fedlora, splitlora fp32 and int8).", "",
           "| shape | server | link | " + " | ".join(f"clients: {c}" for c, _ in CORNERS) + " |",
           "|---|---|---|" + "---|" * len(CORNERS)]
    for shape in SHAPES:
        times = shape_results(shape, steps, setting)
        for server in SERVER_TFLOPS:
            for label, bw, lat in CORNER_LINKS:
                cells = []
                for _, client in CORNERS:
                    t = sorted((float(v.at(bw, lat, client, server)), k) for k, v in times.items())
                    cells.append(f"{t[0][1]} ({t[1][0] / t[0][0]:.3g}x over {t[1][1]})")
                out.append(f"| {shape.name} | {server:g} | {label} | " + " | ".join(cells) + " |")
    return out + [""]


def finding_lines(steps: dict, setting: Setting) -> list:
    """Targets of issue 7 by setting: where 'splitlora reaches the target in less simulated time
    than fedlora and centralized' holds."""
    out = ["### Targets of issue 7, by setting", "",
           "The e2e sections' target \"splitlora reaches the target in less simulated time than fedlora and "
           "centralized\" does not hold at their setting (every party at 35.6 TFLOPS, 100 Mbit/s with 10 ms, a "
           "tiny model). Over these maps:", ""]
    for shape in SHAPES:
        times = shape_results(shape, steps, setting)
        for split in ("splitlora-fp32", "splitlora-int8"):
            parts = []
            for server in SERVER_TFLOPS:
                vs_fed = reading(shape, times, server, split, "fedlora")
                vs_cen = reading(shape, times, server, split, "centralized")
                r = np.maximum(ratio_grid(times[split], times["fedlora"], server),
                               ratio_grid(times[split], times["centralized"], server))
                both = float((r < 1).mean())
                parts.append(f"server {server:g} TFLOPS: before fedlora on {vs_fed['share']:.0%} of the map, before "
                             f"centralized on {vs_cen['share']:.0%}, before both on {both:.0%}"
                             + (f" (best: {fmt_factor(float(r.min()))} than the faster of the two)" if both else ""))
            out.append(f"- {shape.name}, {split}: " + "; ".join(parts) + ".")
    never_both = all(
        not (np.maximum(ratio_grid(t[sp], t["fedlora"], sv), ratio_grid(t[sp], t["centralized"], sv)) < 1).any()
        for t in (shape_results(sh, steps, setting) for sh in SHAPES)
        for sp in ("splitlora-fp32", "splitlora-int8") for sv in SERVER_TFLOPS)
    if never_both:
        out += ["", "So the target holds against federated LoRA in the settings above (clients weaker than the "
                "server, links fast enough for the bytes at the cut), and against both baselines nowhere on these "
                "maps: wherever split beats federated LoRA, centralized LoRA on the server is faster still, and split "
                "beats centralized LoRA (by at most the factors in the tables) only with data-centre clients and "
                "fast links against a 35.6-TFLOPS server. Centralized LoRA needs the data on the server, which is "
                "what split and federated learning exist to avoid."]
    return out + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default="bench/RESULTS.md")
    parser.add_argument("--plots", default="bench/plots")
    parser.add_argument("--no-write", action="store_true", help="print the section; write neither RESULTS.md nor plots")
    args = parser.parse_args(argv)
    setting = Setting()
    sources = step_sources()
    if not sources:
        raise SystemExit(f"no steps to target: neither run folders nor {STEPS_FILE}")
    results_path = ROOT / args.results
    plots = {}
    if not args.no_write:
        for shape in SHAPES:
            path = ROOT / args.plots / f"crossover_{shape.name}.png"
            plot_shape(shape, shape_results(shape, sources[0]["steps"], setting), path)
            plots[shape.name] = path
    body = section(sources, setting, plots, results_path)
    if args.no_write:
        print(body)
    else:
        from bench.report import replace_section

        replace_section(results_path, SECTION, body)
        print(f"wrote the {SECTION} section of {os.path.relpath(results_path, ROOT)} and {len(plots)} maps in "
              f"{args.plots}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
