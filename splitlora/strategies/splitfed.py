"""Split learning across the cut: SplitLoRA (clients in parallel, batched on the server, FedAvg
of client adapters) and vanilla split learning (clients one after another, no aggregation).

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

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ..adapters import (adapter_state, clone_sharing_frozen, load_adapter_state, lora_plan,
                        whole_model_names)
from ..aggregate import fedavg
from ..timemodel import train_flops
from ..transport import SERVER, client_name
from ..wire import EncodeWorker, pack_tensors, unpack_tensors
from .base import Side, StepResult, Strategy, Timer, causal_lm_loss


def client_parts(head: nn.Module, tail: Optional[nn.Module]) -> nn.ModuleDict:
    """A client's modules as one container, so its adapters are one state dict."""
    parts = nn.ModuleDict({"head": head})
    if tail is not None:
        parts["tail"] = tail
    return parts


class _SplitBase(Strategy):
    def __init__(self, setup, parts: List[nn.ModuleDict]) -> None:
        super().__init__(setup)
        self.u_shape = bool(self.cfg.train.u_shape)
        self.parts = parts
        self.server = clone_sharing_frozen(setup.server)
        unique_parts = list({id(p): p for p in parts}.values())
        # One optimizer per client, even where clients share modules (vanilla SL): what a real
        # client keeps locally.
        self.client_sides = [Side([parts[c]], self.cfg.train) for c in range(self.num_clients)]
        self.server_side = Side([self.server], self.cfg.train)
        self._unique_parts = unique_parts
        n = self.num_clients
        self.act_up = [self._stream(self.codec_settings, 4 * c) for c in range(n)]
        self.grad_down = [self._stream(self.grad_settings, 4 * c + 1) for c in range(n)]
        self.act_down = [self._stream(self.codec_settings, 4 * c + 2) for c in range(n)]
        self.grad_up = [self._stream(self.grad_settings, 4 * c + 3) for c in range(n)]
        self._server_dtype = next(self.server.parameters()).dtype
        self.encoder = EncodeWorker(self.device, enabled=bool(self.cfg.codec.overlap))
        self._flops_cache: Dict[tuple, float] = {}

    # -- flops ------------------------------------------------------------------------------------
    def _flops(self, what: str, batch: int) -> float:
        key = (what, batch)
        if key not in self._flops_cache:
            s = self.setup
            cut = self.cfg.model.cut_layer
            end = self.cfg.model.server_end if self.u_shape else s.num_layers
            if what == "head":
                f = self._fwd_flops(s.client, batch, cut)
            elif what == "tail":
                f = self._fwd_flops(s.tail, batch, s.num_layers - end)
            else:
                f = self._fwd_flops(s.server, batch, end - cut)
            self._flops_cache[key] = f
        return self._flops_cache[key]

    # -- one exchange across the cut for a group of clients ------------------------------------------
    def _exchange(self, step: int, group: Sequence[int]) -> StepResult:
        tm = self.time_model
        transport = self.transport
        n_group = len(group)
        client_timers = {c: Timer(self.device) for c in group}
        server_timer = Timer(self.device)
        up_bytes = {c: 0 for c in group}
        down_bytes = {c: 0 for c in group}
        hidden, batches, first_upload = {}, {}, {}

        pending = {}
        for c in group:
            with client_timers[c]:
                self.client_sides[c].zero_grad()
                batch = self._batch(c)
                h = self.parts[c]["head"](batch["input_ids"], batch["attention_mask"])
                # Compression runs in the background while the next client computes.
                future = self.encoder.submit(self.act_up[c], h.detach())
                meta = {"attention_mask": batch["attention_mask"]}
                if not self.u_shape:
                    meta["labels"] = batch["labels"]
                pending[c] = future, pack_tensors(meta)
            hidden[c], batches[c] = h, batch
        for c in group:
            name = client_name(c)
            future, meta_packet = pending[c]
            packet = future.result()
            transport.send(name, SERVER, "activations", step, packet)
            transport.send(name, SERVER, "labels", step, meta_packet)
            up_bytes[c] += packet.numel() + meta_packet.numel()
            first_upload[c] = up_bytes[c]

        with server_timer:
            self.server_side.zero_grad()
            received, metas = [], []
            for c in group:
                name = client_name(c)
                received.append(self.act_up[c].decode(transport.recv(SERVER, name, "activations", step),
                                                      self._server_dtype))
                metas.append(unpack_tensors(transport.recv(SERVER, name, "labels", step), self.device))
            sizes = [r.shape[0] for r in received]
            h_all = torch.cat(received).requires_grad_(True)
            mask = torch.cat([m["attention_mask"] for m in metas])
            out = self.server(h_all, mask)
            if not self.u_shape:
                losses = [causal_lm_loss(lg, m["labels"]) for lg, m in zip(out.split(sizes), metas)]
                torch.stack(losses).mean().backward()
            else:
                for c, o in zip(group, out.split(sizes)):
                    packet = self.act_down[c].encode(o.detach())
                    transport.send(SERVER, client_name(c), "activations", step, packet)
                    down_bytes[c] += packet.numel()

        tail_sim = {}
        if self.u_shape:
            losses = []
            for c in group:
                name = client_name(c)
                with client_timers[c]:
                    a = self.act_down[c].decode(transport.recv(name, SERVER, "activations", step),
                                                hidden[c].dtype).requires_grad_(True)
                    logits = self.parts[c]["tail"](a, batches[c]["attention_mask"])
                    loss = causal_lm_loss(logits, batches[c]["labels"])
                    loss.backward()
                    packet = self.grad_up[c].encode(a.grad)
                transport.send(name, SERVER, "gradients", step, packet)
                up_bytes[c] += packet.numel()
                losses.append(loss.detach())
                tail_sim[c] = (tm.transfer(down_bytes[c]) + tm.client_compute(train_flops(self._flops("tail", sizes[0])))
                               + tm.transfer(packet.numel()))
            with server_timer:
                grads = [self.grad_up[c].decode(transport.recv(SERVER, client_name(c), "gradients", step),
                                                out.dtype) for c in group]
                out.backward(torch.cat(grads) / n_group)

        grad_bytes = {}
        with server_timer:
            self.server_side.step()
            grads = {c: self.encoder.submit(self.grad_down[c], g)
                     for c, g in zip(group, (h_all.grad * n_group).split(sizes))}

        for c in group:
            # Client c's backward overlaps the encoding of the next client's gradient.
            packet = grads[c].result()
            transport.send(SERVER, client_name(c), "gradients", step, packet)
            grad_bytes[c] = packet.numel()
            down_bytes[c] += packet.numel()
            with client_timers[c]:
                g = self.grad_down[c].decode(transport.recv(client_name(c), SERVER, "gradients", step), hidden[c].dtype)
                hidden[c].backward(g)
                self.client_sides[c].step()

        # Time model: clients run in parallel up to the cut, the server runs the group as one
        # batch, then clients finish in parallel. Input-gradient backward ~ one forward.
        batch = sizes[0]
        head_fwd = tm.client_compute(self._flops("head", batch))
        server_fwd = tm.server_compute(self._flops("server", sum(sizes)))
        phase_up = max(head_fwd + tm.transfer(first_upload[c]) for c in group)
        if self.u_shape:
            # Server forward, the clients' tails in parallel (download, train, upload), server backward.
            middle = server_fwd + max(tail_sim.values()) + server_fwd
        else:
            middle = tm.server_compute(train_flops(self._flops("server", sum(sizes))))
        phase_down = max(tm.transfer(grad_bytes[c]) + head_fwd for c in group)
        losses_value = float(torch.stack([l.detach() for l in losses]).mean())
        return StepResult(
            loss=losses_value,
            client_compute_s=sum(t.elapsed for t in client_timers.values()),
            server_compute_s=server_timer.elapsed,
            sim_time_s=phase_up + middle + phase_down,
        )

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
        return {
            "clients": [adapter_state(p) for p in self._unique_parts],
            "client_sides": [s.state_dict() for s in self.client_sides],
            "server": adapter_state(self.server),
            "server_side": self.server_side.state_dict(),
            "streams": streams,
        }

    def load_state_dict(self, state: dict) -> None:
        for p, s in zip(self._unique_parts, state["clients"]):
            load_adapter_state(p, s)
        for side, s in zip(self.client_sides, state["client_sides"]):
            side.load_state_dict(s)
        load_adapter_state(self.server, state["server"])
        self.server_side.load_state_dict(state["server_side"])
        for name, states in state["streams"].items():
            for stream, s in zip(getattr(self, name), states):
                stream.load_state_dict(s)


