"""The per-step overhead of a real federation against transport=dist and in-process, on loopback.

    python -m bench.federation_overhead [--steps 50] [--clients 3] [--repeats 3] [--out runs/federation_overhead]

One small config (a GPT-2 shape built from a config, a fixed word-tokenizer file, one
prompt/completion file per client: the shards of one partition, seed 0), run three ways on this
machine, the modes interleaved in every repeat (the order rotates) so that the ratios compare
runs of the same invocation:

- `local`: in-process, `splitlora train` (transport=local);
- `dist`: `splitlora train transport=dist`, the server and each client a torch.distributed rank
  (gloo, rendezvous on loopback), started with the environment torchrun gives its ranks;
- `federation`: `splitlora server` and one `splitlora client` per client, separate programs over
  gRPC with mutual TLS (certificates from `splitlora certs`), on loopback.

Every process runs with one torch thread (OMP_NUM_THREADS=1). Per-step time is what the runs
record themselves: the server's `metrics.jsonl` step records carry `wall_time_s`, the cumulative
`time.perf_counter()` around each training step (`trainer._train`: the step and, at a round's end,
the aggregation; start-up, evaluation, metrics and checkpoint writing excluded). The differences
are the per-step times; the first `--warmup` steps are left out. The processes' whole lifetime
(launch to exit) is reported beside it.

Bytes, three levels, all parties' sends added up (the server is the hub every packet goes through):
- the ledger: `summary.json` `bytes_total` (payload bytes of every packet, as the accounting counts);
- framed: what the transport hands to its link, counted in each process by a wrapper that calls the
  real `splitlora` entry point (`python -m bench.federation_overhead _party COUNTS.json -- ARGS`):
  for gRPC every stream message (the 32-byte header plus a chunk of a packet, and the control
  messages: hello, welcome, ready, start, done), for dist the transport's own `wire_bytes_sent`
  (the 32-byte header tensor and the payload of each packet). Nothing in splitlora is changed: the
  wrapper wraps `chunk_packet` and `encode_control` as `grpc_transport` calls them;
- TCP (federation only, `--relay`, one more federation run that is not timed): the clients connect
  through a byte-counting TCP relay in this process, which sees everything gRPC sends over the
  socket: HTTP/2 and gRPC framing, TLS records, the TLS handshakes, keepalive pings.

The final losses of the three modes must agree (every step's loss and the final held-out loss,
relative difference at most --tolerance); the script fails loudly otherwise. Every subprocess is
bounded by --timeout and killed on exit.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

PROJECT = Path(__file__).resolve().parents[1]
NAMES = "abcdefghijklmnopqrstuvwxyz"
MODES = ("local", "dist", "federation")


# -- the counting wrapper (runs inside each party's process) ---------------------------------------
def _party_main(argv: List[str]) -> int:
    """`_party COUNTS.json -- SPLITLORA_ARGS`: runs `splitlora SPLITLORA_ARGS` and writes the bytes
    this process handed to its transport's link to COUNTS.json."""
    counts_path, sep, *args = argv
    assert sep == "--", argv
    counts = {"grpc_packet_messages": 0, "grpc_packet_bytes": 0, "grpc_control_messages": 0,
              "grpc_control_bytes": 0, "dist_wire_bytes": 0, "ledger_sent_bytes": 0}
    transports = []
    from splitlora.federation import grpc_transport as g
    from splitlora.transport import dist as d

    chunk_packet, encode_control = g.chunk_packet, g.encode_control

    def counted_chunks(*a, **k):
        for message in chunk_packet(*a, **k):
            counts["grpc_packet_messages"] += 1
            counts["grpc_packet_bytes"] += len(message)
            yield message

    def counted_control(*a, **k):
        message = encode_control(*a, **k)
        counts["grpc_control_messages"] += 1
        counts["grpc_control_bytes"] += len(message)
        return message

    g.chunk_packet, g.encode_control = counted_chunks, counted_control
    for cls in (g.GrpcServerTransport, g.GrpcClientTransport, d.DistTransport):
        init = cls.__init__

        def registering(self, *a, __init=init, **k):
            __init(self, *a, **k)
            transports.append(self)
        cls.__init__ = registering

    from splitlora.cli import main
    rc = 1
    try:
        rc = main(args)
        return rc
    finally:
        for t in transports:
            counts["ledger_sent_bytes"] += t.ledger.total()
            if isinstance(t, d.DistTransport):
                counts["dist_wire_bytes"] += t.wire_bytes_sent
        counts["transports"] = len(transports)
        counts["rc"] = rc
        Path(counts_path).write_text(json.dumps(counts))


