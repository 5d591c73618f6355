"""FedCyBGD: federated full-parameter fine-tuning by cycle block gradient descent (arXiv 2406.11187).

The model is cut into blocks (one per decoder layer; with `fedcybgd.blocks: all` also the
embeddings and the final norm + LM head). Each round every client trains `blocks_per_client`
blocks of the whole model in full (all their parameters, with an optimizer state for those
parameters only; everything else frozen, no LoRA), uploads only those blocks, and the server keeps
the latest version of every block. Clients then download the blocks they are behind on:

- `download: full`     every updated block, as float tensors;
- `download: subset`   a random `download_fraction` of them (the rest stay stale until a later
                       round picks them): FedCyBGD's randomized download compression;
- `download: quantized` every updated block, weight matrices quantized by the codec
                       (`download_bits`, `download_group_size`), vectors (biases, norms) as floats.

A block a client is about to train always comes down exactly (full precision, even in the
subset and quantized modes), so training never starts from a stale or quantized copy; only the
frozen context a client runs its forward through may be stale or quantized. A block a client
trained together with others (see below) always comes back to it, averaged.

Schedule. The blocks are visited in a cycle (`order`: ascending, descending, or a fresh seeded
random permutation each cycle). Round r trains the N*k consecutive cycle positions
[r*N*k, (r+1)*N*k) (N clients, k = blocks_per_client), cut into N chunks of k; client c takes
chunk (c + r) mod N, so clients rotate over the chunks from round to round (with non-IID data no
block sees only one client's data). When N*k exceeds the number of blocks, several clients train
the same block in one round and the server averages their versions (FedAvg, weighted by samples).

What is simulated, and how. The global model is one copy of `setup.base_model` (the unsplit
transformers model: FedCyBGD has no cut and trains no adapters; the setup's LoRA segments are not
used). A client trains a private copy of its blocks only and runs the rest of the model through
`torch.func.functional_call`, so N clients cost N copies of one block, not N models. What a client
holds is tracked per block as (version, exact): the server's current version exactly, an older
version (subset downloads) or a quantized one; copies that differ from the server's tensors are
kept once and shared by every client holding them. Bytes go through the transport as kind
"adapters" (the transport's kinds are fixed): uploads are the trained blocks' safetensors bytes,
downloads one packet per client per round.

Full precision: a client keeps its blocks as float32 master weights, which the optimizer updates
(a bfloat16 model computes its forward in bfloat16 from a cast of them), and uploads them in the
model's dtype, which is what the server keeps.

Memory (StepResult.extra, `memory_report()`): per client the trainable parameters, their
gradients and the optimizer state (measured from the optimizer), next to what full-model federated
fine-tuning would hold (every parameter trainable, with its gradient and optimizer state). Bytes:
the transport counts every client's per round (the trainer's "round" records); `memory_report()`
adds the last round's per client next to what full-model federated fine-tuning moves per client
per round (the whole model up and down).

Time model: every client runs in parallel; a step costs a forward through the whole model, an
input-gradient backward (about one forward) through every part above the lowest trained block,
and weight gradients for the trained blocks (`train_flops(..., full_finetune=True)`). A round ends
with the slowest upload and the slowest download.

Export: the trainer's export writes a PEFT adapter; FedCyBGD trains full weights, so the adapter
it gets from `export_state()` is the identity (the setup's initial adapters, B = 0) and a warning
says so. `export_model(path)` writes the trained model (`save_pretrained`), and every checkpoint
holds the trained blocks.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import codec
from ..adapters import adapter_state, lora_plan, whole_model_names
from ..aggregate import fedavg
from ..timemodel import forward_flops, train_flops
from ..transport import SERVER, client_name
from .base import StepResult, Strategy, Timer, causal_lm_loss, make_optimizer, make_scheduler, mask_kwargs

logger = logging.getLogger(__name__)

ORDERS = ("ascending", "descending", "random")
DOWNLOADS = ("full", "subset", "quantized")


@dataclass(frozen=True)
class Block:
    """A group of the model's parameters trained together. `position` orders the blocks from
    the input (embeddings) to the output (head), which the time model needs."""

    name: str
    params: Tuple[str, ...]
    position: int


def model_blocks(model: nn.Module, which: str = "layers") -> List[Block]:
    """The blocks of a transformers causal LM: one per decoder layer ("layers"), or also the
    embeddings and the final norm + LM head ("all"), in input-to-output order.

    A parameter tied to another (GPT-2's LM head is its token embedding) belongs to the first
    block holding it: `named_parameters()` names it once."""
    from ..split import _architecture_of

    if which not in ("layers", "all"):
        raise ValueError(f"fedcybgd.blocks must be 'layers' or 'all', got {which!r}")
    arch = _architecture_of(model)
    layers_prefix = f"{arch.backbone}.{arch.layers}."
    num_layers = len(getattr(getattr(model, arch.backbone), arch.layers))
    groups: Dict[str, List[str]] = {f"layer.{i}": [] for i in range(num_layers)}
    if which == "all":
        groups = {"embeddings": [], **groups, "head": []}
    for name, _ in model.named_parameters():
        if name.startswith(layers_prefix):
            key = f"layer.{name[len(layers_prefix):].split('.', 1)[0]}"
        elif any(name.startswith(f"{arch.backbone}.{e}.") for e in arch.embeddings):
            key = "embeddings"
        elif name.startswith(f"{arch.backbone}.{arch.final_norm}.") or name.startswith(f"{arch.head}."):
            key = "head"
        else:
            key = None
        if key in groups:
            groups[key].append(name)
    return [Block(name, tuple(params), position) for position, (name, params) in enumerate(groups.items())
            if params]


def cycle_order(cycle: int, num_blocks: int, order: str, seed: int) -> List[int]:
    """The block indices of one cycle: ascending, descending, or a random permutation drawn from a
    generator seeded by (seed, cycle): a resumed run draws the same ones."""
    if order == "ascending":
        return list(range(num_blocks))
    if order == "descending":
        return list(range(num_blocks - 1, -1, -1))
    if order == "random":
        generator = torch.Generator().manual_seed((seed * 1_000_003 + 7919 * cycle + 17) % (2**63))
        return torch.randperm(num_blocks, generator=generator).tolist()
    raise ValueError(f"fedcybgd.order must be one of {ORDERS}, got {order!r}")


def block_schedule(round_index: int, num_clients: int, num_blocks: int, per_client: int, order: str,
                   seed: int) -> List[List[int]]:
    """The blocks each client trains in round `round_index` (see the module docstring)."""
    if not 1 <= per_client <= num_blocks:
        raise ValueError(f"fedcybgd.blocks_per_client must be in [1, {num_blocks}] (the model has {num_blocks} "
                         f"blocks), got {per_client}")
    out = []
    for c in range(num_clients):
        chunk = (c + round_index) % num_clients
        blocks: List[int] = []
        for j in range(per_client):
            cycle, index = divmod((round_index * num_clients + chunk) * per_client + j, num_blocks)
            b = cycle_order(cycle, num_blocks, order, seed)[index]
            if b not in blocks:  # a random order may repeat a block across a cycle boundary
                blocks.append(b)
        out.append(blocks)
    return out


@dataclass
class _ClientRound:
    """One client's work in the current round: private copies of its blocks and their optimizer."""

    blocks: List[int]
    params: Dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    offset: int
    context: Dict[str, torch.Tensor] = field(default_factory=dict)  # stale / quantized blocks it holds


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class FedCyBGD(Strategy):
    name = "fedcybgd"
    aggregates = True

    def __init__(self, setup) -> None:
        super().__init__(setup)
        fc = self.cfg.fedcybgd
        if fc.order not in ORDERS:
            raise ValueError(f"fedcybgd.order must be one of {ORDERS}, got {fc.order!r}")
        if fc.download not in DOWNLOADS:
            raise ValueError(f"fedcybgd.download must be one of {DOWNLOADS}, got {fc.download!r}")
        self.fc = fc
        model = copy.deepcopy(setup.base_model).to(self.device)
        model.config.use_cache = False
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.blocks = model_blocks(model, fc.blocks)
        n_blocks = len(self.blocks)
        if not 1 <= fc.blocks_per_client <= n_blocks:
            raise ValueError(f"fedcybgd.blocks_per_client must be in [1, {n_blocks}] (the model has {n_blocks} "
                             f"blocks with fedcybgd.blocks={fc.blocks}), got {fc.blocks_per_client}")
        self._params = dict(model.named_parameters())
        # Server: the version of every block. Clients: the (version, exact) of the copy they hold.
        self.version = [0] * n_blocks
        self.held: List[List[Tuple[int, bool]]] = [[(0, True)] * n_blocks for _ in range(self.num_clients)]
        # Copies of blocks that differ from the server's current tensors, shared by the clients holding them.
        self.snapshots: Dict[Tuple[int, int, bool], Dict[str, torch.Tensor]] = {}
        self._active: Optional[List[_ClientRound]] = None
        self._active_round: Optional[int] = None
        self._part_flops: Dict[int, List[float]] = {}
        self._last_memory: List[dict] = []
        # (up, down) bytes per client of the last round that ended.
        self._last_round_bytes: List[Tuple[int, int]] = []

    # -- schedule -----------------------------------------------------------------------------------
    def assignment(self, round_index: int) -> List[List[int]]:
        """Block indices (into `self.blocks`) each client trains in `round_index`."""
        return block_schedule(round_index, self.num_clients, len(self.blocks), self.fc.blocks_per_client,
                              self.fc.order, self.cfg.seed)

    def _round_of(self, step: int) -> int:
        return step // self.cfg.train.aggregate_every

    # -- what a client holds ----------------------------------------------------------------------------
    def _block_tensors(self, b: int) -> Dict[str, torch.Tensor]:
        return {n: self._params[n] for n in self.blocks[b].params}

    def client_block(self, c: int, b: int) -> Dict[str, torch.Tensor]:
        """Client c's copy of block b (not a copy: the server's tensors or a shared snapshot)."""
        held = self.held[c][b]
        if held == (self.version[b], True):
            return self._block_tensors(b)
        return self.snapshots[(b,) + tuple(held)]

    def _context(self, c: int, skip: Sequence[int]) -> Dict[str, torch.Tensor]:
        out = {}
        for b in range(len(self.blocks)):
            if b not in skip and self.held[c][b] != (self.version[b], True):
                out.update(self.snapshots[(b,) + tuple(self.held[c][b])])
        return out

    def _make_round(self, blocks: List[int], params: Dict[str, nn.Parameter], offset: int) -> _ClientRound:
        t = self.cfg.train
        optimizer = make_optimizer(list(params.values()), t)
        # The learning-rate schedule runs on the global step, across rounds and blocks.
        scheduler = make_scheduler(optimizer, t, offset)
        return _ClientRound(blocks, params, optimizer, scheduler, offset)

    def _start_round(self, step: int) -> None:
        r = self._round_of(step)
        self._active = []
        for c, blocks in enumerate(self.assignment(r)):
            params = {}
            for b in blocks:
                for n, t in self.client_block(c, b).items():
                    # Full precision: a half-precision model's block trains on float32 master weights.
                    master = t.detach().to(torch.promote_types(t.dtype, torch.float32)).clone()
                    params[n] = nn.Parameter(master, requires_grad=True)
            work = self._make_round(blocks, params, step)
            work.context = self._context(c, blocks)
            self._active.append(work)
        self._active_round = r

    # -- flops --------------------------------------------------------------------------------------------
    def _flops(self, blocks: Sequence[int], batch: int, seq_len: int) -> float:
        """One training step of a client that trains `blocks` on batch x seq_len tokens (see the
        module docstring)."""
        if (batch, seq_len) not in self._part_flops:
            from ..split import _architecture_of

            arch = _architecture_of(self.model)
            s = self.setup
            layers = getattr(getattr(self.model, arch.backbone), arch.layers)
            tokens = batch * seq_len
            head = getattr(self.model, arch.head)
            # Parts from input to output: embeddings (a lookup), the decoder layers, the head.
            parts = [0.0] + [forward_flops(layer, batch, seq_len, 1, s.hidden_size) for layer in layers]
            parts.append(2.0 * tokens * head.weight.numel())
            self._part_flops[(batch, seq_len)] = parts
        parts = self._part_flops[(batch, seq_len)]
        part_of = {}
        for b in blocks:
            name = self.blocks[b].name
            part_of[b] = 0 if name == "embeddings" else len(parts) - 1 if name == "head" else 1 + int(name[6:])
        trained = set(part_of.values())
        lowest = min(trained)
        total = 0.0
        for i, f in enumerate(parts):
            if i in trained:
                total += train_flops(f, full_finetune=True)
            elif i > lowest:
                total += train_flops(f)
            else:
                total += f
        return total

    # -- training -------------------------------------------------------------------------------------------
    def _forward(self, work: _ClientRound, input_ids, attention_mask, position_ids=None):
        overrides = dict(work.context)
        for k, p in work.params.items():
            dtype = self._params[k].dtype
            overrides[k] = p if p.dtype == dtype else p.to(dtype)  # differentiable: grads reach the master
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:  # a packed batch (attention_mask None; see base.mask_kwargs)
            kwargs["position_ids"] = position_ids
        out = torch.func.functional_call(self.model, overrides, args=(), kwargs=kwargs)
        return out.logits

    def train_step(self, step: int) -> StepResult:
        r = self._round_of(step)
        if self._active is None:
            self._start_round(step)
        elif self._active_round != r:
            raise RuntimeError(f"fedcybgd: step {step} is in round {r} but round {self._active_round} was not ended; "
                               "call end_round() after the last step of every round")
        timer = Timer(self.device)
        losses, sims = [], []
        for c, work in enumerate(self._active):
            with timer:
                work.optimizer.zero_grad(set_to_none=True)
                batch = self._batch(c)
                loss = causal_lm_loss(self._forward(work, batch["input_ids"], **mask_kwargs([batch])),
                                      batch["labels"])
                loss.backward()
                if self.cfg.train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(list(work.params.values()), self.cfg.train.max_grad_norm)
                work.optimizer.step()
                work.scheduler.step()
            losses.append(loss.detach())
            sims.append(self.time_model.client_compute(self._flops(work.blocks, *batch["input_ids"].shape)))
        self._last_memory = [self._client_memory(w) for w in self._active]
        full = self.full_model_memory()
        extra = {
            "trainable_params": float(max(m["trainable_params"] for m in self._last_memory)),
            "optimizer_state_bytes": float(max(m["optimizer_state_bytes"] for m in self._last_memory)),
            "training_state_bytes": float(max(m["training_state_bytes"] for m in self._last_memory)),
            "full_model_trainable_params": float(full["trainable_params"]),
            "full_model_optimizer_state_bytes": float(full["optimizer_state_bytes"]),
            "full_model_training_state_bytes": float(full["training_state_bytes"]),
        }
        return StepResult(loss=float(torch.stack(losses).mean()), client_compute_s=timer.elapsed,
                          sim_time_s=max(sims), extra=extra)

    # -- memory -----------------------------------------------------------------------------------------------
    @staticmethod
    def _client_memory(work: _ClientRound) -> dict:
        params = list(work.params.values())
        state = [t for s in work.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        param_bytes = _nbytes(params)
        opt_bytes = _nbytes(state)
        return {"blocks": list(work.blocks), "trainable_params": sum(p.numel() for p in params),
                "param_bytes": param_bytes, "grad_bytes": param_bytes, "optimizer_state_bytes": opt_bytes,
                "training_state_bytes": 2 * param_bytes + opt_bytes}

    def full_model_memory(self) -> dict:
        """What full-model federated fine-tuning holds per client for training: every parameter
        trainable (in float32, as FedCyBGD's blocks), its gradient, and the optimizer's state (AdamW:
        two moments; SGD: none)."""
        params = list(self._params.values())
        param_bytes = sum(p.numel() * max(p.element_size(), 4) for p in params)
        opt_bytes = 2 * param_bytes if self.cfg.train.optimizer == "adamw" else 0
        return {"trainable_params": sum(p.numel() for p in params), "param_bytes": param_bytes,
                "grad_bytes": param_bytes, "optimizer_state_bytes": opt_bytes,
                "training_state_bytes": 2 * param_bytes + opt_bytes}

    def full_model_round_bytes(self) -> int:
        """What full-model federated fine-tuning moves per client per round in each direction: the
        whole model in its dtype, up (the client's update) and down (the average), before any
        packet header."""
        return sum(p.numel() * p.element_size() for p in self._params.values())

    def memory_report(self) -> dict:
        """{"clients": per client (as of the last step, with the bytes it moved in the last round),
        "full_model": full fine-tuning's training state and bytes per client per round}."""
        clients = [dict(m) for m in self._last_memory]
        for entry, moved in zip(clients, self._last_round_bytes):
            entry.update({"last_round_up_bytes": moved[0], "last_round_down_bytes": moved[1]})
        full = self.full_model_memory()
        full["round_bytes_per_direction"] = self.full_model_round_bytes()
        return {"clients": clients, "full_model": full}

    # -- end of round: upload, server update, download ---------------------------------------------------------
    def end_round(self, step: int) -> float:
        if self._active is None:
            return 0.0
        n, n_blocks = self.num_clients, len(self.blocks)
        r = self._active_round
        work = self._active
        tm = self.time_model
        weights = self.setup.client_weights

        # Clients upload the blocks they trained, and nothing else.
        # Blocks travel in the model's dtype: what the server keeps.
        up = [self._send_adapters(client_name(c), SERVER, step,
                                  {k: p.detach().to(self._params[k].dtype) for k, p in work[c].params.items()})
              for c in range(n)]
        received = [self._recv_adapters(SERVER, client_name(c), step) for c in range(n)]

        trainers: Dict[int, List[int]] = {}
        for c in range(n):
            for b in work[c].blocks:
                trainers.setdefault(b, []).append(c)
        new_values: Dict[int, Dict[str, torch.Tensor]] = {}
        for b, cs in trainers.items():
            names = self.blocks[b].params
            uploads = [{k: received[c][k] for k in names} for c in cs]
            new_values[b] = uploads[0] if len(cs) == 1 else fedavg(uploads, [weights[c] for c in cs])
        new_version = list(self.version)
        for b in trainers:
            new_version[b] += 1

        # What each client holds once its upload is accepted: a block it trained alone is the
        # server's new version exactly.
        held = [list(h) for h in self.held]
        for b, cs in trainers.items():
            if len(cs) == 1:
                held[cs[0]][b] = (new_version[b], True)

        # Downloads: (block, exact) per client.
        following = self.assignment(r + 1)
        downloads: List[List[Tuple[int, bool]]] = []
        for c in range(n):
            stale = [b for b in range(n_blocks) if held[c][b][0] < new_version[b]]
            must = [b for b in stale if b in following[c] or c in trainers.get(b, ())]
            optional = [b for b in stale if b not in must]
            if self.fc.download == "subset":
                optional = self._random_subset(optional, r, c)
            exact_optional = self.fc.download != "quantized"
            downloads.append([(b, True if b in following[c] else exact_optional) for b in must]
                             + [(b, exact_optional) for b in optional])

        # Keep the server's current tensors of a block it is about to replace where some client
        # stays on them.
        getting = [{b for b, _ in downloads[c]} for c in range(n)]
        for b in trainers:
            key = (b, self.version[b], True)
            if key not in self.snapshots and any(held[c][b] == key[1:] and b not in getting[c] for c in range(n)):
                self.snapshots[key] = {k: v.detach().clone() for k, v in self._block_tensors(b).items()}
        with torch.no_grad():
            for b, values in new_values.items():
                for k, v in values.items():
                    self._params[k].copy_(v)
        self.version = new_version

        down = [0] * n
        for c in range(n):
            if not downloads[c]:
                continue
            payload = {}
            for b, exact in downloads[c]:
                for k, v in self._block_tensors(b).items():
                    payload[k] = v.detach() if exact or v.dim() < 2 else self._quantize(v)
            down[c] = self._send_adapters(SERVER, client_name(c), step, payload)
            got = self._recv_adapters(client_name(c), SERVER, step)
            for b, exact in downloads[c]:
                if exact:
                    held[c][b] = (self.version[b], True)
                    continue
                key = (b, self.version[b], False)
                if key not in self.snapshots:
                    self.snapshots[key] = {k: self._dequantize(got[k], self._params[k]) for k in self.blocks[b].params}
                held[c][b] = key[1:]
        self.held = held
        self._last_round_bytes = list(zip(up, down))
        self._collect_snapshots()
        self._active = None
        self._active_round = None
        return max(tm.transfer(b) for b in up) + max(tm.transfer(b) for b in down)

    def _random_subset(self, blocks: List[int], round_index: int, client: int) -> List[int]:
        """A random subset of `blocks`, of size download_fraction x len(blocks) rounded up or down at
        random (so its expectation is exact), from a generator seeded by (seed, round, client)."""
        if not blocks:
            return []
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + round_index * 7919 + client * 104_729 + 1)
                                          % (2**63))
        want = self.fc.download_fraction * len(blocks)
        count = int(math.floor(want + float(torch.rand((), generator=g))))
        count = max(0, min(len(blocks), count))
        chosen = torch.randperm(len(blocks), generator=g)[:count].tolist()
        return [blocks[i] for i in sorted(chosen)]

    def _quantize(self, t: torch.Tensor) -> torch.Tensor:
        return codec.compress(t.detach().float(), bits=self.fc.download_bits, group_size=self.fc.download_group_size)

    @staticmethod
    def _dequantize(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if value.dtype == torch.uint8 and like.dtype != torch.uint8:
            value = codec.decompress(value)
        return value.to(device=like.device, dtype=like.dtype).reshape(like.shape)

    def _collect_snapshots(self) -> None:
        used = {(b,) + tuple(h) for row in self.held for b, h in enumerate(row) if tuple(h) != (self.version[b], True)}
        for key in list(self.snapshots):
            if key not in used:
                del self.snapshots[key]

    # -- evaluation and export -----------------------------------------------------------------------------------
    def logits_fn(self):
        """The server's global model: the latest version of every block."""
        model = self.model

        def fn(input_ids, attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return fn

    def export_state(self):
        """The setup's adapter layout with its initial adapters (B = 0: the identity). FedCyBGD trains
        full weights, which a LoRA adapter does not carry: use `export_model`."""
        logger.warning("fedcybgd trains full weights: the PEFT adapter written for it is the identity (no update); "
                       "the trained model is in the checkpoints, FedCyBGD.export_model(path) writes it")
        plans, state = [], {}
        for segment in (self.setup.client, self.setup.tail, self.setup.server):
            if segment is not None:
                plans.append(lora_plan(segment))
                state.update(whole_model_names(segment, adapter_state(segment)))
        return plans, state

    def export_model(self, path) -> None:
        """The trained global model as a transformers folder (`save_pretrained`, safetensors)."""
        self.model.save_pretrained(str(path), safe_serialization=True)

    # -- state ----------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def state_dict(self) -> dict:
        # A snapshot: training goes on in place after this returns.
        blocks = {k: self._params[k].detach().clone() for b in self.blocks for k in b.params}
        state = {
            "blocks": blocks,
            "version": list(self.version),
            "held": [[[v, bool(e)] for v, e in row] for row in self.held],
            "snapshots": [[b, v, bool(e), dict(t)] for (b, v, e), t in self.snapshots.items()],
            "round": self._active_round,
            "active": None,
        }
        if self._active is not None:
            state["active"] = [{"blocks": list(w.blocks),
                                "params": {k: p.detach().clone() for k, p in w.params.items()},
                                "optimizer": copy.deepcopy(w.optimizer.state_dict()),
                                "scheduler": w.scheduler.state_dict(), "offset": w.offset} for w in self._active]
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["blocks"].items():
                self._params[k].copy_(v)
        self.version = [int(v) for v in state["version"]]
        self.held = [[(int(v), bool(e)) for v, e in row] for row in state["held"]]
        self.snapshots = {(int(b), int(v), bool(e)): {k: t.to(self._params[k].device) for k, t in tensors.items()}
                          for b, v, e, tensors in state["snapshots"]}
        self._active = self._active_round = None
        if state.get("active") is not None:
            self._active = []
            for c, s in enumerate(state["active"]):
                params = {k: nn.Parameter(t.to(self.device).clone(), requires_grad=True)
                          for k, t in s["params"].items()}
                work = self._make_round([int(b) for b in s["blocks"]], params, int(s["offset"]))
                work.optimizer.load_state_dict(s["optimizer"])
                work.scheduler.load_state_dict(s["scheduler"])
                work.context = self._context(c, work.blocks)
                self._active.append(work)
            self._active_round = int(state["round"])
