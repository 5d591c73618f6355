"""A training run from a config: build everything, train, evaluate, checkpoint, export.

    config -> data -> split model + adapters -> strategy steps (transport, codec) -> rounds
    (aggregation, checkpoint) -> final evaluation -> run folder

The run folder (`output_dir`) holds `config.yaml` (the resolved config), `metrics.jsonl` (one
line per step, round and evaluation), `summary.json`, `generations.jsonl` (every decoded output of
the final evaluation, when it generates), `checkpoints/`, the exported PEFT adapter with the
tokenizer (`adapter/`; for a base model built from a config or read from a GGUF file, the base
model is saved to `base_model/`, which the adapter's config names; FedCyBGD, which trains full
weights, writes the whole model to `model/` instead; see `export_result`) and `loss.png`. A run with `resume: true` continues from the last checkpoint and
ends exactly where an uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from . import config as config_mod
from .adapters import LoraSpec, add_lora, check_targets_exist, existing_targets, whole_model_with_adapters
from .architectures import check_split
from .checkpoint import (CheckpointError, checkpoint_step, find_checkpoint, latest_checkpoint, list_checkpoints,
                         load_checkpoint, rng_state, save_checkpoint, set_rng_state, verify_checkpoint)
from .timemodel import (SIM_COMPUTE_KEYS, SIM_LINK_KEYS, SIM_RECORD_PARTS, TimeModel, as_sim_time, count_params,
                        peak_memory_bytes)
from .transport import is_client_process, make_transport

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA device; use device=cpu or device=auto")
    return torch.device(name)


@dataclass
class Built:
    """What `build` makes from a config (shared by train, eval and export)."""

    cfg: object
    device: torch.device
    tokenizer: object
    train_records: list  # data.records: the records behind train_data's rows, in order
    eval_records: list
    train_data: object
    eval_data: object
    setup: object  # strategies.TrainSetup
    eval_items: list  # data.records.GenerationItem: one per distinct evaluation prompt (none for text)
    stop_ids: tuple  # token ids that end a generated answer (eos; a chat template's end of turn)


def _model_source(cfg, vocab_size: int, tokenizer) -> dict:
    m = cfg.model
    if m.config is not None:
        model_config = dict(m.config)
        if model_config.get("vocab_size") is None:
            model_config["vocab_size"] = vocab_size
        # Special tokens must exist in the vocabulary (GPT2Config defaults to 50256).
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if model_config.get(key) is None or model_config[key] >= model_config["vocab_size"]:
                model_config[key] = tokenizer.eos_id if key != "pad_token_id" else tokenizer.pad_id
        return {"config": model_config}
    if m.name is not None:
        return {"name": m.name}
    return {"path": m.path, "gguf_file": m.gguf_file}


def _bottom_loadable(cfg) -> bool:
    """Whether a client process can load its bottom layers alone (models.load_bottom_layers): from
    saved safetensors weights (a folder or a named model), with a plain (not U-shaped) split. A model
    built from a config is initialised whole, the same for every party, and a GGUF file is read
    whole; the client then loads everything and drops the server's part."""
    return cfg.model.config is None and cfg.model.gguf_file is None and not cfg.train.u_shape


def segments_on_device(client, server, tail, role: Optional[str]) -> list:
    """The segments a process runs on its device. A client process (transport=dist, role
    clientN) never runs the server's layers (build() drops their weights), so a weak client's
    accelerator holds its bottom layers only. The server process and a one-process run use every
    segment (the server evaluates through the clients' parts)."""
    if is_client_process(role):
        return [s for s in (client, tail) if s is not None]
    return [s for s in (client, server, tail) if s is not None]