# -- a byte-counting TCP relay (federation bytes on the socket) ------------------------------------
class Relay:
    """Listens on 127.0.0.1:<port>, forwards every connection to `target` and counts the bytes each
    way (`up`: towards the target, `down`: back)."""

    def __init__(self, target: tuple) -> None:
        self.target = target
        self.up = self.down = self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                other = socket.create_connection(self.target, timeout=10)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._pump, args=(conn, other), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        socks = [a, b]
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select(socks, [], [], 0.2)
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    with self._lock:  # counted before it is forwarded: the peer never sees uncounted bytes
                        if s is a:
                            self.up += len(data)
                        else:
                            self.down += len(data)
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            a.close()
            b.close()

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


# -- data, config, certificates ---------------------------------------------------------------------
def write_inputs(folder: Path, clients: int, per_client: int) -> Path:
    from splitlora.federation.certs import create_certs
    from splitlora.federation.example import write_data

    folder.mkdir(parents=True, exist_ok=True)
    write_data(folder, clients, per_client=per_client, num_eval=16)
    import shutil

    shutil.rmtree(folder / "certs", ignore_errors=True)  # this script's own folder: fresh certificates each run
    create_certs(folder / "certs", [NAMES[c] for c in range(clients)], log=lambda *_: None)
    return folder


def write_config(folder: Path, clients: int, steps: int, aggregate_every: int, batch_size: int) -> Path:
    files = ", ".join(str(folder / f"client{c}.jsonl") for c in range(clients))
    path = folder / "run.yaml"
    path.write_text(f"""\
strategy: splitlora
seed: 0
model:
  config: {{model_type: gpt2, n_layer: 4, n_embd: 64, n_head: 4, n_positions: 128,
           activation_function: gelu_pytorch_tanh}}
  cut_layer: 2
data:
  source: jsonl
  format: prompt_completion
  tokenizer: {folder / 'tokenizer.json'}
  client_paths: [{files}]
  eval_path: {folder / 'eval.jsonl'}
  num_eval: 16
train: {{clients: {clients}, batch_size: {batch_size}, steps: {steps}, aggregate_every: {aggregate_every},
        eval_every: 0, log_every: 1}}
eval: {{generate: false}}
codec: {{bits: 8}}
network: {{timeout_s: 120}}
federation: {{step_timeout_s: 120, wait_s: 180}}
""")
    return path


# -- running the modes ------------------------------------------------------------------------------
def _env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SPLITLORA_INJECT_FAULT", None)
    env.update(extra or {})
    return env


def _party(counts: Path, args: List[str], log: Path, extra_env: Optional[dict] = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "bench.federation_overhead", "_party", str(counts), "--", *args],
                                cwd=PROJECT, env=_env(extra_env), stdout=out, stderr=subprocess.STDOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_all(procs: List[subprocess.Popen], logs: List[Path], deadline: float) -> None:
    try:
        for p, log in zip(procs, logs):
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise SystemExit(f"a process ran past --timeout; its log ({log}):\n{log.read_text()[-4000:]}") from None
            if rc != 0:
                raise SystemExit(f"a process failed (exit {rc}); its log ({log}):\n{log.read_text()[-4000:]}")
    finally:
        for p in procs:
            if p.poll() is None:  # never leave a process behind, whatever happened
                p.kill()
                p.wait(timeout=30)


def _wait_for(pattern: str, log: Path, proc: subprocess.Popen, deadline: float) -> str:
    import re

    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text()) if log.exists() else None
        if m:
            return m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server ended (exit {proc.returncode}) before listening:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    raise SystemExit(f"the server did not listen in time:\n{log.read_text()[-4000:]}")


