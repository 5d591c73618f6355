"""`splitlora federation-example DIR`: everything a first federation on one machine needs.

Writes into DIR one prompt/completion file per client (the demo's synthetic E2E-like data, split
between them), a held-out file for the server, a fixed word tokenizer (a model built from a config
takes it: each party sees only part of the data, so none could build the vocabulary alone), a
run.yaml (the demo model, SplitLoRA) and the certificates; then prints the commands that start
the server and each client. Nothing is downloaded. A real federation replaces the data files,
the model and the certificates with its own (README, "A real federation").
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

from .certs import create_certs

EXAMPLES_PER_CLIENT = 48
EVAL_EXAMPLES = 16


def write_data(folder: Path, clients: int, *, per_client: int = EXAMPLES_PER_CLIENT,
               num_eval: int = EVAL_EXAMPLES) -> List[Path]:
    """client<i>.jsonl for each client, eval.jsonl and tokenizer.json in `folder`: prompt/completion
    records of the synthetic source (seed 0), `per_client` each, and a word tokenizer of them all."""
    from ..data.sources import load_dataset
    from ..data.tokenizers import WordTokenizer

    train, evals = load_dataset("synthetic", seed=0, num_eval=num_eval, num_train=per_client * clients)
    written = []
    for c in range(clients):
        written.append(_write_jsonl(folder / f"client{c}.jsonl", train[c * per_client:(c + 1) * per_client]))
    written.append(_write_jsonl(folder / "eval.jsonl", evals))
    tokenizer = folder / "tokenizer.json"
    WordTokenizer.from_texts([t for e in train + evals for t in (e.source, e.target)]).save(tokenizer)
    return written + [tokenizer]


def _write_jsonl(path: Path, examples) -> Path:
    with open(path, "w") as f:
        for e in examples:
            f.write(json.dumps({"prompt": e.source, "completion": e.target}) + "\n")
    return path


def write_config(folder: Path, clients: int, *, port: int) -> Path:
    """run.yaml: the demo model and SplitLoRA with int8 at the cut, every party reading it."""
    path = folder / "run.yaml"
    files = ", ".join(str(folder / f"client{c}.jsonl") for c in range(clients))
    path.write_text(f"""\
# A first federation (splitlora federation-example): the demo model, SplitLoRA, int8 at the cut.
strategy: splitlora
output_dir: {folder / 'runs' / 'server'}
model:
  config: {{model_type: gpt2, n_layer: 4, n_embd: 64, n_head: 4, n_positions: 128,
           activation_function: gelu_pytorch_tanh}}
  cut_layer: 2
data:
  source: jsonl
  format: prompt_completion
  # In a federation each client reads its own file (--data) and the server none; with these,
  # `splitlora train --config run.yaml` runs the same training in one process, for comparison.
  client_paths: [{files}]
  tokenizer: {folder / 'tokenizer.json'}   # every party's vocabulary
  eval_path: {folder / 'eval.jsonl'}       # the server's held-out data (it never reads training data)
train: {{clients: {clients}, batch_size: 8, steps: 60, aggregate_every: 10, eval_every: 0}}
codec: {{bits: 8}}
eval: {{generate: true, max_new_tokens: 24, max_sources: 8}}
federation: {{listen: "127.0.0.1:{port}", step_timeout_s: 60, wait_s: 300}}
""")
    return path


def write_example(folder, names: Sequence[str], *, port: int = 50051, log=print) -> List[str]:
    """Writes the example into `folder` (refusing a folder that already holds one) and returns the
    commands that run it."""
    folder = Path(folder).resolve()
    names = list(names)
    if len(names) < 2:
        raise ValueError(f"--clients: a federation needs at least two clients; got {names}")
    if (folder / "run.yaml").exists():
        raise ValueError(f"{folder} already holds an example (run.yaml); choose an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_data(folder, len(names))
    config = write_config(folder, len(names), port=port)
    create_certs(folder / "certs", names, log=lambda *_: None)
    # Clients are numbered by sorted name (the server orders them so): client i reads client<i>.jsonl.
    server = (f"splitlora server --config {config} --certs {folder / 'certs'}")
    commands = [server] + [
        f"splitlora client --config {config} --server 127.0.0.1:{port} --name {name} --certs {folder / 'certs'} "
        f"--data {folder / f'client{i}.jsonl'}" for i, name in enumerate(sorted(names))]
    log(f"wrote a federation example into {folder}: run.yaml, tokenizer.json, eval.jsonl, "
        + ", ".join(f"client{i}.jsonl" for i in range(len(names))) + ", certs/")
    return commands
