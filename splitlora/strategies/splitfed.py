"""Split learning across the cut: SplitLoRA (clients in parallel, batched on the server, FedAvg
of client adapters), and `_SplitBase`, which it shares with vanilla split learning (sl.py: clients
one after another, no aggregation) and HSplitLoRA.

Both run the same exchange, `_exchange`, on a group of clients: each client runs its segment to
the cut and sends the encoded activations (plus labels and attention mask, or only the mask in
the U-shape); the server concatenates the group's activations into one batch, runs forward and
backward once, and returns each client the gradient of its own loss at the cut. SplitLoRA calls
it once per step with every client; vanilla SL once per client, in turn.

Loss scaling: the server trains on the mean of the clients' mean losses; the gradient it returns
to client c is that of client c's own mean loss (N x its slice of the batch gradient), so a
client's update does not depend on how many others share the server's batch.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..adapters import (adapter_state, clone_sharing_frozen, load_adapter_state, lora_plan,
                        whole_model_names)
from ..aggregate import fedavg
from ..memory import most_demanding, side_memory
from ..privacy.adapters import privatize_update
from ..privacy.settings import PrivacyRuntime
from ..privacy.stream import PrivateEncode, clip_for_backward
from ..timemodel import train_flops
from ..transport import SERVER, TransportError, client_name, is_client_process
from ..wire import EncodeWorker, pack_tensors, unpack_tensors
from .base import (Side, StepResult, Strategy, Timer, causal_lm_loss, concat_right_padded, mask_kwargs,
                   mask_meta)
from .rounds import FAILED, RoundsMixin


def client_parts(head: nn.Module, tail: Optional[nn.Module]) -> nn.ModuleDict:
    """A client's modules as one container, so its adapters are one state dict."""
    parts = nn.ModuleDict({"head": head})
    if tail is not None:
        parts["tail"] = tail
    return parts