def run_mode(mode: str, folder: Path, config: Path, clients: int, run: Path, timeout: float,
             relay: bool = False) -> dict:
    """Runs one mode to completion; what its run folder and the wrappers' counts say."""
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    out = run / "out"
    procs, logs, counts = [], [], []
    deadline = time.monotonic() + timeout
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    the_relay = None
    try:
        if mode == "local":
            counts.append(run / "counts-local.json")
            logs.append(run / "local.log")
            procs.append(_party(counts[-1], ["train", "--config", str(config), "--no-progress", f"output_dir={out}"],
                                logs[-1]))
        elif mode == "dist":
            port = _free_port()
            for rank in range(clients + 1):
                counts.append(run / f"counts-rank{rank}.json")
                logs.append(run / f"rank{rank}.log")
                procs.append(_party(counts[-1], ["train", "--config", str(config), "--no-progress",
                                                 f"output_dir={out}", "transport=dist"], logs[-1],
                                    {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(clients + 1),
                                     "LOCAL_WORLD_SIZE": str(clients + 1), "MASTER_ADDR": "127.0.0.1",
                                     "MASTER_PORT": str(port)}))
        elif mode == "federation":
            counts.append(run / "counts-server.json")
            logs.append(run / "server.log")
            procs.append(_party(counts[-1], ["server", "--config", str(config), "--certs", str(folder / "certs"),
                                             "--listen", "127.0.0.1:0", "--no-progress", f"output_dir={out}"],
                                logs[-1]))
            address = _wait_for(r"listening on (127\.0\.0\.1:\d+)", logs[0], procs[0], deadline)
            if relay:
                the_relay = Relay(("127.0.0.1", int(address.rsplit(":", 1)[1])))
                address = f"127.0.0.1:{the_relay.port}"
            for c in range(clients):
                name = NAMES[c]
                counts.append(run / f"counts-{name}.json")
                logs.append(run / f"client-{name}.log")
                procs.append(_party(counts[-1], ["client", "--config", str(config), "--server", address, "--name",
                                                 name, "--certs", str(folder / "certs"), "--data",
                                                 str(folder / f"client{c}.jsonl"), "--output-dir",
                                                 str(run / f"client-{name}")], logs[-1]))
        else:
            raise ValueError(mode)
        _wait_all(procs, logs, deadline)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        if the_relay is not None:
            the_relay.close()
    elapsed = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    party_counts = [json.loads(p.read_text()) for p in counts]
    result = {
        "mode": mode,
        "process_s": elapsed,
        "load_average_1min": load,
        "wall_time_s": summary["wall_time_s"],
        "step_wall_s": step_times(records),
        "step_losses": [r["loss"] for r in records if r.get("type") == "step"],
        "eval_loss": summary["eval_loss"],
        "bytes_total": summary["bytes_total"],
        "bytes_by_kind": summary["bytes_by_kind"],
        "ledger_sent_bytes": sum(c["ledger_sent_bytes"] for c in party_counts),
    }
    if mode == "dist":
        result["framed_bytes"] = sum(c["dist_wire_bytes"] for c in party_counts)
    if mode == "federation":
        keys = ("grpc_packet_messages", "grpc_packet_bytes", "grpc_control_messages", "grpc_control_bytes")
        result.update({k: sum(c[k] for c in party_counts) for k in keys})
        result["framed_bytes"] = result["grpc_packet_bytes"] + result["grpc_control_bytes"]
    if the_relay is not None:
        result.update(tcp_up=the_relay.up, tcp_down=the_relay.down, tcp_connections=the_relay.connections)
    return result


# -- numbers and the report -------------------------------------------------------------------------
def step_times(records: List[dict]) -> List[float]:
    """Per-step wall seconds from metrics.jsonl's step records (`wall_time_s` is cumulative)."""
    walls = [r["wall_time_s"] for r in records if r.get("type") == "step"]
    return [b - a for a, b in zip([0.0] + walls[:-1], walls)]


def mode_stats(runs: List[dict], warmup: int) -> dict:
    """Per-step seconds of one mode over its repeats: each run's mean after the warm-up steps."""
    means = [statistics.fmean(r["step_wall_s"][warmup:]) for r in runs]
    medians = [statistics.median(r["step_wall_s"][warmup:]) for r in runs]
    return {"mean_step_s": statistics.median(means), "per_repeat_mean_step_s": means,
            "median_step_s": statistics.median(medians), "process_s": statistics.median(r["process_s"] for r in runs),
            "load_average_1min": [r.get("load_average_1min") for r in runs]}


