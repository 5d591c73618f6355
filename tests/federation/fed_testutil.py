"""Helpers of the federation's multi-process tests: data files, a config, processes whose every
wait is bounded."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
CLIENTS = ("a", "b", "c")
WAIT_S = 240  # the longest any one phase may take before the test fails (and kills everything)


def write_data(folder: Path, clients=CLIENTS) -> None:
    """client<i>.jsonl (24 records each), eval.jsonl (12) and tokenizer.json, as the example writes them."""
    from splitlora.federation.example import write_data as write_example_data

    write_example_data(folder, len(clients), per_client=24, num_eval=12)


def write_config(folder: Path, clients=CLIENTS, federation: str = "{step_timeout_s: 60, wait_s: 120}") -> Path:
    files = ", ".join(str(folder / f"client{c}.jsonl") for c in range(len(clients)))
    path = folder / "run.yaml"
    path.write_text(f"""\
strategy: splitlora
output_dir: {folder / 'runs' / 'fed'}
model:
  config: {{model_type: gpt2, n_layer: 3, n_embd: 32, n_head: 2, n_positions: 96,
           activation_function: gelu_pytorch_tanh}}
  cut_layer: 1
data:
  source: jsonl
  format: prompt_completion
  tokenizer: {folder / 'tokenizer.json'}
  client_paths: [{files}]
  eval_path: {folder / 'eval.jsonl'}
  num_eval: 8
train: {{clients: {len(clients)}, batch_size: 4, steps: 4, aggregate_every: 2, eval_every: 0}}
eval: {{generate: false}}
codec: {{bits: 4, error_feedback: true}}
lora: {{client: {{dropout: 0.1}}}}
federation: {federation}
""")
    return path


def env(fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SPLITLORA_INJECT_FAULT", None)
    if fault:
        env["SPLITLORA_INJECT_FAULT"] = fault
    return env


def start(args, log: Path, fault=None):
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "splitlora", *args], cwd=PROJECT, env=env(fault),
                                stdout=out, stderr=subprocess.STDOUT)


def wait_for(pattern: str, log: Path, proc, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text()) if log.exists() else None
        if m:
            return m
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (status {proc.returncode}) before printing {pattern!r}:\n"
                                 + log.read_text())
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + log.read_text())


def finish(proc, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n" + log.read_text()) from None


def kill_all(procs) -> None:
    for p in procs:
        if p.poll() is None:  # never leave a process behind, whatever happened
            p.kill()
            p.wait(timeout=30)


def run_beside_in_process(folder: Path, config: Path, overrides, *, local=None) -> None:
    """A federation (a server and one client per CLIENTS, mutual TLS; its run in runs/fed) and
    beside it the one-process runs `local` ({run name: overrides}, in runs/<name>; default
    {"local": overrides}) of `config`. Asserts every process exits 0; every process is killed
    whatever happens."""
    from splitlora.federation.certs import create_certs

    if not (folder / "certs" / "ca.crt").exists():
        create_certs(folder / "certs", CLIENTS, log=lambda *_: None)
    local = {"local": overrides} if local is None else local
    procs, logs = [], []
    try:
        for name, args in local.items():
            logs.append(folder / f"{name}.log")
            procs.append(start(["train", "--config", str(config), "--no-progress", *args,
                                f"output_dir={folder / 'runs' / name}"], logs[-1]))
        server_log = folder / "server.log"
        server = start(["server", "--config", str(config), "--certs", str(folder / "certs"), "--listen",
                        "127.0.0.1:0", "--no-progress", *overrides], server_log)
        procs.append(server)
        address = wait_for(r"listening on (127\.0\.0\.1:\d+)", server_log, server, WAIT_S).group(1)
        for c, name in enumerate(CLIENTS):
            logs.append(folder / f"client-{name}.log")
            procs.append(start(["client", "--config", str(config), "--server", address, "--name", name, "--certs",
                                str(folder / "certs"), "--data", str(folder / f"client{c}.jsonl"), *overrides],
                               logs[-1]))
        assert finish(server, server_log, WAIT_S) == 0, server_log.read_text()
        for p, log in zip(procs[len(local) + 1:] + procs[:len(local)], logs[len(local):] + logs[:len(local)]):
            assert finish(p, log, WAIT_S) == 0, log.read_text()
    finally:
        kill_all(procs)


def step_records(run: Path) -> list:
    """(step, loss, bytes) of each step record in run's metrics.jsonl."""
    return [(r["step"], r["loss"], r["bytes"]) for r in map(json.loads, (run / "metrics.jsonl").open())
            if r["type"] == "step"]


def assert_same_training(got: Path, want: Path) -> dict:
    """The runs in `got` and `want` trained alike: the same adapters (rtol 1e-5 / atol 1e-6, the
    dist tests' tolerance), step losses (rel 1e-6) and byte counts (exactly). Returns got's summary."""
    import pytest
    import torch
    from safetensors.torch import load_file

    a = load_file(str(want / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(got / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    g, w = step_records(got), step_records(want)
    assert [(s, n) for s, _, n in g] == [(s, n) for s, _, n in w]
    assert [l for _, l, _ in g] == pytest.approx([l for _, l, _ in w], rel=1e-6)
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (want, got))
    assert sb["bytes"] == sa["bytes"] and sb["bytes_total"] > 0
    return sb