class _SplitBase(RoundsMixin, Strategy):
    def __init__(self, setup, parts: List[nn.ModuleDict]) -> None:
        super().__init__(setup)
        self.u_shape = bool(self.cfg.train.u_shape)
        self.parts = parts
        self.server = clone_sharing_frozen(setup.server)
        unique_parts = list({id(p): p for p in parts}.values())
        # One optimizer per client, even where clients share modules (vanilla SL): what a real
        # client keeps locally.
        self.client_sides = [Side([parts[c]], self.cfg.train) for c in range(self.num_clients)]
        self.server_side = Side([self.server], self.cfg.train, updates_per_step=self._server_updates_per_step())
        self._unique_parts = unique_parts
        self._remote_client_memory: dict = {}  # client index -> its side's memory (transport=dist)
        n = self.num_clients
        self.act_up = [self._stream(self.codec_settings, 4 * c) for c in range(n)]
        self.grad_down = [self._stream(self.grad_settings, 4 * c + 1) for c in range(n)]
        self.act_down = [self._stream(self.codec_settings, 4 * c + 2) for c in range(n)]
        self.grad_up = [self._stream(self.grad_settings, 4 * c + 3) for c in range(n)]
        self._server_dtype = next(self.server.parameters()).dtype
        self.encoder = EncodeWorker(self.device, enabled=bool(self.cfg.codec.overlap))
        self._flops_cache: Dict[tuple, float] = {}
        # DP (splitlora.privacy): None when the config's privacy section is off. Sample rate of a
        # client's examples: its batch / its examples.
        self.privacy = None
        if self.cfg.privacy.clip is not None or self.cfg.privacy.adapter_clip is not None:
            self.privacy = PrivacyRuntime(self.cfg, [min(1.0, l.batch_size / len(l)) for l in setup.loaders])
        # The global client adapters of the last average: what an adapter update is measured from.
        self._adapter_base = adapter_state(parts[0]) if self.privacy is not None and self.privacy.adapters else None
        # federation.clients_per_round: the clients that train in the current round (a seeded sample
        # of those available, splitlora.strategies.rounds). None in the in-process run without
        # sampling (every client, every round).
        self._sampling = self.cfg.federation.clients_per_round is not None
        self.round_clients: Optional[List[int]] = None
        # The clients that hold the current global adapters. One outside it (it sat out the last
        # average, or it joined since) is sent them before it next trains: the non-sampled clients
        # of a round get the round's average when they are next sampled, not at once.
        self._fresh = set(range(n))
        self._trains_this_round = True  # a federation client: whether the server sampled it

    # -- flops ------------------------------------------------------------------------------------
    def _flops(self, what: str, batch: int, seq_len: int) -> float:
        key = (what, batch, seq_len)
        if key not in self._flops_cache:
            s = self.setup
            cut = self.cfg.model.cut_layer
            # Where the server's layers end: the U-shape's server_end as resolved at build time
            # (model.server_end may be null, meaning its default), else the last layer.
            end = s.server.layer_range[1]
            if what == "head":
                f = self._fwd_flops(s.client, batch, cut, seq_len)
            elif what == "tail":
                f = self._fwd_flops(s.tail, batch, s.num_layers - end, seq_len)
            else:
                f = self._fwd_flops(s.server, batch, end - cut, seq_len)
            self._flops_cache[key] = f
        return self._flops_cache[key]

    # -- memory per side --------------------------------------------------------------------------
    def _client_meter(self, c: int, tokens: int):
        """Measures client c's forward when it may set a new peak (splitlora.memory.ActivationPeaks)."""
        return self.activation_peaks.measure(client_name(c), tokens, exclude=self.parts[c].parameters())

    def _server_meter(self, received):
        """Measures the server's forward and loss over the step's batch (its clients padded to the longest)."""
        tokens = sum(r.shape[0] for r in received) * max(r.shape[1] for r in received)
        return self.activation_peaks.measure(SERVER, tokens, exclude=self.server.parameters())

    def _client_activation_bytes(self, c: int) -> Optional[int]:
        return self.activation_peaks.bytes(client_name(c))

    def _client_memory(self, c: int) -> dict:
        # A real client holds its own copy of its segment: its frozen weights count in full for
        # each client (here the clients' copies share them).
        return side_memory([self.parts[c]], self.client_sides[c].optimizer, self._client_activation_bytes(c))

    def gather_client_memory(self) -> None:
        """transport=dist, called by every process after the last step: each client process sends
        the server what it measured of its own memory (its optimizer state and saved activations
        exist only there), so that the server's memory_per_side is the one-process run's. A
        collective of torch.distributed (with the run's timeout), outside the transport and its
        byte accounting: a measurement, not part of the protocol."""
        import torch.distributed as dist

        server = self.role == SERVER
        mine = None
        if not server:
            c = int(self.role[len("client"):])
            mine = (c, self._client_memory(c))
        gathered = [None] * dist.get_world_size() if server else None
        dist.gather_object(mine, gathered, dst=0)
        if server:
            self._remote_client_memory = dict(item for item in gathered if item is not None)

    def privacy_report(self) -> Optional[dict]:
        """summary.json's "privacy" (None when the privacy section is off)."""
        return None if self.privacy is None else self.privacy.report(self.aggregates)

    def memory_per_side(self) -> dict:
        # In a dist server process the clients ran elsewhere: what they measured arrives after the
        # last step (gather_client_memory).
        clients = [self._remote_client_memory.get(c) or self._client_memory(c) for c in range(self.num_clients)]
        return {"client": most_demanding(clients),
                "server": side_memory([self.server], self.server_side.optimizer, self.activation_peaks.bytes(SERVER))}

    def _server_updates_per_step(self) -> int:
        """How often the server's optimizer updates per global step (its schedule counts global steps)."""
        return 1

    # -- the phases of one exchange, each run by the party that owns it ------------------------------
    def _begin_step(self, group: Sequence[int]) -> None:
        self._client_timers = {c: Timer(self.device) for c in group}
        self._server_timer = Timer(self.device)
        self._hidden, self._batches, self._up_bytes = {}, {}, {}

    def _client_forward(self, c: int, step: int):
        """Client c runs to the cut; the encoding of its activations starts in the background."""
        with self.rng(client_name(c)), self._client_timers[c]:
            self.client_sides[c].zero_grad()
            batch = self._batch(c)
            with self._client_meter(c, batch["input_ids"].numel()):
                h = self.parts[c]["head"](batch["input_ids"], **mask_kwargs([batch]))
            if self.privacy is not None and self.privacy.cut:
                future = self.encoder.submit(self._private(self.act_up[c], c, batch), h.detach())
                # The client's backward goes through the clipping it applied (splitlora.privacy.clip).
                h = clip_for_backward(h, self.privacy.clip, batch.get("attention_mask"))
            else:
                future = self.encoder.submit(self.act_up[c], h.detach())
            # The padding mask, or a packed batch's position ids (the server's mask is built from them).
            meta = mask_meta(batch)
            if not self.u_shape:
                meta["labels"] = batch["labels"]
            meta_packet = pack_tensors(meta)
        self._hidden[c], self._batches[c] = h, batch
        return future, meta_packet

    def _private(self, stream, c: int, batch) -> PrivateEncode:
        p = self.privacy
        return PrivateEncode(stream, p.clip, p.noise_multiplier, p.generators[c], batch.get("attention_mask"))

    def _send_up(self, c: int, step: int, future, meta_packet) -> None:
        name = client_name(c)
        packet = future.result()
        self.transport.send(name, SERVER, "activations", step, packet)
        self.transport.send(name, SERVER, "labels", step, meta_packet)

    def _decode_from(self, c: int, step: int, what: str, decode):
        # A packet that does not decode is the sender's fault: say who sent it, never train on it.
        try:
            return decode()
        except ValueError as err:
            raise TransportError(f"the {what} packet of step {step} from {client_name(c)} could not be decoded: "
                                 f"{err}") from None

    def _server_receive(self, step: int, group: Sequence[int]):
        received, metas = [], []
        with self._server_timer:
            for c in group:
                name = client_name(c)
                act = self.transport.recv(SERVER, name, "activations", step)
                meta = self.transport.recv(SERVER, name, "labels", step)
                if self.privacy is not None and self.privacy.cut:
                    self.privacy.record_cut(c)  # the server counts each client's releases as they arrive
                self._up_bytes[c] = act.numel() + meta.numel()
                received.append(self._decode_from(c, step, "activations",
                                                  lambda: self.act_up[c].decode(act, self._server_dtype, self.device)))
                metas.append(self._decode_from(c, step, "labels", lambda: unpack_tensors(meta, self.device)))
        return received, metas

    def _server_forward(self, received, metas):
        """The server's forward over every client's activations as one batch: (cut activations,
        which collect the clients' gradients, rows per client, server output)."""
        self.server_side.zero_grad()
        sizes = [r.shape[0] for r in received]
        self._step_lengths = [r.shape[1] for r in received]  # per client of the group, for the time model
        # Clients' batches may differ in length (data.pad_to=batch): padded here, not on the wire.
        h_all = concat_right_padded(received).requires_grad_(True)
        return h_all, sizes, self.server(h_all, **mask_kwargs(metas))

    def _server_compute(self, step: int, group: Sequence[int], received, metas):
        """Plain variant: one forward/backward over all clients' activations, one optimizer step;
        returns the losses and, per client, the future of its encoded gradient."""
        n_group = len(group)
        with self.rng(SERVER), self._server_timer:
            with self._server_meter(received):
                h_all, sizes, out = self._server_forward(received, metas)
                # Each client's logits at its own length (the rest is the server's padding).
                losses = [causal_lm_loss(lg[:, :m["labels"].shape[1]], m["labels"])
                          for lg, m in zip(out.split(sizes), metas)]
            torch.stack(losses).mean().backward()
            self.server_side.step()
            grads = {c: self.encoder.submit(self.grad_down[c], g[:, :r.shape[1]])
                     for c, g, r in zip(group, (h_all.grad * n_group).split(sizes), received)}
        return [l.detach() for l in losses], sizes, grads

    def _send_down(self, c: int, step: int, future) -> int:
        packet = future.result()
        self.transport.send(SERVER, client_name(c), "gradients", step, packet)
        return packet.numel()

    def _client_finish(self, c: int, step: int, packet) -> None:
        with self.rng(client_name(c)), self._client_timers[c]:
            g = self._decode_from_server(c, step, packet)
            self._hidden[c].backward(g)
            self.client_sides[c].step()

    def _decode_from_server(self, c: int, step: int, packet):
        try:
            return self.grad_down[c].decode(packet, self._hidden[c].dtype, self.device)
        except ValueError as err:
            raise TransportError(f"the gradients packet of step {step} from the server to {client_name(c)} "
                                 f"could not be decoded: {err}") from None

    def _simulated_step(self, group, batch: int, server_batch: int, grad_bytes, tail_sim=None) -> float:
        """Clients run in parallel up to the cut and upload, the server runs the group as one
        batch, gradients come down and clients finish in parallel (input-gradient backward ~ one
        forward). The U-shape adds the clients' tails between the server's forward and backward."""
        tm = self.time_model
        # Each client at its batch's length; the server over the group padded to the longest.
        length = dict(zip(group, self._step_lengths))
        head_fwd = {c: tm.client_compute(self._flops("head", batch, length[c])) for c in group}
        phase_up = max(head_fwd[c] + tm.transfer(self._up_bytes[c]) for c in group)
        longest = max(length.values())
        if tail_sim:
            server_fwd = tm.server_compute(self._flops("server", server_batch, longest))
            middle = server_fwd + max(tail_sim.values()) + server_fwd
        else:
            middle = tm.server_compute(train_flops(self._flops("server", server_batch, longest)))
        # A client dropped before its gradients went down received none.
        phase_down = max(tm.transfer(grad_bytes.get(c, 0)) + head_fwd[c] for c in group)
        return phase_up + middle + phase_down

    # -- one exchange across the cut, every party in this process -------------------------------------
    def _exchange(self, step: int, group: Sequence[int]) -> StepResult:
        transport = self.transport
        self._begin_step(group)
        pending = {c: self._client_forward(c, step) for c in group}
        for c in group:
            self._send_up(c, step, *pending[c])
        received, metas = self._server_receive(step, group)
        tail_sim = None
        if not self.u_shape:
            losses, sizes, grads = self._server_compute(step, group, received, metas)
        else:
            losses, sizes, grads, tail_sim = self._u_shape_middle(step, group, received, metas)
        grad_bytes = {}
        for c in group:
            # Client c's backward overlaps the encoding of the next client's gradient.
            grad_bytes[c] = self._send_down(c, step, grads[c])
            self._client_finish(c, step, transport.recv(client_name(c), SERVER, "gradients", step))
        return StepResult(
            loss=float(torch.stack(losses).mean()),
            client_compute_s=sum(t.elapsed for t in self._client_timers.values()),
            server_compute_s=self._server_timer.elapsed,
            sim_time_s=self._simulated_step(group, sizes[0], sum(sizes), grad_bytes, tail_sim),
        )

    def _u_shape_middle(self, step, group, received, metas):
        """U-shape: the server returns the activations at server_end, each client runs its tail,
        loss and backward, and sends the gradient back; then the server finishes its backward."""
        tm = self.time_model
        h_all, sizes, out, down = self._u_server_down(step, group, received, metas)
        losses, tail_sim = [], {}
        for c in group:
            loss, up = self._u_client_tail(c, step)
            losses.append(loss)
            tail_flops = self._flops("tail", sizes[0], self._step_lengths[group.index(c)])
            tail_sim[c] = (tm.transfer(down[c]) + tm.client_compute(train_flops(tail_flops)) + tm.transfer(up))
        futures, _ = self._u_server_finish(step, group, received, h_all, sizes, out)
        return losses, sizes, futures, tail_sim

    # The U-shape's three phases, each run by the party that owns it (together in _u_shape_middle).
    def _u_server_down(self, step, group, received, metas, members=None):
        """The server's forward; the activations at server_end go down to each client (a client
        that fails is dropped, in a federation: `members`)."""
        with self.rng(SERVER), self._server_timer:
            with self._server_meter(received):
                h_all, sizes, out = self._server_forward(received, metas)
            down = {}
            for c, o, r in zip(group, out.split(sizes), received):
                packet = self.act_down[c].encode(o[:, :r.shape[1]].detach())
                sent = self._attempt(members, c, step, lambda c=c, packet=packet: self.transport.send(
                    SERVER, client_name(c), "activations", step, packet))
                if sent is not FAILED:
                    down[c] = packet.numel()
        return h_all, sizes, out, down

    def _u_client_tail(self, c: int, step: int):
        """Client c's tail, loss and backward; the gradient at server_end goes up. Returns (loss,
        bytes sent)."""
        name = client_name(c)
        transport = self.transport
        with self.rng(name), self._client_timers[c]:
            a = self.act_down[c].decode(transport.recv(name, SERVER, "activations", step),
                                        self._hidden[c].dtype, self.device).requires_grad_(True)
            loss = causal_lm_loss(self.parts[c]["tail"](a, **mask_kwargs([self._batches[c]])),
                                  self._batches[c]["labels"])
            loss.backward()
            if self.privacy is not None and self.privacy.protect_gradients:
                packet = self._private(self.grad_up[c], c, self._batches[c]).encode(a.grad)
            else:
                packet = self.grad_up[c].encode(a.grad)
        transport.send(name, SERVER, "gradients", step, packet)
        return loss.detach(), packet.numel()

    def _u_server_finish(self, step, group, received, h_all, sizes, out, members=None):
        """The server's backward from the clients' gradients: (the futures of each client's
        gradient at the cut, the clients that sent theirs). In a federation (`members`) a client
        that fails is dropped and its rows get no gradient: the server's update is that of the
        clients that finished the step (none: it does not update)."""
        self._tail_up_bytes = {}
        with self.rng(SERVER), self._server_timer:
            grads, finished = [], []
            for c, o, r in zip(group, out.split(sizes), received):
                g = FAILED
                if members is None or c in members.training():
                    g = self._attempt(members, c, step, lambda c=c: self._recv_tail_gradient(c, step, out.dtype))
                if g is FAILED:
                    g = torch.zeros_like(o[:, :r.shape[1]])
                else:
                    finished.append(c)
                grads.append(g)
            if not finished:
                return {}, []
            k = len(finished)
            out.backward(concat_right_padded(grads) / k)
            self.server_side.step()
            return {c: self.encoder.submit(self.grad_down[c], g[:, :r.shape[1]])
                    for c, g, r in zip(group, (h_all.grad * k).split(sizes), received) if c in finished}, finished

    def _recv_tail_gradient(self, c: int, step: int, dtype):
        packet = self.transport.recv(SERVER, client_name(c), "gradients", step)
        self._tail_up_bytes[c] = packet.numel()
        return self._decode_from(c, step, "gradients", lambda: self.grad_up[c].decode(packet, dtype, self.device))

    # -- evaluation and export ------------------------------------------------------------------------
    def _global_client_state(self) -> Dict[str, torch.Tensor]:
        states = [adapter_state(p) for p in self._unique_parts]
        if len(states) == 1:
            return states[0]
        return fedavg(states, self.setup.client_weights)

    def logits_fn(self):
        eval_parts = clone_sharing_frozen(self.parts[0])
        load_adapter_state(eval_parts, self._global_client_state())
        eval_parts.eval()
        server = self.server

        def fn(input_ids, attention_mask):
            h = eval_parts["head"](input_ids, attention_mask)
            out = server(h, attention_mask)
            return eval_parts["tail"](out, attention_mask) if "tail" in eval_parts else out

        return fn

    def export_state(self):
        global_client = self._global_client_state()
        plans, state = [], {}
        for part_name, segment in self.parts[0].items():
            prefix = f"{part_name}."
            plans.append(lora_plan(segment))
            state.update(whole_model_names(segment, {k[len(prefix):]: v for k, v in global_client.items()
                                                     if k.startswith(prefix)}))
        plans.append(lora_plan(self.server))
        state.update(whole_model_names(self.server, adapter_state(self.server)))
        return plans, state

    # -- state ------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> None:
        for p in self._unique_parts:
            p.train(mode)
        self.server.train(mode)

    def state_dict(self) -> dict:
        streams = {name: [s.state_dict() for s in getattr(self, name)]
                   for name in ("act_up", "grad_down", "act_down", "grad_up")}
        state = {
            "clients": [adapter_state(p) for p in self._unique_parts],
            "client_sides": [s.state_dict() for s in self.client_sides],
            "streams": streams,
            "party_rng": self.rng.state_dict(),
        }
        if self.privacy is not None:
            state["privacy"] = {**self.privacy.state_dict(), "adapter_base": self._adapter_base}
        state.update(self._rounds_state())
        if not is_client_process(self.role):  # a client process holds no server weights (trainer.build)
            state["server"] = adapter_state(self.server)
            state["server_side"] = self.server_side.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for p, s in zip(self._unique_parts, state["clients"]):
            load_adapter_state(p, s)
        for side, s in zip(self.client_sides, state["client_sides"]):
            side.load_state_dict(s)
        if not is_client_process(self.role):
            load_adapter_state(self.server, state["server"])
            self.server_side.load_state_dict(state["server_side"])
        self.rng.load_state_dict(state["party_rng"])
        if self.privacy is not None and "privacy" in state:
            self.privacy.load_state_dict(state["privacy"])
            self._adapter_base = state["privacy"]["adapter_base"]
        for name, states in state["streams"].items():
            for stream, s in zip(getattr(self, name), states):
                stream.load_state_dict(s)
        if "fresh" in state:
            self._fresh = set(int(c) for c in state["fresh"])