def check_losses(runs: Dict[str, List[dict]], tolerance: float) -> float:
    """The largest relative difference of any step loss or the final held-out loss between any run
    and the first local run; raises SystemExit when it exceeds `tolerance`."""
    ref = runs["local"][0]
    worst = 0.0
    where = ""
    for mode, rs in runs.items():
        for r in rs:
            if len(r["step_losses"]) != len(ref["step_losses"]):
                raise SystemExit(f"{mode}: {len(r['step_losses'])} step losses, local has {len(ref['step_losses'])}")
            pairs = list(zip(r["step_losses"], ref["step_losses"])) + [(r["eval_loss"], ref["eval_loss"])]
            for i, (a, b) in enumerate(pairs):
                d = abs(a - b) / max(abs(b), 1e-12)
                if d > worst:
                    worst, where = d, f"{mode} {'eval loss' if i == len(pairs) - 1 else f'step {i}'}: {a!r} vs {b!r}"
    if worst > tolerance:
        raise SystemExit(f"the modes did not train the same: largest relative loss difference {worst:.3g} "
                         f"({where}), more than --tolerance {tolerance:g}")
    return worst


def summarize(runs: Dict[str, List[dict]], warmup: int, tolerance: float, relay: Optional[dict]) -> dict:
    stats = {m: mode_stats(rs, warmup) for m, rs in runs.items()}
    ratios_per_repeat = [{"dist/local": d["step_wall_s_mean"] / l["step_wall_s_mean"],
                          "federation/local": f["step_wall_s_mean"] / l["step_wall_s_mean"],
                          "federation/dist": f["step_wall_s_mean"] / d["step_wall_s_mean"]}
                         for l, d, f in zip(*(_with_mean(runs[m], warmup) for m in MODES))]
    ledgers = {m: sorted({r["bytes_total"] for r in rs}) for m, rs in runs.items()}
    out = {
        "stats": stats,
        "ratios": {k: statistics.median(r[k] for r in ratios_per_repeat) for k in ratios_per_repeat[0]},
        "ratios_per_repeat": ratios_per_repeat,
        "max_rel_loss_diff": check_losses(runs, tolerance),
        "final_eval_loss": {m: rs[0]["eval_loss"] for m, rs in runs.items()},
        "ledger_bytes_total": ledgers,
        "bytes": {m: {k: rs[0][k] for k in ("bytes_total", "ledger_sent_bytes", "framed_bytes", "grpc_packet_messages",
                                               "grpc_packet_bytes", "grpc_control_messages", "grpc_control_bytes")
                      if k in rs[0]} for m, rs in runs.items()},
    }
    if relay is not None:
        out["relay"] = {k: relay[k] for k in ("bytes_total", "framed_bytes", "tcp_up", "tcp_down", "tcp_connections",
                                              "eval_loss")}
    return out


def _with_mean(rs: List[dict], warmup: int) -> List[dict]:
    return [{**r, "step_wall_s_mean": statistics.fmean(r["step_wall_s"][warmup:])} for r in rs]


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:+.2f}%"


