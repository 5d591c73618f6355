"""What every strategy shares: the training setup, losses, optimizers, timing and state."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..aggregate import fedavg
from ..memory import ActivationPeaks
from ..timemodel import TimeModel, forward_flops
from ..transport import SERVER, Transport, client_name
from ..wire import CodecSettings, TensorStream, pack_tensors, unpack_tensors


@dataclass
class TrainSetup:
    """Everything a strategy needs, built once from the config by the runner, identically for
    every strategy (same model, adapters' initial values, data, partition and seed)."""

    cfg: object                      # splitlora.config.RunConfig
    device: torch.device
    # The whole model without adapters (for export, evaluation and centralized), in host memory;
    # None in a client process (transport=dist), which never runs or exports the whole model.
    base_model: Optional[nn.Module]
    client: nn.Module                # ClientSegment with the initial client adapters
    server: nn.Module                # ServerSegment with the initial server adapters
    tail: Optional[nn.Module]        # ClientTail (U-shape) with client adapters, else None
    loaders: List[object]            # one splitlora.data.ClientLoader per client
    client_weights: List[float]      # samples per client (FedAvg weights)
    seq_len: int
    num_layers: int
    hidden_size: int
    transport: Transport
    time_model: TimeModel
    # The party this process plays under transport=dist ("server" or "client<N>"); None runs
    # every party in this process.
    role: Optional[str] = None
    # model.quantize: the whole-model names of the linear layers held in 4 bits (splitlora.quantize).
    quantized_modules: List[str] = field(default_factory=list)


@dataclass
class StepResult:
    loss: float
    client_compute_s: float = 0.0    # measured, summed over clients
    server_compute_s: float = 0.0    # measured
    sim_time_s: float = 0.0          # the time model's wall time of the step
    extra: Dict[str, float] = field(default_factory=dict)
    # Why the step trained nothing (a federation step whose clients all dropped out); its loss is
    # then no number and is recorded as null.
    skipped: Optional[str] = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the label tokens (labels -100 are ignored), as
    transformers' causal LMs compute it."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=-100)


def make_optimizer(params: Sequence[nn.Parameter], train_cfg) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise ValueError("no trainable parameters on one side of the cut: check lora target_modules")
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {train_cfg.optimizer!r}")


def lr_multiplier(step: int, train_cfg) -> float:
    """The learning rate of optimizer step `step` (0-based, on the run's global step count) over
    train.lr: a linear warmup over train.warmup_steps, then constant or, with train.lr_schedule
    linear or cosine, a decay that reaches 0 after the last of train.steps. A decayed run ends with
    small steps, so its final held-out loss moves far less from one evaluation to the next, which
    is what comparisons of final losses (e.g. int8 against fp32 at the cut) need."""
    warmup = max(0, int(train_cfg.warmup_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    schedule = getattr(train_cfg, "lr_schedule", "constant")
    if schedule == "constant":
        return 1.0
    remaining = max(1, int(train_cfg.steps) - warmup)
    done = min(1.0, (step - warmup + 1) / remaining)  # 1.0 after the last step
    if schedule == "linear":
        return 1.0 - done
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"train.lr_schedule must be one of constant, linear, cosine; got {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg, offset: int = 0,
                   updates_per_step: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule (lr_multiplier) on the global step, for an optimizer whose first update
    is at global step `offset` and that updates `updates_per_step` times per global step (vanilla
    SL's server: once per client), so that every party's learning rate follows the same steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_multiplier(offset + k // updates_per_step, train_cfg))


def concat_right_padded(tensors: Sequence[torch.Tensor], pad_value: float = 0) -> torch.Tensor:
    """Row-wise concatenation of [rows, length, ...] tensors whose lengths may differ (batches
    padded to their own longest sequence, data.pad_to=batch): each is right-padded with
    `pad_value` to the longest. With right padding and causal attention the added positions
    change nothing at the real ones; take each part's own length back with `[:, :length]`."""
    length = max(t.shape[1] for t in tensors)
    return torch.cat([t if t.shape[1] == length else
                      torch.cat([t, t.new_full((t.shape[0], length - t.shape[1], *t.shape[2:]), pad_value)], dim=1)
                      for t in tensors])


def mask_meta(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """What a model needs of `batch` besides its tokens to build its attention mask, and what a
    client sends beside its activations: the padding mask or, for a packed batch
    (splitlora.data.packing), its position ids, which alone define the mask."""
    if "position_ids" in batch:
        return {"position_ids": batch["position_ids"]}
    return {"attention_mask": batch["attention_mask"]}


def mask_kwargs(metas: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """Keyword arguments (attention_mask, position_ids) for a whole model or a split segment
    running the row-wise concatenation of the batches `metas` describe (batches or mask_meta's).

    Unpacked: the padding mask alone (exactly as before packing existed). Packed: the position
    ids and ``attention_mask=None``: transformers' masking then finds the examples from the
    position ids (a new one wherever an id is not the previous plus one) and builds a
    block-diagonal causal mask; with any 2-D mask it would not look. (The whole transformers model
    must also run with ``use_cache=False``: with a cache it does not look either.) Rows of a
    shorter batch are padded with position id 0, which makes every padding token a block of its
    own."""
    packed = ["position_ids" in m for m in metas]
    if any(packed) != all(packed):
        raise ValueError("cannot run packed and unpacked batches together")
    key = "position_ids" if packed[0] else "attention_mask"
    value = metas[0][key] if len(metas) == 1 else concat_right_padded([m[key] for m in metas])
    if packed[0]:
        return {"attention_mask": None, "position_ids": value}
    return {"attention_mask": value}


class Side:
    """One party's trainable modules with their optimizer, scheduler and clipping."""

    def __init__(self, modules: Sequence[nn.Module], train_cfg, updates_per_step: int = 1) -> None:
        self.modules = [m for m in modules if m is not None]
        self.params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, train_cfg)
        self.scheduler = make_scheduler(self.optimizer, train_cfg, updates_per_step=updates_per_step)
        self.max_grad_norm = train_cfg.max_grad_norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()

    def train(self, mode: bool = True) -> None:
        for m in self.modules:
            m.train(mode)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class PartyRNG:
    """Each party's own stream of torch's global CPU random numbers (LoRA dropout draws from it).

    With every party in one process, `with rng(party):` swaps that party's state in and out, so
    the numbers a party draws do not depend on who else runs in the process: an in-process run
    draws exactly what the same parties draw in their own processes under transport=dist (where
    each process's global generator simply is its party's, and this is a no-op).
    """

    def __init__(self, seed: int, parties, *, in_process: bool) -> None:
        self.in_process = in_process
        self.states = {p: self.initial_state(seed, p) for p in parties}

    @staticmethod
    def initial_state(seed: int, party: str) -> torch.Tensor:
        index = 0 if party == SERVER else int(party[len("client"):]) + 1
        return torch.Generator().manual_seed(seed * 1_000_003 + 7919 * index + 17).get_state()

    @contextmanager
    def __call__(self, party: str):
        if not self.in_process:
            yield
            return
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states[party])
        try:
            yield
        finally:
            self.states[party] = torch.get_rng_state()
            torch.set_rng_state(outer)

    def state_dict(self) -> dict:
        return {p: s.clone() for p, s in self.states.items()}

    def load_state_dict(self, state: dict) -> None:
        self.states.update({p: s.clone() for p, s in state.items()})


class Timer:
    """Wall time of a block; synchronizes CUDA so GPU work is inside the block it belongs to."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.elapsed += time.perf_counter() - self._start
        return False


class Strategy:
    """One training method. Subclasses implement `train_step`, `logits_fn` and the adapter views;
    `end_round` (aggregation) is optional."""

    name = "?"
    # Whether the clients' adapters are averaged at the end of every round.
    aggregates = False
    # Whether export_state() is the model logits_fn() evaluates, exactly (the same adapters, not a
    # refactorisation of them): the trainer then generates with the exported whole model, which a
    # transformers model decodes with its KV cache (splitlora.evaluate).
    exact_export = False

    def __init__(self, setup: TrainSetup) -> None:
        self.setup = setup
        self.cfg = setup.cfg
        self.device = setup.device
        self.transport = setup.transport
        self.time_model = setup.time_model
        self.num_clients = len(setup.loaders)
        self.role = setup.role
        self.rng = PartyRNG(self.cfg.seed, [SERVER] + [client_name(c) for c in range(self.num_clients)],
                            in_process=setup.role is None)
        # Per party, the most bytes one forward saved for the backward (memory_per_side).
        self.activation_peaks = ActivationPeaks()
        self._whole_flops_cache: Dict[tuple, float] = {}
        codec_cfg = self.cfg.codec
        self.codec_settings = CodecSettings(codec_cfg.bits, codec_cfg.group_size, codec_cfg.stochastic)
        grad_bits = codec_cfg.bits if codec_cfg.compress_gradients else 32
        self.grad_settings = CodecSettings(grad_bits, codec_cfg.group_size, codec_cfg.stochastic)

    # -- helpers ---------------------------------------------------------------------------------
    def _stream(self, settings: CodecSettings, index: int) -> TensorStream:
        # Distinct, reproducible stochastic-rounding seeds per stream.
        # The cut's tensors are [batch, sequence, hidden]; the sequence varies with data.pad_to=batch.
        return TensorStream(settings, error_feedback=self.cfg.codec.error_feedback,
                            seed=self.cfg.seed * 1_000_003 + index, variable_dim=1)

    def _batch(self, client: int) -> Dict[str, torch.Tensor]:
        batch = self.setup.loaders[client].next_batch()
        return {k: v.to(self.device) for k, v in batch.items()}

    def _fwd_flops(self, module: nn.Module, batch_size: int, num_layers: int, seq_len: Optional[int] = None) -> float:
        """Forward flops over batch_size sequences of seq_len tokens (default: the training set's
        longest, the length of every batch with data.pad_to=dataset)."""
        return forward_flops(module, batch_size, seq_len or self.setup.seq_len, num_layers, self.setup.hidden_size)

    def _whole_model_flops(self, rows: int, seq_len: int) -> float:
        """Forward flops of the unsplit model over rows x seq_len tokens (client and server segments),
        counted once per batch shape: counting walks every parameter, too slow for every step."""
        key = (rows, seq_len)
        if key not in self._whole_flops_cache:
            s, cut = self.setup, self.cfg.model.cut_layer
            self._whole_flops_cache[key] = (self._fwd_flops(s.client, rows, cut, seq_len)
                                            + self._fwd_flops(s.server, rows, s.num_layers - cut, seq_len))
        return self._whole_flops_cache[key]

    def _send_adapters(self, src: str, dst: str, step: int, state: Dict[str, torch.Tensor]) -> int:
        packet = pack_tensors(state)
        self.transport.send(src, dst, "adapters", step, packet)
        return packet.numel()

    def _recv_adapters(self, dst: str, src: str, step: int) -> Dict[str, torch.Tensor]:
        return unpack_tensors(self.transport.recv(dst, src, "adapters", step), self.device)

    def _fedavg_round(self, step: int, states: List[Dict[str, torch.Tensor]],
                      clients: Optional[Sequence[int]] = None) -> tuple:
        """Clients upload their adapters, the server averages them (weighted by samples) and sends
        the average back. Returns (averaged state as received by each client, simulated seconds).
        `clients`: the round's clients (default: all), `states` in their order; their weights
        are renormalised by fedavg."""
        clients = list(range(self.num_clients)) if clients is None else list(clients)
        up = [self._send_adapters(client_name(c), SERVER, step, s) for c, s in zip(clients, states)]
        received = [self._recv_adapters(SERVER, client_name(c), step) for c in clients]
        average = fedavg(received, [self.setup.client_weights[c] for c in clients])
        down = [self._send_adapters(SERVER, client_name(c), step, average) for c in clients]
        back = [self._recv_adapters(client_name(c), SERVER, step) for c in clients]
        tm = self.time_model
        sim = max(tm.transfer(b) for b in up) + max(tm.transfer(b) for b in down)
        return back, sim

    # -- interface -------------------------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        raise NotImplementedError

    def end_round(self, step: int) -> float:
        """Called after the last step of every round; returns the simulated seconds it took."""
        return 0.0

    def memory_per_side(self) -> Optional[dict]:
        """{"client": the most demanding client's, "server": the server's} splitlora.memory.side_memory
        (None for a side the strategy does not have), or None where the strategy reports its
        memory otherwise (FedCyBGD's memory_report)."""
        return None

    def logits_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The global model as logits_fn(input_ids, attention_mask), for evaluation."""
        raise NotImplementedError

    def export_state(self) -> tuple:
        """(plans, state): the LoRA layout and the global adapters under whole-model names."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def train(self, mode: bool = True) -> None:
        raise NotImplementedError

