"""A training run from a config: build everything, train, evaluate, checkpoint, export.

    config -> data -> split model + adapters -> strategy steps (transport, codec) -> rounds
    (aggregation, checkpoint) -> final evaluation -> run folder

The run folder (`output_dir`) holds `config.yaml` (the resolved config), `metrics.jsonl` (one
line per step, round and evaluation), `summary.json`, `generations.jsonl` (every decoded output of
the final evaluation, when it generates), `checkpoints/`, the exported PEFT adapter
(`adapter/`) and `loss.png`. A run with `resume: true` continues from the last checkpoint and
ends exactly where an uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch

from . import config as config_mod
from .adapters import LoraSpec, add_lora, check_targets_exist, existing_targets, whole_model_with_adapters
from .architectures import check_split
from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .timemodel import SIM_LINK_KEYS, TimeModel, as_sim_time, count_params, peak_memory_bytes
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


def build(cfg, *, log: Callable[[str], None] = print, role: Optional[str] = None) -> Built:
    """Data, tokenizer, model, split, adapters, partition and loaders: identical for every
    strategy given the same config and seed."""
    from .data import ClientLoader, HFTokenizer, WordTokenizer, load_tokenizer, partition
    from .data.loading import load_records
    from .data.records import SkipCounter, encode_records, generation_items, record_texts
    from .models import load_bottom_layers, load_causal_lm
    from .split import split_model, split_model_u_shape
    from .strategies import TrainSetup

    device = resolve_device(cfg.device)
    d = cfg.data
    records = load_records(d, clients=cfg.train.clients, seed=cfg.seed)
    for line in records.notes:
        log(line)

    # A model built from a config takes the data's tokenizer (or a word tokenizer built from the
    # data); a named or saved model brings its own unless data.tokenizer names another.
    tokenizer = None
    if d.tokenizer is not None:
        tokenizer = load_tokenizer(d.tokenizer)
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
    if records.shards is not None:
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
    if d.packing:
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
        transport=make_transport(cfg.transport if role is not None else "local", timeout_s=net.timeout_s),
        time_model=TimeModel(net.client_tflops, net.server_tflops, net.bandwidth_mbps, net.latency_ms),
        role=role,
    )
    return Built(cfg, device, tokenizer, train_records, eval_records, train_data, eval_data, setup,
                 eval_items, stop_ids)


class MetricsLog:
    """metrics.jsonl: appends one JSON object per line; on resume drops what came after the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

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
    return whole_model_with_adapters(built.setup.base_model, plans, state, device=built.device).eval()


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
    return {**_new_totals(), **dict.fromkeys(SIM_LINK_KEYS, math.nan), **state["totals"]}


def _new_totals() -> dict:
    return {"sim_time_s": 0.0, **dict.fromkeys(SIM_LINK_KEYS, 0.0), "wall_time_s": 0.0, "client_compute_s": 0.0,
            "server_compute_s": 0.0}