class SplitLoRA(_SplitBase):
    """SplitLoRA: every client runs to the cut in parallel, the server trains on all of them as
    one batch, and the client adapters are averaged every `aggregate_every` steps."""

    name = "splitlora"
    aggregates = True

    def __init__(self, setup) -> None:
        n = len(setup.loaders)
        parts = [client_parts(clone_sharing_frozen(setup.client),
                              clone_sharing_frozen(setup.tail) if setup.tail is not None else None)
                 for _ in range(n)]
        super().__init__(setup, parts)

    def train_step(self, step: int) -> StepResult:
        return self._exchange(step, list(range(self.num_clients)))

    def end_round(self, step: int) -> float:
        states = [adapter_state(p) for p in self.parts]
        averaged, sim = self._fedavg_round(step, states)
        for p, s in zip(self.parts, averaged):
            load_adapter_state(p, s)
        return sim


class VanillaSL(_SplitBase):
    """Vanilla split learning: one client-side model handed from client to client; each client in
    turn trains one batch with the server, then passes the adapters on (through the server)."""

    name = "sl"

    def __init__(self, setup) -> None:
        shared = client_parts(clone_sharing_frozen(setup.client),
                              clone_sharing_frozen(setup.tail) if setup.tail is not None else None)
        super().__init__(setup, [shared] * len(setup.loaders))

    def train_step(self, step: int) -> StepResult:
        total = StepResult(loss=0.0)
        losses = []
        n = self.num_clients
        for c in range(n):
            r = self._exchange(step, [c])
            losses.append(r.loss)
            total.client_compute_s += r.client_compute_s
            total.server_compute_s += r.server_compute_s
            total.sim_time_s += r.sim_time_s
            if n > 1:
                # Hand the client-side adapters to the next client, relayed by the server.
                nxt = (c + 1) % n
                state = adapter_state(self.parts[c])
                b_up = self._send_adapters(client_name(c), SERVER, step, state)
                relayed = self._recv_adapters(SERVER, client_name(c), step)
                b_down = self._send_adapters(SERVER, client_name(nxt), step, relayed)
                load_adapter_state(self.parts[nxt], self._recv_adapters(client_name(nxt), SERVER, step))
                total.sim_time_s += self.time_model.transfer(b_up) + self.time_model.transfer(b_down)
        total.loss = sum(losses) / len(losses)
        return total
