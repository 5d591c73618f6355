"""HSplitLoRA (arXiv 2505.02795): split federated LoRA for heterogeneous clients.

Every client has a device profile (`hsplitlora.devices`: compute, memory, link). Each runs the
SplitLoRA exchange (clients to their cut in parallel, the server trains on their activations,
gradients come back), with its own cut layer and its own LoRA rank for each adapted weight, chosen
from its budget and from the importance of the weights (`splitlora.hetero`):

- Importance: after each backward a client updates an EMA of each adapter's score per rank:
  AdaLoRA's sensitivity |A * dA| + |B * dB| (`importance: sensitivity`; zero while B = 0, so it
  needs rounds of several steps) or the squared gradient |dA|^2 + |dB|^2 (`gradient`). Every
  `importance_every` rounds the clients send their scores with their adapters and the server
  takes the weighted mean.
- Configuration: a client takes the deepest cut in [min_cut_layer, max_cut_layer] at which its
  estimated step time and memory fit its budget (deeper cuts for stronger clients). Its total rank
  is lora.client.r per adapted weight for the strongest client, scaled by its compute and memory
  relative to the strongest, split over the weights in proportion to their importance, and
  lowered until the estimates fit. The server reconfigures when the importance ranking moved by
  more than `reconfigure_threshold` (normalized Kendall tau distance) since the last
  configuration. Every configuration is printed, kept in `plans`, reported per step in
  StepResult.extra (cut, total rank, estimates per client) and in the run summary
  (`memory_report()`).
- Memory: the planner estimates a client step's memory (`SegmentCost.memory_bytes`); each client
  also measures, per configuration, the most its forward really kept for the backward (the peak
  over its batches, `splitlora.memory.ActivationPeaks`), reported per step and in `memory_report()`
  next to the estimate (on GPT-2 shapes the estimate, Korthikanti et al.'s count, is 1.5 to 1.7x the
  measurement: conservative).
- `configuration: weakest` is the baseline that ignores heterogeneity: every client gets the most
  constrained client's cut and ranks (estimates still per device).
- The server: one segment from the shallowest allowed cut to the head. Clients with the same cut
  are batched into one forward from that cut (one forward per cut group), one backward and one
  optimizer step over all of them. Its adapters (`server_adapters`): `shared`, one per adapted
  weight trained on every client's activations; or `per_client`, one per client at that client's
  scale of lora.server.r (its mean rank over lora.client.r), held in MultiLoRALinear layers that
  run every client's adapter over the batched activations in one launch of the multi-adapter
  kernel (rows grouped by client). Per-client server adapters are aggregated like the clients'
  (stacked, folded into the server's base weights) at the end of every round and restart at
  their clients' ranks.
- Aggregation (`aggregation: stacked`, noise-free): per adapted weight, the weighted mean of the
  updates of the parties that trained it this round, sum_i w_i s_i B_i A_i over the clients
  holding it, and, for a layer some clients hold and others reach through the server, the
  server's adapter with the weight of the clients whose activations it trained on. The server
  stacks the pairs along the rank (B_i scaled by w_i s_i: exactly that mean), sends each client
  the stacked pairs of its layers, and every party folds B @ A into its frozen base weights (all
  segments here share one copy of the frozen weights: folded once). The clients' adapters, and
  the server's on layers a client holds, restart at their (possibly new) ranks: B = 0, fresh A,
  new optimizer state (the learning-rate schedule carries on); with `restart: warm` they start
  instead from the best rank-k approximation of the weight's mean update (k: the smallest rank
  restarting on it; A's rows as long as a fresh A's, the product unchanged), only the rest of the
  update being folded, so the model is the same and the adapters carry on (a weight some client
  reaches through a server layer without an adapter is folded whole). A client whose cut deepens
  downloads the (folded) base weights of its new layers. `aggregation: zero_pad` is HetLoRA's
  baseline for one cut: A and B zero-padded to the largest rank and averaged separately, each
  client getting the average truncated to its ranks (not the weighted mean of the updates: it has
  cross terms B_i A_j).

Bytes: the adapters up (with the importance scores in importance rounds), the stacked pairs (or
the truncated average) and new layers down go through the transport as kind "adapters"; the
configuration itself (a few integers per client) is not counted. Simulated time: each client
computes on its own device at its cut and ranks and sends on its own link; the server runs its
cut groups one after another.

Evaluation and export: the global model is the folded base plus the aggregate of the current
adapters (nothing after a round), run from the shallowest cut in use. Export writes each folded
weight's whole update since the start (folded base - original base, plus the current aggregate)
as a LoRA adapter by SVD (exact at its numerical rank, or truncated to `export_rank`) and the
server's other adapters as they are.

Precision: folding into bfloat16/float16 base weights rounds every round's update to that
dtype (a warning says so); float32 weights keep it.

Not supported: the U-shape, transport=dist.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from splitlora_kernels.layers import lora_modules
from splitlora_kernels.multi_layer import MultiLoRALinear, adapter_groups, multi_lora_modules

from ..adapters import (LoraSpec, adapter_state, add_lora, clone_sharing_frozen, init_adapter, init_lora_pair,
                        lora_plan, whole_model_names)
from ..aggregate import (fold_into_weight, lora_pairs, lora_scalings, reinit_adapters, stack_adapters, truncate,
                         truncate_product, zero_pad_fedavg)
from ..config import HSPLITLORA_AGGREGATIONS, HSPLITLORA_RESTARTS
from ..hetero import (GIB, ClientPlan, ImportanceTracker, SegmentCost, client_profiles, combine_importance,
                      configure_clients_with_cuts, low_rank_factors, ranking_change, weakest_plan_for_all)
from ..timemodel import count_params, forward_flops, train_flops
from ..transport import SERVER, client_name
from ..wire import pack_tensors
from .base import Side, StepResult, causal_lm_loss, concat_right_padded, mask_kwargs
from .splitfed import _SplitBase, client_parts

logger = logging.getLogger(__name__)

# Importance scores travel in the adapters' packet under this prefix.
IMPORTANCE_KEY = "importance:"
HEAD = "head."


def _upcast(t: torch.Tensor) -> torch.Tensor:
    # Stacking is exact in float32 or wider: a bfloat16 model's adapters are widened, not rounded.
    return t.to(torch.promote_types(t.dtype, torch.float32))


def share_parameters(segment: nn.Module, pool: Dict[str, torch.Tensor], *, adapters: bool = False) -> None:
    """Points `segment`'s frozen parameters and buffers (and with `adapters` its LoRA tensors too)
    at the tensors of the same whole-model name in `pool`, adding those it is the first to have:
    segments of different cuts then share one copy of every layer they have in common."""
    for module_name, module in segment.named_modules():
        for table in (module._parameters, module._buffers):
            for leaf, tensor in list(table.items()):
                if tensor is None:
                    continue
                is_adapter = leaf in ("lora_A", "lora_B")
                if is_adapter and not adapters:
                    continue
                full = segment.full_model_name(f"{module_name}.{leaf}" if module_name else leaf)
                if full in pool:
                    table[leaf] = pool[full]
                else:
                    pool[full] = tensor


def _fresh_side(modules, train_cfg, old: Side) -> Side:
    """A new optimizer for new adapter tensors; the learning-rate schedule of `old` carries on."""
    side = Side(modules, train_cfg)
    side.scheduler.load_state_dict(old.scheduler.state_dict())
    for group, lr in zip(side.optimizer.param_groups, side.scheduler.get_last_lr()):
        group["lr"] = lr
    return side


def _layer_index(segment: nn.Module, local: str) -> Optional[int]:
    """The decoder layer a module of `segment` (its local name) belongs to; None outside the layers."""
    layers = next(n for n, m in segment.named_children() if m is segment.decoder_layers)
    parts = local.split(".")
    return int(parts[1]) if parts[0] == layers and len(parts) > 1 else None


class HSplitLoRA(_SplitBase):
    name = "hsplitlora"
    aggregates = True

    def __init__(self, setup) -> None:
        cfg = setup.cfg
        if setup.role is not None:
            raise ValueError("strategy hsplitlora runs every party in one process; use transport=local")
        if cfg.train.u_shape:
            raise ValueError("strategy hsplitlora does not support train.u_shape; set train.u_shape=false")
        hc = cfg.hsplitlora
        if hc.aggregation not in HSPLITLORA_AGGREGATIONS:
            raise ValueError(f"hsplitlora.aggregation must be one of {HSPLITLORA_AGGREGATIONS}, "
                             f"got {hc.aggregation!r}")
        if hc.restart not in HSPLITLORA_RESTARTS:
            raise ValueError(f"hsplitlora.restart must be one of {HSPLITLORA_RESTARTS}, got {hc.restart!r}")
        if hc.restart == "warm" and hc.aggregation != "stacked":
            raise ValueError("hsplitlora.restart=warm restarts the adapters after a stacked fold; "
                             f"aggregation={hc.aggregation!r} keeps them: use restart=fresh")
        low = cfg.model.cut_layer if hc.min_cut_layer is None else hc.min_cut_layer
        high = cfg.model.cut_layer if hc.max_cut_layer is None else hc.max_cut_layer
        if not 1 <= low <= high <= setup.num_layers - 1:
            raise ValueError(f"hsplitlora.min_cut_layer / max_cut_layer: the cuts [{low}, {high}] must lie in "
                             f"[1, {setup.num_layers - 1}] for a model with {setup.num_layers} decoder layers")
        if high != low and hc.aggregation == "zero_pad":
            raise ValueError("hsplitlora.aggregation=zero_pad needs one cut for every client "
                             "(hsplitlora.min_cut_layer = max_cut_layer)")
        self.hc = hc
        # The strongest client's mean rank per adapted weight.
        self._rank_per_weight = int(cfg.lora.client.r)
        self.cuts = list(range(low, high + 1))
        self._log = getattr(setup, "log", None) or print
        self.devices = client_profiles(cfg)
        templates, server = self._segments(setup)
        self._templates = templates                    # cut -> ClientSegment with the initial adapters
        self._costs = {k: self._segment_cost(setup, k) for k in self.cuts}
        self._modules = [w.name for w in self._costs[high].weights]   # every client module, "head.<local>"
        if not self._modules:
            raise ValueError("strategy hsplitlora: the clients' segments have no adapted weight; check "
                             "lora.client.target_modules and the cut layers")
        deepest = templates[high]
        self._whole = {m: deepest.full_model_name(m[len(HEAD):]) for m in self._modules}
        self.importance: Dict[str, float] = {m: 1.0 for m in self._modules}
        self._reference: Dict[str, float] = dict(self.importance)
        self.plans: List[ClientPlan] = self._configure()
        parts = [client_parts(clone_sharing_frozen(templates[p.cut_layer]), None) for p in self.plans]
        super().__init__(setup, parts)
        if server is not None:
            self.server = server
            self.server_side = Side([self.server], cfg.train)
            self._server_dtype = next(self.server.parameters()).dtype
        self._server_start = self.server.layer_range[0]
        self._views = self._server_views(setup)
        self._server_layer = {n: _layer_index(self.server, n) for n in lora_modules(self.server)}
        # Every adapted weight that a fold may touch, by whole-model name: (weight, fan_in_fan_out).
        self._foldable: Dict[str, Tuple[torch.Tensor, bool]] = {}
        for name, m in lora_modules(deepest).items():
            self._foldable[deepest.full_model_name(name)] = (m.weight, m.fan_in_fan_out)
        for name, m in lora_modules(self.server).items():
            layer = self._server_layer[name]
            if layer is not None and layer < high:
                self._foldable[self.server.full_model_name(name)] = (m.weight, m.fan_in_fan_out)
        # server_adapters=per_client: server module name -> its MultiLoRALinear (one adapter per
        # client); every one of them is folded every round, so all are foldable.
        self._multi: Dict[str, MultiLoRALinear] = {}
        if hc.server_adapters == "per_client":
            self._install_per_client_server_adapters()
            for name, m in self._multi.items():
                self._foldable[self.server.full_model_name(name)] = (m.weight, m.fan_in_fan_out)
        self._trackers = [ImportanceTracker(hc.importance_beta, hc.importance) for _ in range(self.num_clients)]
        if hc.importance == "sensitivity" and cfg.train.aggregate_every == 1:
            logger.warning("hsplitlora: with train.aggregate_every=1 every step starts from B = 0, where the "
                           "sensitivity is zero: the importance never moves; use hsplitlora.importance=gradient")
        if hc.aggregation == "stacked" and self._server_dtype not in (torch.float32, torch.float64):
            logger.warning("hsplitlora: the updates are folded into %s base weights, which rounds each update to "
                           "that dtype's precision; model.dtype=float32 keeps them", self._server_dtype)
        self.rounds_done = 0
        self.reconfigurations = 0
        self.last_change: Optional[float] = None
        # Per client, the bytes its forward saved for the backward (measured; the planner estimates
        # them with SegmentCost.activation_bytes), and the configuration they were measured at.
        for c in range(self.num_clients):
            self._restart_adapters(c, self._seed(0))
        self._announce("initial configuration (uniform importance)")

    # -- segments --------------------------------------------------------------------------------------
    def _segments(self, setup):
        """(cut -> client template, server or None). One cut equal to model.cut_layer: the setup's
        segments (as SplitLoRA). Several cuts: a client segment per cut and one server segment from
        the shallowest cut, all sharing one copy of the frozen weights, adapters initialised as
        the setup's (seeded by whole-model name)."""
        cfg = setup.cfg
        if self.cuts == [cfg.model.cut_layer]:
            return {cfg.model.cut_layer: setup.client}, None
        from ..split import ClientSegment, ServerSegment

        lc, ls = cfg.lora.client, cfg.lora.server
        pool: Dict[str, torch.Tensor] = {}
        server = ServerSegment(setup.base_model, self.cuts[0])
        dtype = cfg.lora.adapter_dtype
        add_lora(server, ls.target_modules, LoraSpec(ls.r, ls.alpha, ls.dropout, ls.rslora, dtype), seed=cfg.seed)
        server.to(setup.device).train(setup.server.training)
        share_parameters(server, pool)
        templates = {}
        for k in self.cuts:
            segment = ClientSegment(setup.base_model, k)
            add_lora(segment, lc.target_modules, LoraSpec(lc.r, lc.alpha, lc.dropout, lc.rslora, dtype), seed=cfg.seed)
            segment.to(setup.device).train(setup.client.training)
            share_parameters(segment, pool)
            templates[k] = segment
        return templates, server

    def _server_views(self, setup) -> Dict[int, nn.Module]:
        """cut -> the server's layers from that cut on: a segment sharing every tensor (adapters
        included) with the server's, so training through any view trains the server."""
        views = {}
        pool: Dict[str, torch.Tensor] = {}
        share_parameters(self.server, pool, adapters=True)
        from ..split import ServerSegment

        ls = self.cfg.lora.server
        for k in self.cuts:
            if k == self._server_start:
                views[k] = self.server
                continue
            view = ServerSegment(setup.base_model, k)
            spec = LoraSpec(ls.r, ls.alpha, ls.dropout, ls.rslora, self.cfg.lora.adapter_dtype)
            add_lora(view, ls.target_modules, spec, seed=self.cfg.seed)
            view.to(setup.device).train(self.server.training)
            share_parameters(view, pool, adapters=True)
            views[k] = view
        return views

    def _segment_cost(self, setup, cut: int) -> SegmentCost:
        from .. import codec

        cfg = setup.cfg
        b, t, h = cfg.train.batch_size, setup.seq_len, setup.hidden_size
        grad_bits = cfg.codec.bits if cfg.codec.compress_gradients else 32

        def cut_bytes(bits: int) -> int:
            if bits == 32:
                return b * t * h * 4 + 128  # a float32 safetensors packet: the data and a small header
            return codec.packed_size((b, t, h), bits=bits, group_size=cfg.codec.group_size)

        # What goes up beside the activations (base.mask_meta): a packed batch's position ids instead of its mask.
        mask_key = "position_ids" if getattr(cfg.data, "packing", False) else "attention_mask"
        meta = pack_tensors({mask_key: torch.zeros(b, t, dtype=torch.long),
                             "labels": torch.zeros(b, t, dtype=torch.long)}).numel()
        return SegmentCost.of(client_parts(self._templates[cut], None), cut_layer=cut, layers=cut, batch=b,
                              seq_len=t, hidden=h, heads=int(setup.base_model.config.num_attention_heads),
                              optimizer=cfg.train.optimizer, up_bytes=cut_bytes(cfg.codec.bits) + meta,
                              down_bytes=cut_bytes(grad_bits))

    # -- configuration -------------------------------------------------------------------------------
    def _configure(self) -> List[ClientPlan]:
        hc = self.hc
        plans = configure_clients_with_cuts(self.devices, self._costs, self.importance, self._rank_per_weight,
                                            min_rank=hc.min_rank, max_rank=hc.max_rank, step_time_s=hc.step_time_s,
                                            names=self._whole)
        if hc.configuration == "weakest":
            plans = weakest_plan_for_all(plans, self.devices, self._costs, step_time_s=hc.step_time_s)
        return plans

    def _server_ranks(self, plans: List[ClientPlan]) -> List[int]:
        """server_adapters=per_client: client c's server-side rank, lora.server.r scaled like its
        own ranks (its mean rank per adapted weight over lora.client.r), within [min_rank, max_rank]."""
        r = self.cfg.lora.server.r
        return [min(self.hc.max_rank, max(self.hc.min_rank, round(r * p.total_rank / len(p.ranks)
                                                                  / self._rank_per_weight)))
                for p in plans]

    # -- per-client server adapters ----------------------------------------------------------------
    def _install_per_client_server_adapters(self) -> None:
        """Every adapted server module becomes a MultiLoRALinear with one adapter per client (at
        `_server_ranks`), the same module object in the server and in every view."""
        ranks = self._server_ranks(self.plans)
        views = [v for v in self._views.values() if v is not self.server]
        for name, module in lora_modules(self.server).items():
            full = self.server.full_model_name(name)
            multi = MultiLoRALinear.from_lora_layer(module, ranks)
            self.server.set_submodule(name, multi)
            for view in views:
                local = view.local_name(full)
                if local is not None:
                    view.set_submodule(local, multi)
            self._multi[name] = multi
        self._init_server_adapters(self._seed(0), ranks)

    @torch.no_grad()
    def _init_server_adapters(self, seed: int, ranks: List[int]) -> None:
        """Every client's server adapters at `ranks`: A seeded by the module's whole-model name (as
        the clients' own), B = 0; a new server optimizer (the learning-rate schedule carries on)."""
        for name, multi in self._multi.items():
            full = self.server.full_model_name(name)
            for c, r in enumerate(ranks):
                if multi.ranks[c] != r:
                    multi.set_rank(c, r)
                init_lora_pair(multi.lora_A[c], multi.lora_B[c], seed, full)
        self.server_side = _fresh_side([self.server], self.cfg.train, self.server_side)

    def _seed(self, round_index: int) -> int:
        # Round 0 starts from the adapters every strategy starts from (same seed, same names); each
        # later round draws fresh A matrices.
        return self.cfg.seed + 7919 * round_index

    def _restart_adapters(self, c: int, seed: int) -> None:
        """Client c at its plan: the segment of its cut (rebuilt if the cut changed), adapters at its
        ranks with fresh A and B = 0, a new optimizer."""
        plan = self.plans[c]
        head = self.parts[c]["head"]
        if head.layer_range[1] != plan.cut_layer:
            self.parts[c] = client_parts(clone_sharing_frozen(self._templates[plan.cut_layer]), None)
            self.parts[c].train(head.training)
            self._unique_parts = list(self.parts)
        reinit_adapters(self.parts[c], plan.ranks, seed=seed, names=self._whole)
        self._new_side(c)

    def _new_side(self, c: int) -> None:
        self.client_sides[c] = _fresh_side([self.parts[c]], self.cfg.train, self.client_sides[c])

    def _announce(self, reason: str) -> None:
        lines = [f"hsplitlora, round {self.rounds_done}: {reason}"] + ["  " + p.describe() for p in self.plans]
        if self._multi:
            lines.append("  server adapters per client, ranks: "
                         + ", ".join(f"client{c}={r}" for c, r in enumerate(self._server_ranks(self.plans))))
        text = "\n".join(lines)
        logger.info(text)
        self._log(text)

    def _plan_metrics(self) -> Dict[str, float]:
        out: Dict[str, float] = {"reconfigurations": float(self.reconfigurations)}
        if self.last_change is not None:
            out["importance_change"] = float(self.last_change)
        for p in self.plans:
            c = p.client
            out[f"client{c}_cut"] = float(p.cut_layer)
            out[f"client{c}_rank"] = float(p.total_rank)
            out[f"client{c}_est_step_s"] = float(p.step_time_s)
            out[f"client{c}_est_memory_gib"] = float(p.memory_bytes / GIB)
            out[f"client{c}_fits"] = 1.0 if p.fits else 0.0
            out[f"client{c}_est_activation_bytes"] = float(self._costs[p.cut_layer].activation_bytes(p.ranks))
            measured = self._client_activation_bytes(c)
            if measured is not None:
                out[f"client{c}_activation_bytes"] = float(measured)
        if self._multi:
            for c, r in enumerate(self._server_ranks(self.plans)):
                out[f"client{c}_server_rank"] = float(r)
        return out

    # -- training ----------------------------------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        result = self._exchange(step, list(range(self.num_clients)))
        result.extra.update(self._plan_metrics())
        return result

    def _client_party(self, c: int) -> str:
        """Client c under its current configuration: what the client's forward keeps for its backward
        (the memory term the planner estimates) depends on its cut and ranks, so each configuration
        has its own measured peak."""
        p = self.plans[c]
        return f"{client_name(c)}|cut {p.cut_layer}|" + ",".join(f"{k}={v}" for k, v in sorted(p.ranks.items()))

    def _client_meter(self, c: int, tokens: int):
        return self.activation_peaks.measure(self._client_party(c), tokens, exclude=self.parts[c].parameters())

    def _client_activation_bytes(self, c: int) -> Optional[int]:
        return self.activation_peaks.bytes(self._client_party(c))

    def _server_compute(self, step: int, group, received, metas):
        """One forward per cut group (the clients with that cut batched), one backward over the
        mean of all clients' losses, one optimizer step; per client the future of its gradient."""
        n_group = len(group)
        by_cut: Dict[int, List[int]] = {}
        for i, c in enumerate(group):
            by_cut.setdefault(self.plans[c].cut_layer, []).append(i)
        with self.rng(SERVER), self._server_timer:
            self.server_side.zero_grad()
            losses: List[Optional[torch.Tensor]] = [None] * n_group
            inputs = []
            with self._server_meter(received):
                for cut in sorted(by_cut):
                    # In client order: with per-client server adapters, the rows of client c are the
                    # c-th group of every MultiLoRALinear (one launch for all of them).
                    idx = sorted(by_cut[cut], key=lambda i: group[i])
                    sizes = [received[i].shape[0] for i in idx]
                    h = concat_right_padded([received[i] for i in idx]).requires_grad_(True)
                    masks = mask_kwargs([metas[i] for i in idx])
                    if self._multi:
                        per_client = [0] * self.num_clients
                        for i, n in zip(idx, sizes):
                            per_client[group[i]] = n
                        with adapter_groups(self._views[cut], per_client):
                            out = self._views[cut](h, **masks)
                    else:
                        out = self._views[cut](h, **masks)
                    for i, logits in zip(idx, out.split(sizes)):
                        labels = metas[i]["labels"]
                        losses[i] = causal_lm_loss(logits[:, :labels.shape[1]], labels)
                    inputs.append((h, idx, sizes))
            torch.stack(losses).mean().backward()
            self.server_side.step()
            grads = {}
            for h, idx, sizes in inputs:
                for i, g in zip(idx, (h.grad * n_group).split(sizes)):
                    grads[group[i]] = self.encoder.submit(self.grad_down[group[i]], g[:, :received[i].shape[1]])
        self._group_sizes = {cut: sum(received[i].shape[0] for i in idx) for cut, idx in by_cut.items()}
        self._group_lengths = {cut: max(received[i].shape[1] for i in idx) for cut, idx in by_cut.items()}
        self._step_lengths = [r.shape[1] for r in received]
        return [l.detach() for l in losses], [r.shape[0] for r in received], grads

    def _client_finish(self, c: int, step: int, packet) -> None:
        with self.rng(client_name(c)), self._client_timers[c]:
            g = self._decode_from_server(c, step, packet)
            self._hidden[c].backward(g)
            # The gradients before clipping and the step: what the importance is defined on.
            self._trackers[c].observe(lora_modules(self.parts[c]))
            self.client_sides[c].step()

    def _server_flops(self, cut: int, batch: int, seq_len: int) -> float:
        key = ("server-from", cut, batch, seq_len)
        if key not in self._flops_cache:
            s = self.setup
            self._flops_cache[key] = forward_flops(self._views[cut], batch, seq_len, s.num_layers - cut,
                                                   s.hidden_size)
        return self._flops_cache[key]

    def _simulated_step(self, group, batch: int, server_batch: int, grad_bytes, tail_sim=None) -> float:
        """As SplitLoRA's, each client on its own device and link at its cut and ranks; the server
        runs its cut groups one after another."""
        tm = self.time_model
        length = dict(zip(group, self._step_lengths))
        head = {c: self.devices[c].compute(self._costs[self.plans[c].cut_layer].forward_flops(
                    self.plans[c].ranks, batch, seq_len=length[c]))
                for c in group}
        phase_up = max(head[c] + self.devices[c].transfer(self._up_bytes[c]) for c in group)
        middle = sum(tm.server_compute(train_flops(self._server_flops(cut, size, self._group_lengths[cut])))
                     for cut, size in self._group_sizes.items())
        phase_down = max(self.devices[c].transfer(grad_bytes[c]) + head[c] for c in group)
        return phase_up + middle + phase_down

    # -- end of round: importance, configuration, aggregation ----------------------------------------------
    def end_round(self, step: int) -> float:
        n = self.num_clients
        weights = self.setup.client_weights
        round_index = self.rounds_done
        importance_round = (round_index + 1) % self.hc.importance_every == 0

        up = []
        for c in range(n):
            payload = adapter_state(self.parts[c])
            if importance_round:
                payload.update({IMPORTANCE_KEY + m: torch.tensor([s], dtype=torch.float64)
                                for m, s in self._trackers[c].scores.items()})
            up.append(self._send_adapters(client_name(c), SERVER, step, payload))
        received = [self._recv_adapters(SERVER, client_name(c), step) for c in range(n)]
        states = [{k: v for k, v in r.items() if not k.startswith(IMPORTANCE_KEY)} for r in received]

        # The server: importance, and a new configuration if the ranking moved far enough.
        reason = None
        plans = self.plans
        if importance_round:
            scores = [{k[len(IMPORTANCE_KEY):]: float(v) for k, v in r.items() if k.startswith(IMPORTANCE_KEY)}
                      for r in received]
            combined = combine_importance(scores, weights)
            if combined:
                # A weight no client holds keeps no score of its own: it gets the mean.
                mean = sum(combined.values()) / len(combined)
                self.importance = {m: combined.get(m, mean) for m in self._modules}
            self.last_change = ranking_change(self._reference, self.importance)
            if self.last_change > self.hc.reconfigure_threshold:
                plans = self._configure()
                self._reference = dict(self.importance)
                self.reconfigurations += 1
                changed = [p.client for p, q in zip(plans, self.plans)
                           if p.ranks != q.ranks or p.cut_layer != q.cut_layer]
                reason = (f"reconfigured (importance ranking moved {self.last_change:.3f} > "
                          f"{self.hc.reconfigure_threshold}); changed for "
                          f"{', '.join(f'client{c}' for c in changed) if changed else 'no client'}")

        if self.hc.aggregation == "stacked":
            down = self._stacked_round(step, states, plans, round_index)
        else:
            down = self._zero_pad_round(step, states, weights, plans, round_index)
        self.rounds_done += 1
        if reason is not None:
            self._announce(reason)
        return (max(self.devices[c].transfer(up[c]) for c in range(n))
                + max(self.devices[c].transfer(down[c]) for c in range(n)))

    def _aggregate(self, states, cuts: List[int], limit: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Per whole-model name of an adapted weight below layer `limit`, the stacked (A, B) of scaling
        1 whose product is the weighted mean of the updates of the parties that trained it: the clients
        holding it (cuts[c] above its layer), and the server's adapter with the total weight of the
        clients whose activations ran through it (cuts[c] at or below its layer)."""
        w = self.setup.client_weights
        contributions: Dict[str, list] = {}
        for c, state in enumerate(states):
            scalings = lora_scalings(self.parts[c])
            for m, (a, b) in lora_pairs(state).items():
                contributions.setdefault(self._whole[m], []).append((_upcast(a), _upcast(b), w[c], scalings[m]))
        for name, multi in self._multi.items():
            # Per-client server adapters: client c's, for the clients whose activations ran through
            # the layer (all of them on the head), each with its own weight.
            layer = self._server_layer[name]
            full = self.server.full_model_name(name)
            for c in range(len(cuts)):
                if layer is None or cuts[c] <= layer:
                    contributions.setdefault(full, []).append(
                        (_upcast(multi.lora_A[c].detach()), _upcast(multi.lora_B[c].detach()), w[c],
                         multi.scaling(c)))
        server_scalings = lora_scalings(self.server)
        for name, module in lora_modules(self.server).items():
            layer = self._server_layer[name]
            if layer is None or layer >= limit:
                continue
            through = sum(w[c] for c in range(len(cuts)) if cuts[c] <= layer)
            if through > 0:
                contributions.setdefault(self.server.full_model_name(name), []).append(
                    (_upcast(module.lora_A.detach()), _upcast(module.lora_B.detach()), through,
                     server_scalings[name]))
        return {full: stack_adapters([(a, b) for a, b, _, _ in parts], [x for _, _, x, _ in parts],
                                     [s for _, _, _, s in parts])
                for full, parts in contributions.items()}

    def _stacked_round(self, step, states, plans, round_index) -> List[int]:
        n = self.num_clients
        old_cuts = [p.cut_layer for p in self.plans]
        new_cuts = [p.cut_layer for p in plans]
        limit = max(old_cuts + new_cuts)
        stacked = self._aggregate(states, old_cuts, limit)
        self.plans = plans
        seed = self._seed(round_index + 1)
        for c in range(n):
            self._restart_adapters(c, seed)
        self._restart_server_adapters(limit, seed)
        warm = self._warm_start(stacked, limit) if self.hc.restart == "warm" else {}
        # Every party folds B @ A (less its warm start) into its copy of the base weights; here
        # they share one: fold once.
        self._fold(stacked, warm)
        layer_of = {full: self._layer_of_full(full) for full in stacked}
        down = []
        for c in range(n):
            # The stacked pairs of the layers the client keeps (with a warm restart: of every layer
            # it holds next round, its adapters' start comes from them), and the (folded) base
            # weights of any layer it newly holds.
            keep = new_cuts[c] if warm else min(old_cuts[c], new_cuts[c])
            payload = {}
            for full, (a, b) in stacked.items():
                if layer_of[full] is not None and layer_of[full] < keep:
                    payload[f"{full}.lora_A"], payload[f"{full}.lora_B"] = a, b
            payload.update(self._layer_weights(old_cuts[c], new_cuts[c]))
            down.append(self._send_adapters(SERVER, client_name(c), step, payload) if payload else 0)
            if payload:
                self._recv_adapters(client_name(c), SERVER, step)
        return down

    @torch.no_grad()
    def _warm_start(self, stacked, limit: int) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """restart=warm, once the adapters restarted: in its first k ranks, every adapter restarting
        on a folded weight starts from (A_k, B_k), the best rank-k approximation of the weight's
        stacked mean update (`truncate_product`; k the smallest rank among those adapters), so that
        its scaling * B @ A there is B_k @ A_k; its other ranks stay as restarted (B = 0, fresh A).
        Returns the (A_k, B_k) per whole-model name: the part of the update the fold leaves to the
        adapters. Needs self.plans at the next round's configuration."""
        targets: Dict[str, list] = {}
        for part in {id(p): p for p in self.parts}.values():
            scalings = lora_scalings(part)
            for m, module in lora_modules(part).items():
                full = self._whole[m]
                if full in stacked:
                    targets.setdefault(full, []).append((module.lora_A, module.lora_B, scalings[m]))
        if self._multi:
            for name, multi in self._multi.items():
                full = self.server.full_model_name(name)
                if full in stacked:
                    targets.setdefault(full, []).extend(
                        (multi.lora_A[c], multi.lora_B[c], multi.scaling(c)) for c in range(len(multi.ranks)))
        else:
            scalings = lora_scalings(self.server)
            for name, module in lora_modules(self.server).items():
                layer = self._server_layer[name]
                full = self.server.full_model_name(name)
                if layer is not None and layer < limit and full in stacked:
                    targets.setdefault(full, []).append((module.lora_A, module.lora_B, scalings[name]))
        # A weight that some client reaches through a server layer without an adapter on it (a
        # client-only target module below a deeper client's cut) has nowhere to keep a warm part on
        # that path: it is folded whole, and its adapters restart fresh.
        server_targets = ({self.server.full_model_name(name) for name in self._multi} if self._multi else
                          {self.server.full_model_name(name) for name in lora_modules(self.server)})
        cuts = self._cuts()
        warm = {}
        for full, adapters in targets.items():
            layer = self._layer_of_full(full)
            if full not in server_targets and layer is not None and any(cut <= layer for cut in cuts):
                continue
            a, b = stacked[full]
            a_k, b_k = truncate_product(a, b, min(lora_a.shape[0] for lora_a, _, _ in adapters))
            k = a_k.shape[0]
            row_norms = a_k.norm(dim=1).clamp_min(torch.finfo(a_k.dtype).tiny)
            for lora_a, lora_b, scaling in adapters:
                # Rows of A as long as the restart drew them (the product unchanged): A's scale sets
                # how fast B learns, and the update's own scale (sqrt of its singular values) is
                # far smaller than a fresh A's.
                fresh = lora_a.detach().to(a_k.dtype).norm(dim=1).mean()
                ratio = (fresh / row_norms)[:, None]
                lora_a[:k].copy_((a_k * ratio).to(lora_a.dtype))
                lora_b[:, :k].copy_((b_k / ratio.t() / scaling).to(lora_b.dtype))
            warm[full] = (a_k, b_k)
        return warm

    def _layer_of_full(self, full: str) -> Optional[int]:
        for segment in (self._templates[self.cuts[-1]], self.server):
            local = segment.local_name(full)
            if local is not None:
                return _layer_index(segment, local)
        return None

    def _layer_weights(self, old_cut: int, new_cut: int) -> Dict[str, torch.Tensor]:
        """The frozen weights of the decoder layers [old_cut, new_cut): what a client whose cut
        deepens downloads."""
        if new_cut <= old_cut:
            return {}
        deepest = self._templates[self.cuts[-1]]
        out = {}
        for name, p in deepest.named_parameters():
            if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
                continue
            layer = _layer_index(deepest, name)
            if layer is not None and old_cut <= layer < new_cut:
                out[deepest.full_model_name(name)] = p.detach()
        return out

    @torch.no_grad()
    def _fold(self, stacked, warm) -> None:
        for full, (a, b) in stacked.items():
            weight, fan_in_fan_out = self._foldable[full]
            delta = _upcast(b) @ _upcast(a)
            if full in warm:  # what the adapters restart from stays out of the base
                a_k, b_k = warm[full]
                delta = delta - _upcast(b_k) @ _upcast(a_k)
            fold_into_weight(weight, delta, fan_in_fan_out=fan_in_fan_out)

    @torch.no_grad()
    def _restart_server_adapters(self, limit: int, seed: int) -> None:
        """The server's adapters on layers below `limit` (per-client ones: all) were folded: B = 0,
        fresh A, no optimizer state (in place: the views keep sharing them)."""
        if self._multi:
            self._init_server_adapters(seed, self._server_ranks(self.plans))
            return
        modules = lora_modules(self.server)
        state = self.server_side.optimizer.state
        for name, layer in self._server_layer.items():
            if layer is None or layer >= limit:
                continue
            module = modules[name]
            init_adapter(module, seed, self.server.full_model_name(name))
            for p in (module.lora_A, module.lora_B):
                state.pop(p, None)

    def _zero_pad_round(self, step, states, weights, plans, round_index) -> List[int]:
        n = self.num_clients
        average = zero_pad_fedavg(states, weights)
        widest = {m: a.shape[0] for m, (a, _) in lora_pairs(average).items()}
        down, got = [], []
        for c in range(n):
            sent = truncate(average, {m: min(r, widest[m]) for m, r in plans[c].ranks.items()})
            down.append(self._send_adapters(SERVER, client_name(c), step, sent))
        for c in range(n):
            got.append(self._recv_adapters(client_name(c), SERVER, step))
        self.plans = plans
        for c in range(n):
            ranks = {name: m.r for name, m in lora_modules(self.parts[c]).items()}
            if ranks != plans[c].ranks:
                self._restart_adapters(c, self._seed(round_index + 1))
            self._load_padded(c, got[c])
        return down

    @torch.no_grad()
    def _load_padded(self, c: int, state: Dict[str, torch.Tensor]) -> None:
        """Client c's adapters from a state of equal or lower ranks: the first rows of A and columns
        of B; beyond them A keeps its fresh values and B is zero (no change to the update)."""
        modules = lora_modules(self.parts[c])
        for m, (a, b) in lora_pairs(state).items():
            module = modules[m]
            r = a.shape[0]
            module.lora_A[:r].copy_(a)
            module.lora_B.zero_()
            module.lora_B[:, :r].copy_(b)

    # -- the global model: evaluation and export --------------------------------------------------------
    def _cuts(self) -> List[int]:
        return [p.cut_layer for p in self.plans]

    def _preview(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]:
        """Per whole-model name, (A, B, scaling) of what the end of this round would fold (stacked),
        or the zero-padded average of the clients' adapters (zero_pad)."""
        states = [adapter_state(p) for p in self.parts]
        if self.hc.aggregation == "stacked":
            cuts = self._cuts()
            return {full: (a, b, 1.0) for full, (a, b) in self._aggregate(states, cuts, max(cuts)).items()}
        lc = self.cfg.lora.client
        out = {}
        for m, (a, b) in lora_pairs(zero_pad_fedavg(states, self.setup.client_weights)).items():
            r = a.shape[0]
            out[self._whole[m]] = (a, b, lc.alpha / math.sqrt(r) if lc.rslora else lc.alpha / r)
        return out

    @torch.no_grad()
    def _global_segments(self) -> Tuple[nn.Module, nn.Module]:
        """(client segment, server view) at the shallowest cut in use, carrying the preview: as
        adapters where the module has one, folded into a private copy of the weight elsewhere."""
        cut = min(self._cuts())
        client = clone_sharing_frozen(self._templates[cut])
        server = clone_sharing_frozen(self._views[cut])
        # Per-client server adapters are all in the preview (their weighted mean): the base alone.
        for local, multi in multi_lora_modules(server).items():
            server.set_submodule(local, multi.base_only())
        for full, (a, b, scaling) in self._preview().items():
            for segment in (client, server):
                local = segment.local_name(full)
                if local is None:
                    continue
                module = segment.get_submodule(local)
                if hasattr(module, "lora_A"):
                    module.lora_A = nn.Parameter(a.to(module.weight.dtype).clone(), requires_grad=False)
                    module.lora_B = nn.Parameter(b.to(module.weight.dtype).clone(), requires_grad=False)
                    module.use_rslora = False
                    module.lora_alpha = float(scaling) * a.shape[0]
                else:
                    delta = scaling * (_upcast(b) @ _upcast(a))
                    fan_in_fan_out = self._foldable[full][1]
                    module.weight = nn.Parameter((_upcast(module.weight) + (delta.t() if fan_in_fan_out else delta))
                                                 .to(module.weight.dtype), requires_grad=False)
        return client, server

    def logits_fn(self):
        client, server = self._global_segments()
        client.eval()
        server.eval()

        def fn(input_ids, attention_mask):
            return server(client(input_ids, attention_mask), attention_mask)

        return fn

    @torch.no_grad()
    def export_state(self):
        lc, ls = self.cfg.lora.client, self.cfg.lora.server
        preview = self._preview()
        client_plan, state = {}, {}
        if self.hc.aggregation == "stacked":
            # A server adapter on a foldable layer that no client holds now is live, not in the preview.
            scalings = lora_scalings(self.server)
            for name, module in lora_modules(self.server).items():
                full = self.server.full_model_name(name)
                if full in self._foldable and full not in preview:
                    preview[full] = (module.lora_A.detach(), module.lora_B.detach(), scalings[name])
            original = dict(self.setup.base_model.named_modules())
            for full, (weight, fan_in_fan_out) in self._foldable.items():
                # The base model is in host memory (trainer.build), the folded weight on the device.
                delta = weight.detach().double() - original[full].weight.detach().to(weight.device).double()
                if fan_in_fan_out:
                    delta = delta.t()
                if full in preview:
                    a, b, scaling = preview[full]
                    delta = delta + scaling * (b.double() @ a.double())
                if not bool(delta.any()):
                    continue  # never trained (e.g. a layer no client has held): nothing to export
                ea, eb = low_rank_factors(delta, self.hc.export_rank)
                r = ea.shape[0]
                # Scaling 1, under the server's rsLoRA flag (one flag per PEFT adapter file).
                client_plan[full] = (r, math.sqrt(r) if ls.rslora else float(r), lc.dropout, ls.rslora)
                state[f"{full}.lora_A"] = ea.to(weight.dtype)
                state[f"{full}.lora_B"] = eb.to(weight.dtype)
        else:
            for full, (a, b, _) in preview.items():
                client_plan[full] = (a.shape[0], lc.alpha, lc.dropout, lc.rslora)
                state[f"{full}.lora_A"], state[f"{full}.lora_B"] = a, b
        server_plan = {k: v for k, v in lora_plan(self.server).items() if k not in client_plan}
        server_state = whole_model_names(self.server, adapter_state(self.server))
        state.update({k: v for k, v in server_state.items() if k.rsplit(".", 1)[0] in server_plan})
        return [client_plan, server_plan], state

    def memory_report(self) -> dict:
        """Per client its configuration, adapter parameters and estimates (the run summary's
        trainable_params); the server's trainable parameters."""
        clients = []
        for p in self.plans:
            clients.append({
                "device": p.device, "cut_layer": p.cut_layer, "total_rank": p.total_rank,
                "ranks": {self._whole[m]: r for m, r in p.ranks.items()},
                "trainable_params": self._costs[p.cut_layer].adapter_params(p.ranks),
                "est_step_s": p.step_time_s, "est_memory_bytes": p.memory_bytes,
                "est_activation_bytes": self._costs[p.cut_layer].activation_bytes(p.ranks),
                "measured_activation_bytes": self._client_activation_bytes(p.client),
                "memory_budget_bytes": p.memory_budget_bytes, "step_time_budget_s": p.time_budget_s,
                "fits": p.fits,
            })
        if self._multi:
            for entry, r in zip(clients, self._server_ranks(self.plans)):
                entry["server_rank"] = r
        return {"clients": clients, "server": count_params(self.server, trainable_only=True),
                "reconfigurations": self.reconfigurations}

    # -- state -------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        super().train(mode)
        for view in self._views.values():
            view.train(mode)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["hsplitlora"] = {
            "plans": [p.to_state() for p in self.plans],
            # The folded base weights (shared by every segment).
            "base": {full: weight.detach().clone() for full, (weight, _) in self._foldable.items()},
            "trackers": [t.state_dict() for t in self._trackers],
            "importance": dict(self.importance),
            "reference": dict(self._reference),
            "rounds_done": self.rounds_done,
            "reconfigurations": self.reconfigurations,
            "last_change": self.last_change,
            # Per-client server adapters, {module: [(A, B) per client]} (their ranks follow the plans).
            "server_per_client": {name: [(a.detach().clone(), b.detach().clone())
                                         for a, b in zip(m.lora_A, m.lora_B)] for name, m in self._multi.items()},
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        h = state["hsplitlora"]
        self.plans = [ClientPlan.from_state(p) for p in h["plans"]]
        for p in self.plans:
            p.names = dict(self._whole)
        for c in range(self.num_clients):
            # Cuts and shapes first: the adapters and optimizer states below load into them.
            self._restart_adapters(c, self._seed(0))
        with torch.no_grad():
            for full, value in h["base"].items():
                self._foldable[full][0].copy_(value)
        for tracker, s in zip(self._trackers, h["trackers"]):
            tracker.load_state_dict(s)
        self.importance = {str(k): float(v) for k, v in h["importance"].items()}
        self._reference = {str(k): float(v) for k, v in h["reference"].items()}
        self.rounds_done = int(h["rounds_done"])
        self.reconfigurations = int(h["reconfigurations"])
        self.last_change = None if h["last_change"] is None else float(h["last_change"])
        if self._multi:
            # Ranks first (a new server optimizer over the new tensors), then the values; the
            # optimizer state loads below.
            self._init_server_adapters(self._seed(0), self._server_ranks(self.plans))
            with torch.no_grad():
                for name, pairs in h["server_per_client"].items():
                    multi = self._multi[name]
                    for c, (a, b) in enumerate(pairs):
                        multi.lora_A[c].copy_(a)
                        multi.lora_B[c].copy_(b)
        super().load_state_dict(state)