class SplitLoRA(_SplitBase):
    """SplitLoRA: every client runs to the cut in parallel, the server trains on all of them as
    one batch, and the client adapters are averaged every `aggregate_every` steps."""

    name = "splitlora"
    aggregates = True
    exact_export = True

    def __init__(self, setup) -> None:
        n = len(setup.loaders)
        parts = [client_parts(clone_sharing_frozen(setup.client),
                              clone_sharing_frozen(setup.tail) if setup.tail is not None else None)
                 for _ in range(n)]
        super().__init__(setup, parts)

    def train_step(self, step: int) -> StepResult:
        if self.role is None:
            if not self._sampling:
                return self._exchange(step, list(range(self.num_clients)))
            sim = self._local_round_start(step) if self._new_round(step) else 0.0
            result = self._exchange(step, self.round_clients)
            result.sim_time_s = result.sim_time_s + sim
            return result
        if self.role == SERVER:
            return self._server_step_u_shape(step) if self.u_shape else self._server_step(step)
        c = int(self.role[len("client"):])
        return self._client_step_u_shape(c, step) if self.u_shape else self._client_step(c, step)

    # -- one party per process (transport=dist, a federation) ------------------------------------------
    # A federation's server has a membership (splitlora.strategies.rounds): a client that fails is
    # dropped and the step goes on with the others; without one, any failure stops the run.
    def _server_step(self, step: int) -> StepResult:
        members = self._members()
        group, start_sim = self._step_group(step, members)
        self._begin_step(group)
        received, metas, group = self._receive_from(step, group, members)
        if not group:
            return self._skipped_step(step, members, "every client of the step dropped out", start_sim)
        losses, sizes, grads = self._server_compute(step, group, received, metas)
        grad_bytes = self._send_gradients(step, grads, members)
        self.transport.flush()
        return StepResult(loss=float(torch.stack(losses).mean()), server_compute_s=self._server_timer.elapsed,
                          sim_time_s=self._simulated_step(group, sizes[0], sum(sizes), grad_bytes) + start_sim,
                          extra=self._member_events(members))

    def _send_gradients(self, step: int, grads: Dict[int, object], members) -> Dict[int, int]:
        """Each client's gradient at the cut (a tensor, or the encoder's future), sent down: the bytes
        sent to each client that got its own (one that fails is dropped, in a federation)."""
        sent_bytes = {}
        for c, grad in grads.items():
            sent = self._attempt(members, c, step, lambda c=c, grad=grad: self._send_down(c, step, grad))
            if sent is not FAILED:
                sent_bytes[c] = sent
        return sent_bytes

    def _client_step(self, c: int, step: int) -> StepResult:
        if not self._client_round(c, step):
            return StepResult(loss=float("nan"))
        self._begin_step([c])
        self._send_up(c, step, *self._client_forward(c, step))
        self._client_finish(c, step, self.transport.recv(client_name(c), SERVER, "gradients", step))
        self.transport.flush()
        return StepResult(loss=float("nan"), client_compute_s=self._client_timers[c].elapsed)

    def _client_round(self, c: int, step: int) -> bool:
        """Whether client c trains in `step`; at a federation round's start the server says so, and
        sends the global adapters first when it sat out the last average or has just joined."""
        message = self._client_round_start(c, step)
        if message.get("adapters"):
            load_adapter_state(self.parts[c], self._recv_adapters(client_name(c), SERVER, step))
            if self._adapter_base is not None:
                self._adapter_base = adapter_state(self.parts[c])
        return self._trains_this_round

    # -- the U-shape, one party per process --------------------------------------------------------------
    def _server_step_u_shape(self, step: int) -> StepResult:
        tm = self.time_model
        members = self._members()
        group, start_sim = self._step_group(step, members)
        self._begin_step(group)
        received, metas, group = self._receive_from(step, group, members)
        if not group:
            return self._skipped_step(step, members, "every client of the step dropped out", start_sim)
        h_all, sizes, out, down = self._u_server_down(step, group, received, metas, members)
        futures, finished = self._u_server_finish(step, group, received, h_all, sizes, out, members)
        if not finished:
            return self._skipped_step(step, members, "every client of the step dropped out before sending its "
                                                     "gradients", start_sim)
        grad_bytes = self._send_gradients(step, futures, members)
        # The loss is computed where the labels are, on each client, which reports its value (a
        # figure for the metrics, outside the protocol's packets and their byte counts).
        losses = []
        for c in finished:
            if members is not None and c not in members.training():
                continue
            loss = self._attempt(members, c, step, lambda c=c: self.transport.recv_report(client_name(c), "loss", step))
            if loss is not FAILED:
                losses.append(torch.tensor(loss, dtype=torch.float32))
        length = dict(zip(group, self._step_lengths))
        tail_sim = {c: tm.transfer(down.get(c, 0)) + tm.client_compute(train_flops(self._flops("tail", sizes[0],
                                                                                               length[c])))
                    + tm.transfer(self._tail_up_bytes.get(c, 0)) for c in group}
        self.transport.flush()
        sim = self._simulated_step(group, sizes[0], sum(sizes), grad_bytes, tail_sim) + start_sim
        if not losses:  # the server trained on the step, but no client lived to report its loss
            return StepResult(loss=math.nan, server_compute_s=self._server_timer.elapsed, sim_time_s=sim,
                              skipped=f"no client reported its loss of step {step}",
                              extra=self._member_events(members))
        return StepResult(loss=float(torch.stack(losses).mean()), server_compute_s=self._server_timer.elapsed,
                          sim_time_s=sim, extra=self._member_events(members))

    def _client_step_u_shape(self, c: int, step: int) -> StepResult:
        if not self._client_round(c, step):
            return StepResult(loss=float("nan"))
        name = client_name(c)
        self._begin_step([c])
        self._send_up(c, step, *self._client_forward(c, step))
        loss, _ = self._u_client_tail(c, step)
        self.transport.report(name, "loss", step, float(loss))
        self._client_finish(c, step, self.transport.recv(name, SERVER, "gradients", step))
        self.transport.flush()
        return StepResult(loss=float("nan"), client_compute_s=self._client_timers[c].elapsed)

    # -- a round's end --------------------------------------------------------------------------------
    def _outgoing_adapters(self, c: int) -> Dict[str, torch.Tensor]:
        """Client c's adapters as sent to FedAvg: with adapter DP, the last global adapters plus its
        clipped, noised update (splitlora.privacy.adapters)."""
        state = adapter_state(self.parts[c])
        p = self.privacy
        if p is None or not p.adapters:
            return state
        return privatize_update(state, self._adapter_base, p.adapter_clip, p.adapter_noise_multiplier,
                                p.adapter_generators[c])

    def _count_adapter_releases(self, clients: Sequence[int]) -> None:
        """The clients that sent their adapters this round (a sampled-out or dropped one released none)."""
        if self.privacy is not None and self.privacy.adapters:
            for c in clients:
                self.privacy.record_adapters(c)

    def end_round(self, step: int) -> float:
        if self.role is None:
            clients = self.round_clients if self._sampling else list(range(self.num_clients))
            states = [self._outgoing_adapters(c) for c in clients]
            averaged, sim = self._fedavg_round(step, states, clients)
            self._count_adapter_releases(clients)
            if self._sampling:
                # Every copy holds the global adapters from here on; the clients left out of this
                # round are sent them (and the bytes counted) when they are next sampled.
                for p in self.parts:
                    load_adapter_state(p, averaged[0])
                self._fresh = set(clients)
            else:
                for p, s in zip(self.parts, averaged):
                    load_adapter_state(p, s)
            if self._adapter_base is not None:
                self._adapter_base = adapter_state(self.parts[0])
            return sim
        if self.role == SERVER:
            return self._server_end_round(step)
        c = int(self.role[len("client"):])
        if not self._trains_this_round:
            return 0.0  # left out of this round: nothing to send (the server sends the average later)
        self._send_adapters(client_name(c), SERVER, step, self._outgoing_adapters(c))
        load_adapter_state(self.parts[c], self._recv_adapters(client_name(c), SERVER, step))
        if self._adapter_base is not None:
            self._adapter_base = adapter_state(self.parts[c])
        self.transport.flush()
        return 0.0
