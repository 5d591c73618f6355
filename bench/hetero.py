"""The heterogeneity scenario: HSplitLoRA against SplitLoRA with one configuration for all and
against zero-padding aggregation, 5 clients whose budgets are spread 4x.

    python -m bench.hetero                  # the 5 runs (about 10 minutes on 2 CPU cores), then the report
    python -m bench.hetero --report-only    # regenerate the RESULTS.md section and plots from the runs
    python -m bench.hetero --steps 4 --only hsplitlora,weakest    # smoke check (runs/hetero-quick/)

Every run is `configs/bench-hetero.yaml` (the end-to-end CPU size's model and data, the 5 device
profiles) and differs only in the `hsplitlora.*` keys below, each in a process of its own through
bench/e2e.py's launcher (bench.json: process wall time, peak memory, load, machine):

    hsplitlora                  per-client cut (1 to 3) and ranks from each budget, noise-free
                                stacked aggregation folded into the base, one server adapter
    hsplitlora-server-per-client  the same with one server adapter per client at its rank, all run
                                in one multi-adapter launch (server_adapters=per_client)
    hsplitlora-one-cut          per-client ranks at one cut for all (the weakest's, 1), stacked:
                                isolates the aggregation from the cut
    zero-pad                    the same ranks and cut, HetLoRA's zero-padded averaging
    weakest                     SplitLoRA with one configuration for all, set by the weakest client
                                (its cut and ranks; equal ranks, so averaging A and B is FedAvg)

The report (between `<!-- hetero:begin -->` and `<!-- hetero:end -->` in bench/RESULTS.md, plots
`bench/plots/hetero_*.png`) holds the held-out loss against steps and simulated time (each client on
its own device and link, the server at 35.6 TFLOPS), the simulated time to reach the weakest
baseline's final held-out loss, and per client: its configuration, the cost model's memory estimate
against its budget, and the bytes it sent and received.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = "configs/bench-hetero.yaml"
OUT = "runs/hetero"

# name -> overrides on top of CONFIG.
RUNS = {
    "hsplitlora": [],
    "hsplitlora-server-per-client": ["hsplitlora.server_adapters=per_client"],
    "hsplitlora-one-cut": ["hsplitlora.max_cut_layer=1"],
    "zero-pad": ["hsplitlora.max_cut_layer=1", "hsplitlora.aggregation=zero_pad"],
    "weakest": ["hsplitlora.max_cut_layer=1", "hsplitlora.configuration=weakest", "hsplitlora.aggregation=zero_pad"],
}
BASELINE = "weakest"
DATA = {"data.train_path": "e2e/valid.txt", "data.eval_path": "e2e/test.txt"}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------

def run_all(args, names) -> int:
    from bench.e2e import data_dir, run_series, update_suite

    tweaked = args.steps is not None or bool(args.set)
    out = Path(args.out or (OUT + "-quick" if tweaked else OUT))
    data = data_dir()
    command = "python -m bench.hetero " + " ".join(shlex.quote(a) for a in args.argv)
    print(f"hetero: {len(names)} runs into {out}/ ({', '.join(names)}); config {CONFIG}, data {data}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    def overrides_of(name):
        overrides = [f"{k}={data / rel}" for k, rel in DATA.items()] + RUNS[name]
        if args.steps is not None:
            overrides += [f"train.steps={args.steps}", f"train.eval_every={args.steps}"]
        return overrides + list(args.set or []) + [f"output_dir={out / name}"]

    entries, failed = run_series(names, overrides_of, CONFIG, "hetero", out, args.threads, command)
    update_suite(out / "suite.json", {"size": "hetero", "config": CONFIG, "last_command": command,
                                      "last_started_utc": started, "last_seconds": time.perf_counter() - t0}, entries)
    print(f"hetero: {len(names) - len(failed)} of {len(names)} runs done in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if failed:
        return 1
    return report(out, write=not tweaked or args.out is not None, results=Path(args.results), plots=Path(args.plots))


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def load(out: Path) -> list:
    from bench.report import load_runs

    order = {n: i for i, n in enumerate(RUNS)}
    runs = [r for r in load_runs(out) if r["name"] in RUNS]
    runs.sort(key=lambda r: order[r["name"]])
    return runs


def eval_curve(run: dict) -> dict:
    evals = [m for m in run["metrics"] if m.get("type") == "eval"]
    return {"step": [m["step"] + 1 for m in evals], "loss": [m["eval_loss"] for m in evals],
            "sim": [m["sim_time_s"] for m in evals]}


def first_at_or_below(curve: dict, target: float):
    for step, loss, sim in zip(curve["step"], curve["loss"], curve["sim"]):
        if loss <= target:
            return step, sim
    return None


def client_rows(run: dict) -> list:
    s = run["summary"]
    clients = s["trainable_params"]["clients"]
    rows = []
    for c, info in enumerate(clients):
        b = s["bytes"].get(f"client{c}", {})
        row = {**info, "client": c, "up": sum(b.get("up", {}).values()), "down": sum(b.get("down", {}).values()),
               "adapters": b.get("up", {}).get("adapters", 0) + b.get("down", {}).get("adapters", 0)}
        measured = info.get("measured_activation_bytes")
        # The step's memory with the activations measured instead of estimated.
        row["measured_memory_bytes"] = (None if measured is None else
                                        info["est_memory_bytes"] - info["est_activation_bytes"] + measured)
        rows.append(row)
    return rows


def plot(runs: list, plots_dir: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        path = plots_dir / name
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        c = eval_curve(r)
        axes[0].plot(c["step"], c["loss"], marker="o", markersize=3, label=r["name"])
        axes[1].plot(c["sim"], c["loss"], marker="o", markersize=3, label=r["name"])
    for ax, xlabel in zip(axes, ("steps", "simulated time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("held-out loss vs steps")
    axes[1].set_title("held-out loss vs simulated time (each client on its own device)")
    fig.tight_layout()
    save(fig, "hetero_loss.png")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        rows = client_rows(r)
        xs = [row["client"] + (i - (len(runs) - 1) / 2) * width for row in rows]
        axes[0].bar(xs, [row["est_memory_bytes"] / 2**20 for row in rows], width, label=r["name"])
        measured = [(x, row["measured_memory_bytes"] / 2**20) for x, row in zip(xs, rows)
                    if row.get("measured_memory_bytes") is not None]
        if measured:
            axes[0].scatter(*zip(*measured), color="black", marker="_", s=60, zorder=3,
                            label="with measured activations" if i == 0 else None)
        axes[1].bar(xs, [(row["up"] + row["down"]) / 2**20 for row in rows], width, label=r["name"])
    budgets = [row.get("memory_budget_bytes") for row in client_rows(runs[0])]
    for c, budget in enumerate(budgets):
        if budget:
            axes[0].hlines(budget / 2**20, c - 0.45, c + 0.45, colors="black", linestyles="--", linewidth=1)
    names = [f"{row['client']}: {row['device']}" for row in client_rows(runs[0])]
    for ax, ylabel, title in ((axes[0], "MiB", "client step memory: estimate (bars), with measured activations (ticks); dashed: budget"),
                              (axes[1], "MiB", "bytes sent + received per client")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save(fig, "hetero_clients.png")
    return written


def section(runs: list, suite: dict, plots: list, results: Path) -> str:
    from bench.report import fmt_bytes, provenance_lines

    base = next((r for r in runs if r["name"] == BASELINE), None)
    target = base["summary"]["eval_loss"] if base else None
    cfg = runs[0]["config"]
    t = cfg["train"]
    commands = sorted({e.get("command", "") for e in suite.get("runs", {}).values()} - {""})
    lines = [
        "## Heterogeneous clients: HSplitLoRA against one configuration for all and zero-padding (`bench/hetero.py`)",
        "",
        "Generated by `python -m bench.hetero --report-only` from the run folders; do not edit by hand. "
        "Regenerate everything with `python -m bench.hetero`.",
        "",
        *provenance_lines(runs, commands),
        f"Setting: `{CONFIG}`: the end-to-end CPU size's model (GPT-2-shaped, 4 layers, d 128, random weights) "
        f"and data (E2E `valid.txt`, held-out loss on up to {cfg['data']['num_eval']} lines of `test.txt`); "
        f"{t['clients']} clients, batch {t['batch_size']} each, {t['steps']} steps, AdamW lr {t['lr']} "
        f"({t.get('warmup_steps', 0)} warm-up steps), a round every "
        f"{t['aggregate_every']} steps, held-out loss every {t['eval_every']}; LoRA (rsLoRA) r "
        f"{cfg['lora']['client']['r']} per client weight for the strongest client on "
        f"{cfg['lora']['client']['target_modules']}, server r {cfg['lora']['server']['r']} on "
        f"{cfg['lora']['server']['target_modules']}; fp32 at the cut; seed {cfg['seed']}. Devices "
        "(compute, memory budget, link): "
        + "; ".join(f"{name} {d['tflops']:g} TFLOPS, {d['memory_gib'] * 1024:g} MiB, {d['bandwidth_mbps']:g} Mbit/s"
                    for name, d in cfg["hsplitlora"]["devices"].items())
        + f"; the server {cfg['network']['server_tflops']:g} TFLOPS, every link {cfg['network']['latency_ms']:g} ms "
        "latency. Budgets spread 4x; the memory budgets are scaled to this tiny model (one layer of client step "
        "is about 6 MiB).",
        "",
        "Runs (only these keys differ): "
        + "; ".join(f"**{r['name']}** " + (", ".join(f"`{o}`" for o in RUNS[r['name']]) or "(the config as is)")
                    for r in runs) + ".",
        "",
    ]
    if target is not None:
        lines += [f"Target: the `{BASELINE}` baseline's final held-out loss, **{target:.4f}**; \"to target\": "
                  "the first evaluation at or below it.", ""]
    lines += ["| run | held-out loss | last 3 evals | steps to target | sim s to target | sim s total | "
              "bytes, all clients | adapters up+down | trainable params, clients (sum) | server |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s, c = r["summary"], eval_curve(r)
        last = c["loss"][-3:]
        hit = first_at_or_below(c, target) if target is not None else None
        rows = client_rows(r)
        lines.append(
            f"| {r['name']} | {s['eval_loss']:.4f} | {sum(last) / len(last):.4f} | {hit[0] if hit else 'not reached'} "
            f"| {f'{hit[1]:.2f}' if hit else '-'} | {s['sim_time_s']:.2f} | {fmt_bytes(s['bytes_total'])} "
            f"| {fmt_bytes(sum(row['adapters'] for row in rows))} | {sum(row['trainable_params'] for row in rows):,} "
            f"| {s['trainable_params']['server']:,} |")
    lines += ["", "Per client, at the end of each run (configuration after the last reconfiguration; memory: the "
              "cost model's estimate of the client step (frozen weights, adapters with gradients and optimizer "
              "state, activations kept for the backward), against the budget; \"with measured activations\": the "
              "same with the activations the client's last forward really saved for its backward "
              "(`splitlora.memory.SavedActivationMeter`) in place of the estimate; bytes: everything the client "
              "sent and received over the run):", "",
              "| run | client | cut | total rank | server rank | est. memory / budget | with measured activations "
              "| activations measured / est. | fits | est. step | up | down |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for row in client_rows(r):
            budget = row.get("memory_budget_bytes")
            mem = f"{row['est_memory_bytes'] / 2**20:.2f} / {budget / 2**20:.2f} MiB" if budget else \
                f"{row['est_memory_bytes'] / 2**20:.2f} MiB"
            measured, act = row.get("measured_memory_bytes"), row.get("measured_activation_bytes")
            with_measured = "-" if measured is None else f"{measured / 2**20:.2f} MiB"
            acts = "-" if act is None else f"{act / 2**20:.2f} / {row['est_activation_bytes'] / 2**20:.2f} MiB"
            lines.append(f"| {r['name']} | {row['client']} ({row['device']}) | {row['cut_layer']} | "
                         f"{row['total_rank']} | {row.get('server_rank', '-')} | {mem} | {with_measured} | {acts} | "
                         f"{'yes' if row['fits'] else 'NO'} | {row['est_step_s'] * 1e3:.1f} ms | "
                         f"{fmt_bytes(row['up'])} | {fmt_bytes(row['down'])} |")
    lines += ["", *observations(runs, target), ""]
    rel = [os.path.relpath(p, results.parent) for p in plots]
    if rel:
        lines += ["Plots: " + ", ".join(f"[{Path(p).stem}]({p})" for p in rel), ""]
        lines += [f"![held-out loss]({rel[0]})", "", f"![per client]({rel[1]})", ""]
    return "\n".join(lines)


def observations(runs: list, target) -> list:
    """Plain statements computed from the runs (no judgement beyond the numbers)."""
    by = {r["name"]: r for r in runs}
    out = ["What the numbers say:", ""]

    def loss(name):
        return by[name]["summary"]["eval_loss"]

    def rel(a, b):
        return (loss(a) - loss(b)) / loss(b)

    if "hsplitlora" in by and BASELINE in by:
        out.append(f"- hsplitlora's final held-out loss is {rel('hsplitlora', BASELINE):+.1%} against {BASELINE} "
                   f"({loss('hsplitlora'):.4f} vs {loss(BASELINE):.4f}).")
    if "hsplitlora-one-cut" in by and "zero-pad" in by:
        out.append(f"- At the same cut and ranks, stacked aggregation ends {rel('hsplitlora-one-cut', 'zero-pad'):+.1%} "
                   f"against zero-padding ({loss('hsplitlora-one-cut'):.4f} vs {loss('zero-pad'):.4f}).")
    if "hsplitlora" in by and "hsplitlora-one-cut" in by:
        out.append(f"- Per-client cuts (deeper for stronger clients) end {rel('hsplitlora', 'hsplitlora-one-cut'):+.1%} "
                   f"against every client at the weakest's cut (ranks from the budgets at that cut) "
                   f"({loss('hsplitlora'):.4f} vs {loss('hsplitlora-one-cut'):.4f}).")
    if "hsplitlora-server-per-client" in by and "hsplitlora" in by:
        out.append(f"- Per-client server adapters end {rel('hsplitlora-server-per-client', 'hsplitlora'):+.1%} against "
                   f"one shared server adapter ({loss('hsplitlora-server-per-client'):.4f} vs {loss('hsplitlora'):.4f}).")
    sims = {r["name"]: r["summary"]["sim_time_s"] / max(1, r["summary"]["steps"]) for r in runs}
    cfg = runs[0]["config"]
    net = cfg["network"]
    links = [(d.get("bandwidth_mbps") or net["bandwidth_mbps"], d.get("latency_ms") or net["latency_ms"])
             for d in cfg["hsplitlora"]["devices"].values()] or [(net["bandwidth_mbps"], net["latency_ms"])]
    slowest = min(links)
    out.append("- Simulated time per step: " + ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in sims.items())
               + f". Every step waits for the slowest client's activations and gradients on its link ({slowest[0]:g} "
               f"Mbit/s here, 2 x {slowest[1]:g} ms latency); at this model size that, not compute, sets the step "
               "time, so the configurations differ in time mainly through their loss per step and the adapters' bytes.")
    if target is not None:
        reached = {r["name"]: first_at_or_below(eval_curve(r), target) for r in runs}
        got = [f"{n} at {v[1]:.2f} s (step {v[0]})" for n, v in reached.items() if v]
        out.append(f"- Reached {BASELINE}'s final held-out loss ({target:.4f}): " + ("; ".join(got) if got else "none")
                   + ".")
    return out


def report(out: Path, *, write: bool, results: Path, plots: Path) -> int:
    from bench.report import replace_section

    runs = load(out)
    if not runs:
        print(f"hetero report: no run folders with results in {out}/; run `python -m bench.hetero` first")
        return 1
    suite_path = out / "suite.json"
    suite = json.loads(suite_path.read_text()) if suite_path.is_file() else {}
    written = plot(runs, plots) if write else []
    body = section(runs, suite, written, results)
    if write:
        replace_section(results, "hetero", body)
        print(f"hetero report: wrote the section of {results} and {', '.join(str(p) for p in written)}")
    else:
        print(body)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated run names (default: all of {', '.join(RUNS)})")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick tries, into <out>-quick)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="extra config override for every run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1, as the CPU size)")
    parser.add_argument("--out", default=None, help=f"folder of the run folders (default {OUT})")
    parser.add_argument("--results", default="bench/RESULTS.md")
    parser.add_argument("--plots", default="bench/plots")
    parser.add_argument("--report-only", action="store_true", help="only regenerate the report from the runs")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.report_only:
        return report(Path(args.out or OUT), write=True, results=Path(args.results), plots=Path(args.plots))
    names = list(RUNS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in RUNS]
        if unknown:
            parser.error(f"--only: unknown run(s) {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    return run_all(args, names)


if __name__ == "__main__":
    sys.exit(main())