def build(cfg, *, log: Callable[[str], None] = print, role: Optional[str] = None, transport=None,
          federation=None) -> Built:
    """Data, tokenizer, model, split, adapters, partition and loaders: identical for every
    strategy given the same config and seed.

    `transport`: this process's (already connected) transport instead of one made from the config;
    `federation`: one party of a federation (splitlora.federation.data), which reads its own data
    only: a client its file, the server no training data at all."""
    from .data import ClientLoader, HFTokenizer, WordTokenizer, load_tokenizer, partition
    from .data.loading import load_records
    from .data.records import SkipCounter, encode_records, generation_items, record_texts
    from .models import load_bottom_layers, load_causal_lm
    from .split import split_model, split_model_u_shape
    from .strategies import TrainSetup

    from .preflight import check_input_paths

    device = resolve_device(cfg.device)
    d = cfg.data
    check_input_paths(cfg)  # a missing model folder or tokenizer: one line naming the key, before any work
    records = (federation.records(d, cfg.seed) if federation is not None
               else load_records(d, clients=cfg.train.clients, seed=cfg.seed))
    for line in records.notes:
        log(line)

    # A model built from a config takes the data's tokenizer (or a word tokenizer built from the
    # data); a named or saved model brings its own unless data.tokenizer names another.
    tokenizer = None
    if d.tokenizer is not None:
        try:
            tokenizer = load_tokenizer(d.tokenizer)
        except (OSError, ValueError) as err:  # not a tokenizer: one line naming the key
            raise ValueError(f"data.tokenizer: {err}") from None
    elif cfg.model.config is not None:
        tokenizer = WordTokenizer.from_texts(record_texts(records.train + records.eval, d.chat_template))
    source = _model_source(cfg, tokenizer.vocab_size if tokenizer is not None else 0, tokenizer)
    client_process = is_client_process(role)
    if client_process and _bottom_loadable(cfg):
        # A client process reads its own bottom layers from the saved weights and nothing more: the
        # rest of the model exists on the meta device only (models.load_bottom_layers).
        model, model_tokenizer = load_bottom_layers(cfg.model.cut_layer, name=source.get("name"),
                                                    path=source.get("path"), dtype=_DTYPES[cfg.model.dtype])
    else:
        model, model_tokenizer = load_causal_lm(**source, dtype=_DTYPES[cfg.model.dtype], seed=cfg.seed)
    if tokenizer is None:
        if model_tokenizer is None:
            where = cfg.model.name or cfg.model.path
            raise ValueError(f"model {where!r} comes without a tokenizer; set data.tokenizer to a tokenizer folder or file")
        tokenizer = HFTokenizer(model_tokenizer)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{model.config.vocab_size}; use the model's tokenizer (data.tokenizer) or a larger vocab_size")
    model.config.use_cache = False
    # The base model itself is never trained: strategies train adapters on copies (or, FedCyBGD,
    # new Parameters). Frozen, its weights can be shared by the export, evaluation and centralized
    # models instead of copied (adapters.whole_model_with_adapters). It stays in host memory: what
    # runs on the device are the segments (and the copies the whole-model strategies make), so a
    # split run holds its weights on the device once, not twice.
    model.requires_grad_(False)
    num_layers = model.config.num_hidden_layers
    server_end = config_mod.validate_model_layers(cfg, num_layers)
    # The split must compute what the whole model computes (a wrong architecture entry would train
    # another model). Not checkable in a client process that loaded its bottom layers only
    # (models.load_bottom_layers): the rest of its model is on the meta device, without weights.
    if not any(p.is_meta for p in model.parameters()):
        check_split(model, cfg.model.cut_layer, server_end if cfg.train.u_shape else None)

    train_skips = records.train_skips or SkipCounter("training")
    eval_skips = records.eval_skips or SkipCounter("evaluation")
    train_data, train_kept = encode_records(records.train, tokenizer, d.max_length, d.on_long,
                                            chat_template=d.chat_template, skips=train_skips)
    eval_data, eval_kept = encode_records(records.eval, tokenizer, d.max_length, d.on_long,
                                          chat_template=d.chat_template, skips=eval_skips)
    train_records = [records.train[i] for i in train_kept]
    eval_records = [records.eval[i] for i in eval_kept]
    for skips in (train_skips, eval_skips):
        if skips.summary():
            logger.warning("data: %s", skips.summary())
            log(f"warning: data: {skips.summary()}")
    if train_data.num_truncated:
        log(f"data: {train_data.num_truncated} of {len(train_data)} training records were longer than "
            f"data.max_length={d.max_length}: their completions were cut (data.on_long=skip leaves them out)")
    eval_items, stop_ids = generation_items(eval_records, tokenizer, chat_template=d.chat_template)

    n = cfg.train.clients
    if federation is not None:
        shards = None  # the party's own loaders, below
    elif records.shards is not None:
        # Natural partitions: each client keeps its own records (those that survived encoding).
        position = {record_index: row for row, record_index in enumerate(train_kept)}
        shards = [[position[i] for i in shard if i in position] for shard in records.shards]
        empty = [records.client_names[c] for c, shard in enumerate(shards) if not shard]
        if empty:
            raise ValueError(f"data: no training record left for client(s) {', '.join(empty)} after skipping "
                             f"unusable records; see the warning above")
        log("data: natural partition, records per client: "
            + ", ".join(f"{name}={len(shard)}" for name, shard in zip(records.client_names, shards)))
    else:
        shards = partition([r.group for r in train_records], n, d.partition, d.dirichlet_alpha, cfg.seed)
    trim = d.pad_to == "batch"
    if federation is not None:
        shards, loaders, seq_len = federation.loaders(train_data, cfg, trim)
    elif d.packing:
        from .data.packing import pack_client_datasets

        # Several whole examples per row (one client's only), attention kept within each example;
        # train.batch_size then counts rows. Evaluation stays unpacked.
        client_data = pack_client_datasets(train_data, shards, d.max_length)
        loaders = [ClientLoader(data, range(len(data)), cfg.train.batch_size, seed=cfg.seed, client_id=c, trim=trim)
                   for c, data in enumerate(client_data)]
        seq_len = client_data[0].seq_len  # every client's rows share one width
        log(f"data: packed {len(train_data)} training records into "
            f"{sum(len(x) for x in client_data)} rows of up to {d.max_length} tokens (data.packing)")
    else:
        loaders = [ClientLoader(train_data, shard, cfg.train.batch_size, seed=cfg.seed, client_id=c, trim=trim)
                   for c, shard in enumerate(shards)]
        seq_len = train_data.seq_len

    if cfg.train.u_shape:
        client, server, tail = split_model_u_shape(model, cfg.model.cut_layer, server_end)
    else:
        (client, server), tail = split_model(model, cfg.model.cut_layer), None
    lc, ls = cfg.lora.client, cfg.lora.server
    segments = [s for s in (client, server, tail) if s is not None]
    if cfg.strategy == "fedcybgd":
        # Full-parameter training: the LoRA settings do not apply; adapters only where they exist.
        lc = dataclasses.replace(lc, target_modules=existing_targets(segments, lc.target_modules))
        ls = dataclasses.replace(ls, target_modules=existing_targets(segments, ls.target_modules))
    check_targets_exist(segments, lc.target_modules, "lora.client.target_modules")
    check_targets_exist(segments, ls.target_modules, "lora.server.target_modules")
    quantized = _quantize_sides(cfg, client, server, tail, device, role, log)
    # Adapters' initial values are seeded per module: the same for every strategy and cut.
    client_spec = LoraSpec(lc.r, lc.alpha, lc.dropout, lc.rslora, cfg.lora.adapter_dtype)
    add_lora(client, lc.target_modules, client_spec, seed=cfg.seed)
    if tail is not None:
        add_lora(tail, lc.target_modules, client_spec, seed=cfg.seed)
    add_lora(server, ls.target_modules, LoraSpec(ls.r, ls.alpha, ls.dropout, ls.rslora, cfg.lora.adapter_dtype),
             seed=cfg.seed)
    for seg in segments_on_device(client, server, tail, role):
        seg.to(device)
    if client_process:
        # A client process runs neither the server's layers nor the whole model (the server exports
        # and evaluates): the server's weights go (the meta device keeps shapes and dtypes only) and
        # so does the whole model, so a client holds its own part of the model and nothing more.
        server.to("meta")
    torch.manual_seed(cfg.seed + 2)  # the training stream (dropout) starts from here

    net = cfg.network
    setup = TrainSetup(
        cfg=cfg, device=device, base_model=None if client_process else model, client=client, server=server,
        tail=tail, loaders=loaders, client_weights=[float(len(s)) for s in shards], seq_len=seq_len,
        num_layers=num_layers, hidden_size=model.config.hidden_size,
        transport=transport if transport is not None else make_transport(cfg.transport if role is not None else "local",
                                                                          timeout_s=net.timeout_s),
        time_model=TimeModel(net.client_tflops, net.server_tflops, net.bandwidth_mbps, net.latency_ms),
        role=role, quantized_modules=quantized,
    )
    return Built(cfg, device, tokenizer, train_records, eval_records, train_data, eval_data, setup,
                 eval_items, stop_ids)