def format_report(result: dict) -> str:
    """The markdown tables of one invocation (from its results.json)."""
    s = result["summary"]
    a = result["args"]
    lines = [f"{a['clients']} clients, {a['steps']} steps, {a['repeats']} repeat(s), first {a['warmup']} step(s) "
             f"left out; one torch thread per process", "",
             "| mode | processes | per-step s: mean (median over repeats) | per-step s: median (median over "
             "repeats) | each repeat's mean | x local | whole run s, launch to exit (median) | load average at "
             "each start |",
             "|---|---|---|---|---|---|---|---|"]
    procs = {"local": "1", "dist": f"{a['clients'] + 1} (gloo ranks)",
             "federation": f"{a['clients'] + 1} (gRPC + mTLS)"}
    local = s["stats"]["local"]["mean_step_s"]
    for m in MODES:
        st = s["stats"][m]
        per = ", ".join(f"{x:.4f}" for x in st["per_repeat_mean_step_s"])
        lines.append(f"| {m} | {procs[m]} | {st['mean_step_s']:.4f} | {st['median_step_s']:.4f} | {per} | "
                     f"{st['mean_step_s'] / local:.2f} | {st['process_s']:.1f} | "
                     + ", ".join("-" if x is None else f"{x:.1f}" for x in st.get("load_average_1min", [])) + " |")
    r = s["ratios"]
    per = "; ".join(", ".join(f"{x[k]:.2f}" for k in ("dist/local", "federation/local", "federation/dist"))
                    for x in s["ratios_per_repeat"])
    lines += ["", f"Ratios (median of the repeats' ratios): dist/local {r['dist/local']:.2f}, federation/local "
                  f"{r['federation/local']:.2f}, federation/dist {r['federation/dist']:.2f} (per repeat, "
                  f"dist/local, federation/local, federation/dist: {per}).",
              f"Largest relative difference of any step loss or the final held-out loss against local: "
              f"{s['max_rel_loss_diff']:.3g} (final held-out loss: "
              + ", ".join(f"{m} {v:.6f}" for m, v in s["final_eval_loss"].items()) + ")."]
    b = s["bytes"]
    ledger = b["local"]["bytes_total"]
    lines += ["", "| bytes | local | dist | federation |", "|---|---|---|---|",
              f"| ledger (summary.json bytes_total) | {ledger:,} | {b['dist']['bytes_total']:,} | "
              f"{b['federation']['bytes_total']:,} |",
              f"| sent by all parties, as their ledgers count | - | "
              f"{b['dist']['ledger_sent_bytes']:,} | {b['federation']['ledger_sent_bytes']:,} |",
              f"| framed: handed to the link (headers, control messages) | - | {b['dist']['framed_bytes']:,} "
              f"({_pct(b['dist']['framed_bytes'] - ledger, ledger)}) | {b['federation']['framed_bytes']:,} "
              f"({_pct(b['federation']['framed_bytes'] - ledger, ledger)}) |"]
    f = b["federation"]
    lines += ["", f"Federation messages: {f['grpc_packet_messages']:,} packet chunks ({f['grpc_packet_bytes']:,} bytes, "
                  f"{f['grpc_packet_bytes'] - f['bytes_total']:,} of them headers) and {f['grpc_control_messages']:,} "
                  f"control messages ({f['grpc_control_bytes']:,} bytes)."]
    if "relay" in s:
        t = s["relay"]
        tcp = t["tcp_up"] + t["tcp_down"]
        lines += [f"Through a counting TCP relay (one more federation run, not timed; {t['tcp_connections']} "
                  f"connections): {tcp:,} bytes on the sockets ({t['tcp_up']:,} up, {t['tcp_down']:,} down), "
                  f"{_pct(tcp - t['bytes_total'], t['bytes_total'])} over its ledger ({t['bytes_total']:,}) and "
                  f"{_pct(tcp - t['framed_bytes'], t['framed_bytes'])} over its framed bytes "
                  f"({t['framed_bytes']:,}): gRPC, HTTP/2 and TLS framing, the TLS handshakes and keepalive pings."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_party"]:
        return _party_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--aggregate-every", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="first steps of each run left out of the per-step time")
    p.add_argument("--per-client", type=int, default=64, help="examples in each client's file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any one run may take")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative loss difference accepted")
    p.add_argument("--no-relay", action="store_true", help="skip the federation run through the TCP relay")
    p.add_argument("--out", default="runs/federation_overhead")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must be more than --warmup")
    out = Path(args.out).resolve()
    folder = write_inputs(out / "inputs", args.clients, args.per_client)
    config = write_config(folder, args.clients, args.steps, args.aggregate_every, args.batch_size)
    runs: Dict[str, List[dict]] = {m: [] for m in MODES}
    load = [os.getloadavg()[0]]
    t0 = time.perf_counter()
    for r in range(args.repeats):
        order = MODES[r % 3:] + MODES[:r % 3]  # interleaved: the order rotates every repeat
        for mode in order:
            res = run_mode(mode, folder, config, args.clients, out / f"{mode}-{r}", args.timeout)
            runs[mode].append(res)
            print(f"repeat {r} {mode}: {statistics.fmean(res['step_wall_s'][args.warmup:]):.4f} s/step, "
                  f"{res['process_s']:.1f} s launch to exit, eval loss {res['eval_loss']:.6f}", flush=True)
    relay = None
    if not args.no_relay:
        relay = run_mode("federation", folder, config, args.clients, out / "federation-relay", args.timeout,
                         relay=True)
        print(f"relay run: {relay['tcp_up'] + relay['tcp_down']:,} bytes on the sockets", flush=True)
    load.append(os.getloadavg()[0])
    result = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_average_1min": load, "cpus": os.cpu_count(), "total_s": time.perf_counter() - t0,
              "runs": runs, "relay_run": relay}
    (out / "results.json").write_text(json.dumps(result, indent=1))  # kept even if the check below fails
    result["summary"] = summarize(runs, args.warmup, args.tolerance, relay)
    if relay is not None:
        check_losses({"local": runs["local"], "federation": [relay]}, args.tolerance)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    report = format_report(result)
    (out / "report.md").write_text(report + "\n")
    print()
    print(report)
    print(f"\n{result['total_s']:.0f} s in all; load average {load[0]:.2f} at the start, {load[1]:.2f} at the end; "
          f"{out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
