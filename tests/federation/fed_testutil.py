"""Helpers of the federation's multi-process tests: data files, a config, processes whose every
wait is bounded."""
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