def _quantize_sides(cfg, client, server, tail, device, role: Optional[str], log) -> List[str]:
    """model.quantize: the linear layers of the chosen side's segments (those this process holds)
    become 4-bit, before their adapters go on. Returns their whole-model names, with which the
    evaluation's whole model is quantized the same way (_generation_model)."""
    if cfg.model.quantize is None:
        return []
    from .quantize import quantize_segment, sides_quantized, whole_model_names

    held = segments_on_device(client, server, tail, role)
    chosen = {"client": [client, tail], "server": [server]}
    names = []
    for side in sides_quantized(cfg.model.quantize_side):
        for segment in chosen[side]:
            if segment is not None and segment in held:
                names += whole_model_names(segment, quantize_segment(segment, cfg.model.quantize, device,
                                                                     embeddings=cfg.model.quantize_embeddings))
    kept = "norms and the LM head" if cfg.model.quantize_embeddings else "embeddings, norms and the LM head"
    log(f"model: {len(names)} layers of the {cfg.model.quantize_side} side held in 4 bits "
        f"({cfg.model.quantize}, bitsandbytes); {kept} stay in {cfg.model.dtype}")
    return names


class MetricsLog:
    """metrics.jsonl: appends one JSON object per line; on resume drops what came after the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line) if line.strip() else None
            except ValueError:  # a line cut short by a killed process (SIGKILL, power loss): it is redone
                record = None
            if isinstance(record, dict) and record.get("step", -1) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        # One write(2) of the whole line: an interruption leaves the line whole or absent.
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write (rare on a regular file): finish the line
                written += os.write(fd, data[written:])
        finally:
            os.close(fd)

    def read(self) -> List[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def evaluate(strategy, built: Built, *, generate: bool, progress: bool = True) -> dict:
    from .evaluate import evaluate_generation, evaluate_loss

    cfg = built.cfg
    strategy.train(False)
    try:
        fn = strategy.logits_fn()
        with torch.no_grad():
            # The device is given: a split strategy's logits_fn is a closure, which has no parameters
            # to read it from (the token ids would stay on the host while the weights are on CUDA).
            out = evaluate_loss(fn, built.eval_data, batch_size=cfg.eval.batch_size, device=built.device)
            result = {"eval_loss": out["loss"], "eval_ppl": out["perplexity"]}
            # Text records have no reference to score a generation against.
            if generate and built.eval_items:
                whole = _generation_model(strategy, built)
                gen = evaluate_generation(fn if whole is None else whole, built.eval_items, built.tokenizer,
                                          max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                                          max_sources=cfg.eval.max_sources, batch_size=cfg.eval.batch_size,
                                          stop_ids=built.stop_ids, device=built.device)
                result.update({"bleu": gen["bleu"], "rouge_l": gen["rouge_l"], "samples": gen["samples"][:3],
                               "outputs": gen["outputs"]})
    finally:
        strategy.train(True)
    return result


def write_generations(path: Path, result: dict) -> dict:
    """Moves an evaluation's decoded outputs (one per source) into the JSON-lines file `path` (a
    run's generations.jsonl), so that the metrics and the summary keep a few samples only; returns
    the result without them."""
    outputs = result.get("outputs")
    if outputs is None:
        return result
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(o) + "\n" for o in outputs))
    os.replace(tmp, path)
    return {k: v for k, v in result.items() if k != "outputs"}


def _generation_model(strategy, built: Built):
    """The unsplit transformers model with the strategy's global adapters, when its export is exact
    (`Strategy.exact_export`), else None. Generation then runs on it with the KV cache: one token's
    forward per new token instead of the whole prefix (about 4x faster for SmolLM2-135M on one CPU
    thread, see splitlora/evaluate.py; a split model's composed segments have no cache)."""
    if not getattr(strategy, "exact_export", False):
        return None
    plans, state = strategy.export_state()
    quantized = built.setup.quantized_modules
    if quantized:
        # The segments trained on a 4-bit base: the whole model generates on the same one
        # (quantization is deterministic, so these layers equal the segments').
        from .quantize import quantize_modules

        def prepare(model):
            quantize_modules(model, quantized, built.cfg.model.quantize, built.device)
    else:
        prepare = None
    return whole_model_with_adapters(built.setup.base_model, plans, state, device=built.device,
                                     prepare=prepare).eval()


def _state(strategy, built: Built, step: int, totals: dict) -> dict:
    s = built.setup
    return {
        "step": step,
        "strategy": strategy.state_dict(),
        "loaders": [l.state_dict() for l in s.loaders],
        "rng": rng_state(),
        "ledger": s.transport.ledger.state_dict(),
        **({"received": s.transport.received.state_dict()} if hasattr(s.transport, "received") else {}),
        "totals": dict(totals),
        "activation_peaks": strategy.activation_peaks.state_dict(),
    }


def _restore(strategy, built: Built, state: dict) -> dict:
    s = built.setup
    strategy.load_state_dict(state["strategy"])
    for loader, ls in zip(s.loaders, state["loaders"]):
        loader.load_state_dict(ls)
    set_rng_state(state["rng"])
    s.transport.ledger.load_state_dict(state["ledger"])
    if "received" in state and hasattr(s.transport, "received"):
        s.transport.received.load_state_dict(state["received"])
    strategy.activation_peaks.load_state_dict(state.get("activation_peaks", {}))
    # A checkpoint written before the link parts of the simulated time were kept lacks them: they
    # stay unknown (NaN) for the rest of the run rather than count only the steps after the resume.
    return {**_new_totals(), **dict.fromkeys(SIM_LINK_KEYS + SIM_COMPUTE_KEYS, math.nan), **state["totals"]}


def _new_totals() -> dict:
    return {"sim_time_s": 0.0, **dict.fromkeys(SIM_LINK_KEYS + SIM_COMPUTE_KEYS, 0.0), "wall_time_s": 0.0,
            "client_compute_s": 0.0, "server_compute_s": 0.0}


def _time_fields(totals: dict) -> dict:
    return {k: totals[k] for k in ("sim_time_s", *SIM_LINK_KEYS, *SIM_COMPUTE_KEYS, "wall_time_s")}


def _ledger(transport):
    # Under transport=dist the server's view (what it sent plus what it received) is the whole run.
    return transport.combined_ledger() if hasattr(transport, "combined_ledger") else transport.ledger


def _bytes_moved(transport) -> int:
    """Total bytes so far, cheaply (every step): the server's sends plus, under dist, its receipts."""
    received = getattr(transport, "received", None)
    return transport.ledger.total() + (received.total() if received is not None else 0)


def _start_distributed(cfg, log):
    """(role, this rank's checkpoint folder suffix) under transport=dist; (None, None) otherwise."""
    if cfg.transport != "dist":
        return None
    from .transport.dist import init_distributed, rank_party

    if cfg.strategy != "splitlora" or cfg.train.u_shape:
        raise ValueError(f"transport=dist runs strategy=splitlora without train.u_shape; got strategy={cfg.strategy!r}, "
                         f"u_shape={cfg.train.u_shape} (use transport=local for the others)")
    rank = init_distributed(world_size_expected=cfg.train.clients + 1, timeout_s=cfg.network.timeout_s,
                            device=resolve_device(cfg.device))
    return rank_party(rank)


def _agree_on_resume_step(step: int) -> int:
    """Every rank resumes from the newest checkpoint that all ranks have: the smallest of the
    ranks' newest valid steps (0: some rank has none; -1: some rank refuses to resume)."""
    import torch.distributed as dist

    # NCCL reduces CUDA tensors only (each rank has its GPU set by init_distributed); gloo, CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([step], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


# --- resume: which checkpoint, and whether this config may continue it ------------------------

# Keys a resumed run may change (a dotted key, or a whole section): how long it runs and what it
# reports, where it runs, and the simulated network (the time model only; under hsplitlora the
# client-side network keys size each client's cut and ranks, see _may_change_on_resume). device is
# accepted: the checkpoint is device-independent and moving a run to other hardware (the GPU
# machine died, finish on another) is legitimate, though the continuation is then not
# bit-identical to an uninterrupted run on the first device (the resume line says so). Every other
# key changes the result (model, data, strategy, lora, codec, seed, transport, the rest of train.*).
RESUME_MAY_CHANGE = ("output_dir", "resume", "overwrite", "device", "train.steps", "train.eval_every",
                     "train.log_every", "train.checkpoint_every", "eval", "network")
_HSPLITLORA_NETWORK = ("network.client_tflops", "network.bandwidth_mbps", "network.latency_ms")


def _may_change_on_resume(key: str, cfg) -> bool:
    if cfg.strategy == "hsplitlora" and key in _HSPLITLORA_NETWORK:
        return False  # hsplitlora sizes each client's cut and ranks from them (hetero.client_profiles)
    section = key.split(".", 1)[0]
    if section in ("fedcybgd", "hsplitlora") and cfg.strategy != section:
        return True  # another strategy's section: ignored by this run
    return any(key == p or key.startswith(p + ".") for p in RESUME_MAY_CHANGE)


def _flat_config(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_ABSENT = object()


def _show(value) -> str:
    if value is _ABSENT:
        return "(absent)"
    return value if isinstance(value, str) else json.dumps(value, default=str)


def config_changes(old, new) -> List[tuple]:
    """(dotted key, old value, new value) for every key whose value differs between two configs
    (RunConfig or config_to_dict dicts); a key only one of them has gets `_ABSENT` on the other side
    (shown as `(absent)`)."""
    a = _flat_config(old if isinstance(old, dict) else config_mod.config_to_dict(old))
    b = _flat_config(new if isinstance(new, dict) else config_mod.config_to_dict(new))
    keys = list(a) + [k for k in b if k not in a]
    return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in keys if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def _check_resume_config(path: Path, cfg, step: int, log: Callable[[str], None]) -> List[str]:
    """Compares the run's config.yaml with `cfg`, about to continue the run from its checkpoint of
    `step`: prints the accepted changes (one line) and returns one problem per refused key."""
    problems = []
    if cfg.train.steps < step:
        problems.append(f"train.steps: {cfg.train.steps} is fewer than the {step} steps the checkpoint has done "
                        f"(ask for {step} or more)")
    if not path.is_file():
        log(f"resume: {path} is missing, so this config cannot be compared with the run's; continuing with it")
        return problems
    try:
        old = config_mod.load_config(path)
    except config_mod.ConfigError as err:
        log(f"warning: resume: cannot read {path} to compare it with this config ({err}); continuing with this one, "
            "unchecked")
        return problems
    accepted = []
    for key, before, after in config_changes(old, cfg):
        if _may_change_on_resume(key, cfg):
            if key not in ("resume", "overwrite"):
                accepted.append(f"{key} {_show(before)} -> {_show(after)}")
        else:
            problems.append(f"{key}: {_show(before)} -> {_show(after)}")
    if accepted and not problems:
        notes = []
        if old.train.steps != cfg.train.steps and cfg.train.lr_schedule != "constant":
            notes.append(f"train.lr_schedule={cfg.train.lr_schedule} now decays to 0 at step {cfg.train.steps}, "
                         f"not {old.train.steps}")
        if (cfg.train.steps > old.train.steps == step and step % cfg.train.aggregate_every
                and cfg.train.aggregate_every > 1):
            notes.append(f"the run's last round ended early, at step {step}")
        if old.device != cfg.device:
            notes.append("on another device the numbers differ in the last bits from an uninterrupted run")
        log("resume: changed " + ", ".join(accepted) + (f" ({'; '.join(notes)})" if notes else ""))
    return problems


def _resume_refused(out: Path, problems: List[str]) -> config_mod.ConfigError:
    err = config_mod.ConfigError(problems)
    err.args = (f"resume=true, but this config would not continue the run in {out} (its config.yaml), "
                "in key(s) that change the result (the run's value -> this config's):\n  " + "\n  ".join(problems)
                + "\nresume with the run's values, or start a new run (another output_dir, or resume=false)",)
    return err


def _resume_point(cfg, role, out: Path, ckpt_dir: Path, log: Callable[[str], None],
                  agree: Optional[Callable[[int], int]] = None) -> Optional[Path]:
    """The checkpoint a resume=true run continues from: the newest that verifies
    (checkpoint.find_checkpoint; the skipped ones are printed), None when there is none at all.
    Raises when checkpoints exist but none verifies, and (ConfigError) when this config may not
    continue the run (`_check_resume_config`). Under transport=dist every rank takes the newest step
    that all of them have, and a refusal on any rank stops them all."""
    from .transport import SERVER

    refusal = None
    found = None
    step = 0
    try:
        found = find_checkpoint(ckpt_dir, log=log)
        if found is not None:
            step = checkpoint_step(found)
            problems = _check_resume_config(out / "config.yaml", cfg, step, log) if role in (None, SERVER) else (
                [f"train.steps: {cfg.train.steps} is fewer than the {step} steps the checkpoint has done"]
                if cfg.train.steps < step else [])
            if problems:
                raise _resume_refused(out, problems)
    except ValueError as err:  # CheckpointError, ConfigError
        if role is None:
            raise
        refusal = err
    if role is not None:
        # agree: how the parties find the newest step they all have (a federation's own exchange;
        # by default a torch.distributed collective).
        common = (agree or _agree_on_resume_step)(-1 if refusal is not None else step)
        if refusal is not None:
            raise refusal
        if common < 0:
            raise ValueError(f"{role}: another process of the run refused to resume (its output says why)")
        if common != step:
            log(f"resume: {role} has the checkpoint of step {step}, but not every process has it: all resume "
                f"from step {common}" + (" (the newest they all have)" if common else ", from scratch"))
            found = ckpt_dir / f"step_{common:08d}" if common else None
            if found is not None:
                try:
                    verify_checkpoint(found)
                except CheckpointError as err:
                    raise CheckpointError(f"{role}: the checkpoint of step {common}, the newest that every process "
                                          f"has, is unusable in {ckpt_dir}: {err}") from None
    return found


# --- interruption: SIGINT (Ctrl-C) and SIGTERM ---------------------------------------------------

class RunInterrupted(SystemExit):
    """Training stopped by SIGINT (Ctrl-C) or SIGTERM. Nothing is left half-written (checkpoints are
    renamed into place whole, metrics.jsonl lines are written whole); `message`, already printed
    to stderr as one line, says where to resume from; the exit status (`code`) is 128 + the
    signal's number, 130 or 143, as a shell reports a process stopped by it. A SystemExit, so the
    command ends with that status and no traceback."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


_UNKNOWN = object()


class _Interrupts:
    """While a run trains (a context manager): SIGINT and SIGTERM raise KeyboardInterrupt in the
    main thread, except inside `atomic()` (a checkpoint being written), which finishes first; the
    previous handlers come back at the end, and a signal the process ignores (nohup, a background
    job) stays ignored. Knows where the run is (`step`, `checkpoint`) for the message that says
    where to resume from."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ckpt_dir: Path) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.step: Optional[int] = None  # the step being trained (0-based)
        self.steps_done = 0  # the steps this process finished (with their round's end), this time
        self.finished: Optional[int] = None  # train.steps, once the steps are done
        self.checkpoint = _UNKNOWN  # the step of the last whole checkpoint (None: none)
        self.signum: Optional[int] = None
        self._depth = 0
        self._pending: Optional[int] = None
        self._old: dict = {}

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                old = signal.getsignal(sig)
                if old is signal.SIG_IGN or old is None:  # ignored on purpose, or a handler outside Python
                    continue
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self._depth and self._pending is None and self.signum is None:
            self._pending = signum  # a second signal does not wait
            return
        self.signum = self.signum or self._pending or signum
        raise KeyboardInterrupt

    @contextmanager
    def atomic(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending is not None and self.signum is None:
            self.signum = self._pending
            raise KeyboardInterrupt

    # What to do next, when nothing else is said: the run continues from its last checkpoint.
    RESUME_ADVICE = "rerun the same command with resume=true"

    def stopped(self, role: Optional[str], advice: str = RESUME_ADVICE) -> RunInterrupted:
        """The RunInterrupted to raise; its message ends with `advice` (a federation client, which
        does not resume on its own, says what it does instead)."""
        signum = self.signum or self._pending or signal.SIGINT
        checkpoint = self.checkpoint
        if checkpoint is _UNKNOWN:  # stopped before the run knew: the newest whole one on disk
            checkpoint = None
            for step, path in list_checkpoints(self.ckpt_dir):
                try:
                    verify_checkpoint(path)
                except CheckpointError:
                    continue
                checkpoint = step
                break
        if self.step is not None:
            where = f"at step {self.step}"
        elif self.finished is not None:
            where = f"after the last step ({self.finished}), in the final evaluation or export"
        else:
            where = "before training started"
        last = (f"the last checkpoint is step {checkpoint} in {self.ckpt_dir}" if checkpoint is not None
                else f"there is no checkpoint yet in {self.ckpt_dir}")
        message = (f"{role + ': ' if role else ''}interrupted ({signal.Signals(signum).name}) {where}; {last}: "
                   f"{advice}")
        return RunInterrupted(message, 128 + int(signum))


def train(cfg, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Runs `cfg` to the end (or resumes it) and returns the summary (also in summary.json).

    With transport=dist this process plays one party (rank 0 the server, rank c+1 client c):
    the server writes the run folder; each client keeps its checkpoints under
    `output_dir/clients/<name>/`. A client process returns an empty summary.

    SIGINT (Ctrl-C) or SIGTERM stops it cleanly: one line on stderr says where to resume from, and
    RunInterrupted (a SystemExit of status 130 or 143) is raised."""
    interrupts = _Interrupts(Path(cfg.output_dir) / "checkpoints")
    role = None
    with interrupts:
        try:
            role = _start_distributed(cfg, log)
            try:
                return _train(cfg, role, progress=progress, log=log, interrupts=interrupts)
            finally:
                if role is not None:
                    import torch.distributed as dist

                    if dist.is_initialized():
                        dist.destroy_process_group()
        except KeyboardInterrupt:
            stop = interrupts.stopped(role)
    print(stop.message, file=sys.stderr, flush=True)
    raise stop


def _train(cfg, role, *, progress: bool, log: Callable[[str], None],
           interrupts: Optional["_Interrupts"] = None, transport=None, federation=None,
           agree_resume: Optional[Callable[[int], int]] = None) -> dict:
    """One process's part of a run (`train`). `transport` and `federation`: a federation party's
    connected transport and its own data (splitlora.federation.server / client), see `build`."""
    from tqdm.auto import tqdm

    from .strategies import make_strategy
    from .strategies.base import PartyRNG
    from .transport import SERVER, TransportError

    is_server = role in (None, SERVER)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints" if is_server else out / "clients" / role / "checkpoints"
    # A folder holding another run is refused unless resume=true or overwrite=true (which deletes it).
    from .preflight import prepare_output_dir

    prepare_output_dir(cfg, role, log=log)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    interrupts = interrupts if interrupts is not None else _Interrupts(ckpt_dir)
    interrupts.ckpt_dir = ckpt_dir
    # Which checkpoint to continue from, decided (and under transport=dist agreed by every rank)
    # before the run folder's config.yaml is replaced: a refused resume changes nothing on disk.
    found = _resume_point(cfg, role, out, ckpt_dir, log, agree_resume) if cfg.resume else None
    interrupts.checkpoint = checkpoint_step(found) if found is not None else None
    if is_server:
        config_mod.dump_config(cfg, out / "config.yaml")
    built = build(cfg, log=log, role=role, transport=transport, federation=federation)
    setup = built.setup
    strategy = make_strategy(setup)
    # Models load in eval mode; training runs in train mode (LoRA dropout on).
    strategy.train(True)
    if role is not None:
        # This process's global generator is its party's stream (see PartyRNG).
        torch.set_rng_state(PartyRNG.initial_state(cfg.seed, role))
    metrics = MetricsLog(out / "metrics.jsonl")
    t = cfg.train
    totals = _new_totals()
    start = 0
    if cfg.resume:
        if found is not None:
            step, state = load_checkpoint(found)
            totals = _restore(strategy, built, state)
            start = step
            if is_server:
                metrics.truncate_after(step - 1)
            log(f"resuming {cfg.strategy} from {found} (step {start} of {t.steps})")
        else:
            log(f"resume: no checkpoint in {ckpt_dir}; starting from step 0")
    join_at = getattr(federation, "start_step", None)
    if join_at:
        # A client joining a running federation (splitlora.federation): it starts at the round the
        # server admits it to, with the global adapters, which come with that round's first message.
        start = int(join_at)
        log(f"joining the running federation at step {start} of {t.steps}")
    if start == 0 and is_server:
        metrics.path.unlink(missing_ok=True)
    if built.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(built.device)

    if is_server and strategy.aggregates and t.eval_every and t.eval_every % t.aggregate_every:
        # Mid-round, the evaluated model is the average of the clients' adapters, which no party
        # holds yet and whose exchange the simulated time has not counted.
        log(f"note: train.eval_every={t.eval_every} is not a multiple of train.aggregate_every={t.aggregate_every}: "
            f"mid-round evaluations see the clients' averaged adapters before the round's exchange, which the "
            f"simulated time has not counted yet")
    transport = setup.transport
    bar = tqdm(total=t.steps, initial=start, desc=f"{cfg.strategy}" + (f" ({role})" if role else ""), unit="step",
               # A federation client shows its own bar (its steps, its bytes); dist clients share
               # the server's terminal, so only the server shows one there.
               disable=not (progress and (is_server or federation is not None)), dynamic_ncols=True)
    round_wall = 0.0
    round_sim = 0.0
    try:
        for step in range(start, t.steps):
            interrupts.step = step
            round_index = step // t.aggregate_every
            transport.set_round(round_index)
            wall0 = time.perf_counter()
            before = _bytes_moved(transport) if is_server else 0
            result = strategy.train_step(step)
            if is_server and result.skipped is None and not math.isfinite(result.loss):
                raise FloatingPointError(f"the training loss became {result.loss} at step {step}; lower train.lr "
                                         "or enable train.max_grad_norm")
            end_of_round = (step + 1) % t.aggregate_every == 0 or step + 1 == t.steps
            sim = as_sim_time(result.sim_time_s)
            if end_of_round and strategy.aggregates:
                sim = sim + strategy.end_round(step)
            wall = time.perf_counter() - wall0
            totals["sim_time_s"] += float(sim)
            for key, part in SIM_RECORD_PARTS.items():  # link and per-party compute parts, to re-price
                totals[key] += getattr(sim, part)
            totals["wall_time_s"] += wall
            totals["client_compute_s"] += result.client_compute_s
            totals["server_compute_s"] += result.server_compute_s
            round_wall += wall
            round_sim += float(sim)
            interrupts.steps_done += 1
            if is_server:
                moved = _bytes_moved(transport)
                # A skipped step (a federation's step whose clients all dropped out) has no loss.
                skipped = {"loss": None, "skipped": result.skipped} if result.skipped else {"loss": result.loss}
                metrics.write({"type": "step", "step": step, "round": round_index, **skipped,
                               **_time_fields(totals),
                               "client_compute_s": result.client_compute_s,
                               "server_compute_s": result.server_compute_s,
                               "bytes": moved - before, "bytes_total": moved,
                               **result.extra})
                bar.update(1)
                if result.skipped:
                    log(f"step {step} skipped: {result.skipped}")
                bar.set_postfix(loss="skipped" if result.skipped else f"{result.loss:.3f}", sent=format_bytes(moved))
                if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                    eval0 = time.perf_counter()
                    last_eval = evaluate(strategy, built, generate=False)
                    # wall_time_s: training time so far (evaluations excluded), as on step records.
                    metrics.write({"type": "eval", "step": step, **_time_fields(totals),
                                   "eval_time_s": time.perf_counter() - eval0,
                                   **last_eval})
            elif not bar.disable:  # a federation client: what it has sent and received so far
                bar.update(1)
                bar.set_postfix(moved=format_bytes(_bytes_moved(transport)))
            if end_of_round:
                if is_server:
                    ledger = _ledger(transport)
                    metrics.write({
                        "type": "round", "step": step, "round": round_index, "sim_round_s": round_sim,
                        "wall_round_s": round_wall,
                        "bytes": {f"client{c}": {d: {k: ledger.round_total(round_index, client=f"client{c}",
                                                                          direction=d, kind=k)
                                                     for k in ("activations", "gradients", "labels", "adapters")}
                                                 for d in ("up", "down")}
                                  for c in range(len(setup.loaders))},
                        # The round's clients (federation.clients_per_round, or a federation's sample).
                        **({"clients": [f"client{c}" for c in strategy.round_clients]}
                           if getattr(strategy, "round_clients", None) is not None else {}),
                    })
                round_wall = round_sim = 0.0
                rounds_done = round_index + 1
                if t.checkpoint_every and (rounds_done % t.checkpoint_every == 0) and step + 1 < t.steps:
                    with interrupts.atomic():  # a signal now waits for the checkpoint to be whole
                        save_checkpoint(ckpt_dir, step + 1, _state(strategy, built, step + 1, totals))
                        interrupts.checkpoint = interrupts.step = step + 1
    except TransportError as err:
        # The last completed round's checkpoint is on disk on every rank; say where to resume.
        raise TransportError(f"{role or 'run'} stopped at step {step}: {err}. The last completed round is "
                             f"checkpointed in {ckpt_dir}; rerun with resume=true to finish") from None
    finally:
        bar.close()

    interrupts.step = None
    interrupts.finished = t.steps
    with interrupts.atomic():
        save_checkpoint(ckpt_dir, t.steps, _state(strategy, built, t.steps, totals))
        interrupts.checkpoint = t.steps
    if role is not None and federation is None:  # a torch.distributed collective: transport=dist only
        strategy.gather_client_memory()
    if not is_server:
        return {}
    eval0 = time.perf_counter()
    final = write_generations(out / "generations.jsonl", evaluate(strategy, built, generate=cfg.eval.generate))
    metrics.write({"type": "eval", "step": t.steps - 1, **_time_fields(totals),
                   "eval_time_s": time.perf_counter() - eval0, **final})
    adapter_dir = export_result(strategy, built, out)
    _plot(metrics.read(), out / "loss.png", title=f"{cfg.strategy} ({_codec_name(cfg)})")

    ledger = _ledger(transport)
    steps_losses = [r["loss"] for r in metrics.read() if r.get("type") == "step" and r.get("loss") is not None]
    summary = {
        "strategy": cfg.strategy,
        "codec": _codec_name(cfg),
        "transport": cfg.transport,
        "steps": t.steps,
        "clients": t.clients,
        "final_train_loss": sum(steps_losses[-t.log_every:]) / max(1, len(steps_losses[-t.log_every:])),
        **{k: v for k, v in final.items() if k != "samples"},
        "samples": final.get("samples", []),
        "bytes": ledger.summary(),
        "bytes_by_kind": {k: ledger.total(kind=k) for k in ("activations", "gradients", "labels", "adapters")},
        "bytes_total": ledger.total(),
        **totals,
        "trainable_params": _trainable_params(strategy, setup),
        "memory_per_side": strategy.memory_per_side(),
        "peak_memory_bytes": peak_memory_bytes(built.device),
        "adapter": str(adapter_dir),
    }
    privacy = strategy.privacy_report() if hasattr(strategy, "privacy_report") else None
    if privacy is not None:  # DP on (splitlora.privacy): epsilon at delta for the whole run
        from .privacy.settings import privacy_line

        summary["privacy"] = privacy
        log(privacy_line(privacy))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_result(strategy, built: Built, out: Path) -> Path:
    """What a run hands over, each loadable with plain transformers (+ PEFT) from what it records:
    the PEFT adapter for LoRA strategies (`adapter/`, with the tokenizer; its base model is named
    in adapter_config.json, and saved to `base_model/` when it exists nowhere else, see
    `base_model_folder`), the whole fine-tuned model for full-parameter ones (`model/`,
    save_pretrained, with the tokenizer)."""
    out = Path(out)
    if hasattr(strategy, "export_model"):
        return export_whole_model(strategy, built, out / "model")
    return export_adapter(strategy, built, out / "adapter", base_dir=out / "base_model")


def export_whole_model(strategy, built: Built, path: Path) -> Path:
    """A full-parameter strategy's trained model (`strategy.export_model`, save_pretrained) with the
    run's tokenizer: `AutoModelForCausalLM.from_pretrained(path)`, `AutoTokenizer.from_pretrained(path)`."""
    path = Path(path)
    strategy.export_model(path)
    _enable_kv_cache(path)
    save_tokenizer(built, path)
    return path


def export_adapter(strategy, built: Built, path: Path, *, base_dir: Optional[Path] = None) -> Path:
    """The merged client+server adapters, on the whole model's module names, in PEFT format, with
    the run's tokenizer beside them. adapter_config.json's `base_model_name_or_path` is a folder
    that `from_pretrained` reads (`base_model_folder`; a base model that no such folder holds is
    saved to `base_dir`, by default `path/base_model`), so

        base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, path); tokenizer = AutoTokenizer.from_pretrained(path)

    (or `AutoPeftModelForCausalLM.from_pretrained(path)`) is the run's model, without splitlora."""
    from splitlora_kernels import save_peft_adapter

    from splitlora_kernels.layers import lora_modules

    path = Path(path)
    plans, state = strategy.export_state()
    model = whole_model_with_adapters(built.setup.base_model, plans, state)
    # A PEFT adapter_config holds one lora_dropout; dropout only matters for further training,
    # so sides with different rates export the larger one.
    modules = lora_modules(model).values()
    dropout = max(m.lora_dropout for m in modules)
    for m in modules:
        m.lora_dropout = dropout
    base = base_model_folder(built, path / "base_model" if base_dir is None else Path(base_dir))
    save_peft_adapter(model, path, base_model_name_or_path=base)
    save_tokenizer(built, path)
    return path


def base_model_folder(built: Built, save_to: Path) -> str:
    """The absolute path of a folder that `AutoModelForCausalLM.from_pretrained` reads as the run's
    base model (an adapter's `base_model_name_or_path`):

    - a named model: its converted folder in splitlora's cache (`<cache>/models/<name>`);
    - `model.path` (a save_pretrained folder): that folder;
    - a model built from `model.config` (random weights from the seed) or dequantized from a GGUF
      file: no folder holds it as such, so it is saved to `save_to` (save_pretrained, its config
      resolved: vocab_size and special token ids filled in; with the run's tokenizer).

    Absolute: transformers resolves a relative path against the working directory of whoever loads
    the adapter, not against the adapter's folder, so a relative one (a run's paths are relative to
    where it was started) would break as soon as the adapter is loaded from anywhere else. An
    absolute path breaks only when the base folder itself moves; then pass the moved folder to
    from_pretrained (a saved base model sits beside the adapter, as `save_to`)."""
    m = built.cfg.model
    if m.name is not None:
        from .models import _named_folder

        return os.path.abspath(_named_folder(m.name, None))
    if m.path is not None and m.gguf_file is None:
        return os.path.abspath(m.path)
    save_base_model(built, save_to)
    return os.path.abspath(save_to)


def save_base_model(built: Built, folder: Path) -> Path:
    """The run's base model (frozen, never trained) as a save_pretrained folder with the run's
    tokenizer, written beside `folder` and renamed into place (no half-written folder remains)."""
    import shutil

    model = built.setup.base_model
    if model is None or any(p.is_meta for p in model.parameters()):
        raise ValueError("this process does not hold the whole base model (a client process under transport=dist); "
                         "export from the server's process")
    if getattr(model.config, "quantization_config", None) is not None:
        # A GGUF-loaded model (dequantized on load) carries a quantization_config and refuses
        # save_pretrained: a plain model of the same config with the same weights (models._convert).
        import copy

        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(model.config)
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
        plain.load_state_dict(model.state_dict())
        model = plain
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _enable_kv_cache(tmp)
    save_tokenizer(built, tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def _enable_kv_cache(folder: Path) -> None:
    """build() turns the KV cache off for training (`use_cache=False`): a saved model gets the
    transformers default back, so that generating with it uses the cache."""
    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("use_cache") is False:
        config["use_cache"] = True
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_tokenizer(built: Built, folder: Path) -> None:
    """The run's tokenizer as files `AutoTokenizer.from_pretrained(folder)` reads: a transformers
    tokenizer as it is (save_pretrained), with its eos token named when it lacked one and
    `data.chat_template` as its chat template when set; the word tokenizer of a config-built model
    as the equivalent WordLevel tokenizer (WordTokenizer.to_transformers)."""
    import copy

    tok = built.tokenizer
    hf = getattr(tok, "hf", None)
    if hf is None:
        if not hasattr(tok, "to_transformers"):
            raise ValueError(f"cannot save the tokenizer {tok!r} in a form transformers loads")
        hf = tok.to_transformers()
    else:
        hf = copy.deepcopy(hf)  # the run's own tokenizer stays as it is
        if hf.eos_token is None:
            # HFTokenizer found the eos among well-known names; name it so generation stops there.
            hf.eos_token = hf.convert_ids_to_tokens(tok.eos_id)
    template = built.cfg.data.chat_template
    if template is not None:
        hf.chat_template = template if "{" in template else Path(template).read_text(encoding="utf-8")
    hf.save_pretrained(str(folder))
    if getattr(tok, "hf", None) is None:
        # transformers 5 names its generic fast tokenizer TokenizersBackend, which transformers 4
        # does not know; PreTrainedTokenizerFast is the same class to both.
        config_file = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_file.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_run(run_dir: str | Path, *, log: Callable[[str], None] = print):
    """(built, strategy) of a finished or stopped run, restored from its last checkpoint."""
    from .strategies import make_strategy

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"{run_dir} is not a run folder (no config.yaml); pass the output_dir of a training run")
    cfg = config_mod.load_config(run_dir / "config.yaml")
    cfg.output_dir = str(run_dir)
    found = latest_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise ValueError(f"{run_dir} has no checkpoint yet (checkpoints/latest is missing)")
    built = build(cfg, log=log)
    strategy = make_strategy(built.setup)
    step, state = load_checkpoint(found)
    _restore(strategy, built, state)
    return built, strategy, step


def _trainable_params(strategy, setup) -> dict:
    if hasattr(strategy, "memory_report"):  # full-parameter strategies report their own
        return strategy.memory_report()
    return {
        "client": count_params(setup.client, trainable_only=True) + (
            count_params(setup.tail, trainable_only=True) if setup.tail is not None else 0),
        "server": count_params(setup.server, trainable_only=True),
    }


def _codec_name(cfg) -> str:
    bits = cfg.codec.bits
    if cfg.strategy in ("fedlora", "centralized", "fedcybgd"):
        return "no cut"
    name = "fp32" if bits == 32 else ("bf16" if bits == 16 else f"int{bits}")
    if cfg.codec.error_feedback and bits < 16:
        name += "+ef"
    return name


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def _plot(records: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in records if r.get("type") == "step" and r.get("loss") is not None]  # not the skipped
    evals = [r for r in records if r.get("type") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
    axes[1].plot([r["sim_time_s"] for r in steps], [r["loss"] for r in steps], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
        axes[1].plot([r["sim_time_s"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="held-out")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("simulated time (s)")
    for ax in axes:
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