def _time_fields(totals: dict) -> dict:
    return {k: totals[k] for k in ("sim_time_s", *SIM_LINK_KEYS, "wall_time_s")}


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
    """Every rank resumes from the newest checkpoint that all ranks have."""
    import torch.distributed as dist

    # NCCL reduces CUDA tensors only (each rank has its GPU set by init_distributed); gloo, CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([step], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def train(cfg, *, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Runs `cfg` to the end (or resumes it) and returns the summary (also in summary.json).

    With transport=dist this process plays one party (rank 0 the server, rank c+1 client c):
    the server writes the run folder; each client keeps its checkpoints under
    `output_dir/clients/<name>/`. A client process returns an empty summary."""
    role = _start_distributed(cfg, log)
    try:
        return _train(cfg, role, progress=progress, log=log)
    finally:
        if role is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _train(cfg, role, *, progress: bool, log: Callable[[str], None]) -> dict:
    from tqdm.auto import tqdm

    from .strategies import make_strategy
    from .strategies.base import PartyRNG
    from .transport import SERVER, TransportError

    is_server = role in (None, SERVER)
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints" if is_server else out / "clients" / role / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if is_server:
        config_mod.dump_config(cfg, out / "config.yaml")
    built = build(cfg, log=log, role=role)
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
        found = latest_checkpoint(ckpt_dir)
        found_step = load_checkpoint(found)[0] if found is not None else 0
        if role is not None:
            common = _agree_on_resume_step(found_step)
            found = ckpt_dir / f"step_{common:08d}" if common else None
            if found is not None and not (found / "state.json").is_file():
                raise ValueError(f"{role}: the checkpoint of step {common}, which every rank has, is missing in {ckpt_dir}")
        if found is not None:
            step, state = load_checkpoint(found)
            totals = _restore(strategy, built, state)
            start = step
            if is_server:
                metrics.truncate_after(step - 1)
            log(f"resuming {cfg.strategy} from {found} (step {start} of {t.steps})")
        else:
            log(f"resume: no checkpoint in {ckpt_dir}; starting from step 0")
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
               disable=not (progress and is_server), dynamic_ncols=True)
    round_wall = 0.0
    round_sim = 0.0
    try:
        for step in range(start, t.steps):
            round_index = step // t.aggregate_every
            transport.set_round(round_index)
            wall0 = time.perf_counter()
            before = _bytes_moved(transport) if is_server else 0
            result = strategy.train_step(step)
            if is_server and not math.isfinite(result.loss):
                raise FloatingPointError(f"the training loss became {result.loss} at step {step}; lower train.lr "
                                         "or enable train.max_grad_norm")
            end_of_round = (step + 1) % t.aggregate_every == 0 or step + 1 == t.steps
            sim = as_sim_time(result.sim_time_s)
            if end_of_round and strategy.aggregates:
                sim = sim + strategy.end_round(step)
            wall = time.perf_counter() - wall0
            totals["sim_time_s"] += float(sim)
            totals["sim_link_s"] += sim.link_seconds
            totals["sim_link_messages"] += sim.messages
            totals["sim_link_bits"] += sim.bits
            totals["wall_time_s"] += wall
            totals["client_compute_s"] += result.client_compute_s
            totals["server_compute_s"] += result.server_compute_s
            round_wall += wall
            round_sim += float(sim)
            if is_server:
                moved = _bytes_moved(transport)
                metrics.write({"type": "step", "step": step, "round": round_index, "loss": result.loss,
                               **_time_fields(totals),
                               "client_compute_s": result.client_compute_s,
                               "server_compute_s": result.server_compute_s,
                               "bytes": moved - before, "bytes_total": moved,
                               **result.extra})
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", sent=format_bytes(moved))
                if t.eval_every and (step + 1) % t.eval_every == 0 and step + 1 < t.steps:
                    eval0 = time.perf_counter()
                    last_eval = evaluate(strategy, built, generate=False)
                    # wall_time_s: training time so far (evaluations excluded), as on step records.
                    metrics.write({"type": "eval", "step": step, **_time_fields(totals),
                                   "eval_time_s": time.perf_counter() - eval0,
                                   **last_eval})
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
                    })
                round_wall = round_sim = 0.0
                rounds_done = round_index + 1
                if t.checkpoint_every and (rounds_done % t.checkpoint_every == 0) and step + 1 < t.steps:
                    save_checkpoint(ckpt_dir, step + 1, _state(strategy, built, step + 1, totals))
    except TransportError as err:
        # The last completed round's checkpoint is on disk on every rank; say where to resume.
        raise TransportError(f"{role or 'run'} stopped at step {step}: {err}. The last completed round is "
                             f"checkpointed in {ckpt_dir}; rerun with resume=true to finish") from None
    finally:
        bar.close()

    save_checkpoint(ckpt_dir, t.steps, _state(strategy, built, t.steps, totals))
    if role is not None:
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
    steps_losses = [r["loss"] for r in metrics.read() if r.get("type") == "step"]
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
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def export_result(strategy, built: Built, out: Path) -> Path:
    """What a run hands over: the PEFT adapter for LoRA strategies (`adapter/`), the whole
    fine-tuned model for full-parameter ones (`model/`, save_pretrained)."""
    if hasattr(strategy, "export_model"):
        strategy.export_model(out / "model")
        return out / "model"
    return export_adapter(strategy, built, out / "adapter")


def export_adapter(strategy, built: Built, path: Path) -> Path:
    """The merged client+server adapters, on the whole model's module names, in PEFT format."""
    from splitlora_kernels import save_peft_adapter

    from splitlora_kernels.layers import lora_modules

    plans, state = strategy.export_state()
    model = whole_model_with_adapters(built.setup.base_model, plans, state)
    # A PEFT adapter_config holds one lora_dropout; dropout only matters for further training,
    # so sides with different rates export the larger one.
    modules = lora_modules(model).values()
    dropout = max(m.lora_dropout for m in modules)
    for m in modules:
        m.lora_dropout = dropout
    cfg = built.cfg
    base = cfg.model.path or cfg.model.name or "config:" + json.dumps(cfg.model.config, sort_keys=True)
    save_peft_adapter(model, path, base_model_name_or_path=base)
    return path


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

    steps = [r for r in records if r.get("type") == "step"]
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
