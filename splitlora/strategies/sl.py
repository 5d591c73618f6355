"""Vanilla split learning (strategy "sl"): one client-side model handed from client to client;
each client in turn trains one batch with the server (`_SplitBase._exchange` on a group of one),
then passes its adapters on through the server. No aggregation."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..adapters import adapter_state, clone_sharing_frozen, load_adapter_state
from ..transport import SERVER, client_name
from ..wire import unpack_tensors
from .base import StepResult
from .rounds import FAILED
from .splitfed import _SplitBase, client_parts


class VanillaSL(_SplitBase):
    """Vanilla split learning: one client-side model handed from client to client; each client in
    turn trains one batch with the server, then passes the adapters on (through the server).

    The hand-over, the same in one process and across processes: before a client's turn the
    server sends it the newest adapters unless it trained the last turn itself (or nobody has
    trained yet: every client starts from the same adapters); after its turn it sends its adapters
    up (with two clients or more). In a federation a round is one step: at each step's start the
    server admits the clients that (re)joined and tells each in the run whether the newest
    adapters come before its turn; a client that fails in its turn is dropped and the next one
    receives the newest adapters the server holds."""

    name = "sl"
    exact_export = True

    def _server_updates_per_step(self) -> int:
        return self.num_clients  # one exchange, and one server update, per client per step

    def _steps_per_round(self) -> int:
        return 1

    def __init__(self, setup) -> None:
        shared = client_parts(clone_sharing_frozen(setup.client),
                              clone_sharing_frozen(setup.tail) if setup.tail is not None else None)
        super().__init__(setup, [shared] * len(setup.loaders))
        # The client whose turn produced the server's newest adapters (None: nobody has trained).
        self._holder: Optional[int] = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "holder": self._holder}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        # A checkpoint from before the hand-over was recorded is past step 0: the last client's turn
        # produced the newest adapters.
        self._holder = state.get("holder", self.num_clients - 1)

    def _needs_adapters(self, c: int) -> bool:
        """Whether client c lacks the newest adapters (those of the last turn; a client that joined
        since it last trained has lost its own)."""
        return self.num_clients > 1 and self._holder is not None and (self._holder != c or c not in self._fresh)

    def train_step(self, step: int) -> StepResult:
        if self.role == SERVER:
            return self._server_step(step)
        if self.role is not None:
            return self._client_step(int(self.role[len("client"):]), step)
        total = StepResult(loss=0.0)
        losses = []
        n = self.num_clients
        tm = self.time_model
        for c in range(n):
            name = client_name(c)
            if self._needs_adapters(c):
                # The clients share one module here: what crosses is counted as it would in a federation.
                b_down = self._send_adapters(SERVER, name, step, adapter_state(self.parts[0]))
                load_adapter_state(self.parts[c], self._recv_adapters(name, SERVER, step))
                total.sim_time_s += tm.transfer(b_down)
            r = self._exchange(step, [c])
            losses.append(r.loss)
            total.client_compute_s += r.client_compute_s
            total.server_compute_s += r.server_compute_s
            total.sim_time_s += r.sim_time_s
            if n > 1:
                b_up = self._send_adapters(name, SERVER, step, adapter_state(self.parts[c]))
                load_adapter_state(self.parts[0], self._recv_adapters(SERVER, name, step))
                total.sim_time_s += tm.transfer(b_up)
            self._holder = c
        total.loss = sum(losses) / len(losses)
        return total

    # -- one party per process (a federation): the same turns, in the same order ----------------------
    def _server_step(self, step: int) -> StepResult:
        members = self._members()
        if members is None:
            order = list(range(self.num_clients))
            needs = {c: self._needs_adapters(c) for c in order}
        else:
            order, needs = self._server_turns_start(step, members)
        total = StepResult(loss=0.0)
        losses = []
        for c in order:
            if members is not None and c not in members.training():
                continue
            turn = self._attempt(members, c, step, lambda c=c: self._server_turn(c, step, needs[c]))
            if turn is FAILED:
                continue
            loss, compute_s, sim = turn
            losses.append(loss)
            total.server_compute_s += compute_s
            total.sim_time_s += sim
            self._holder = c
            self._fresh.add(c)
        self.transport.flush()
        total.extra = self._member_events(members)
        if not losses:
            total.loss, total.skipped = math.nan, f"every client of step {step} dropped out"
            return total
        total.loss = sum(losses) / len(losses)
        return total

    def _server_turns_start(self, step: int, members) -> tuple:
        """A federation step's start: admits the clients that (re)joined, and tells each client in
        the run whether the newest adapters come before its turn. (the turn order, {client: needs})."""
        self._admit(step, members)
        order = members.training()
        # Only the first turn can find the newest adapters already there: a later client's
        # predecessor in this step trained them (or, when every one before it dropped out, they
        # are sent anyway: the flag is fixed at the step's start).
        needs = {c: self.num_clients > 1 and (i > 0 or self._needs_adapters(c)) for i, c in enumerate(order)}
        self.round_clients = order
        for c in order:
            self._attempt(members, c, step, lambda c=c: self.transport.send_control(client_name(c), {
                "type": "round", "round": step, "step": step, "train": True, "adapters": needs[c]}))
        return [c for c in order if c in members.training()], needs

    def _server_turn(self, c: int, step: int, needs_adapters: bool) -> tuple:
        """Client c's turn on the server: (loss, server seconds, simulated seconds)."""
        tm = self.time_model
        sim = 0.0
        if needs_adapters:
            sim += tm.transfer(self._send_adapters(SERVER, client_name(c), step, adapter_state(self.parts[0])))
        self._begin_step([c])
        received, metas = self._server_receive(step, [c])
        client_losses, sizes, grads = self._server_compute(step, [c], received, metas)
        grad_bytes = {c: self._send_down(c, step, grads[c])}
        sim += self._simulated_step([c], sizes[0], sum(sizes), grad_bytes)
        if self.num_clients > 1:
            # The server's copy keeps the newest adapters: for the next turn, evaluation and export.
            packet = self.transport.recv(SERVER, client_name(c), "adapters", step)
            load_adapter_state(self.parts[0], self._decode_from(c, step, "adapters",
                                                                lambda: unpack_tensors(packet, self.device)))
            sim += tm.transfer(packet.numel())
        return float(torch.stack(client_losses).mean()), self._server_timer.elapsed, sim

    def _client_step(self, c: int, step: int) -> StepResult:
        name = client_name(c)
        # Across processes vanilla SL runs as a federation only (transport=dist runs splitlora):
        # the step's message says whether the newest adapters come before this client's turn.
        if self._client_round_start(c, step).get("adapters"):
            load_adapter_state(self.parts[c], self._recv_adapters(name, SERVER, step))
        self._begin_step([c])
        self._send_up(c, step, *self._client_forward(c, step))
        self._client_finish(c, step, self.transport.recv(name, SERVER, "gradients", step))
        if self.num_clients > 1:
            self._send_adapters(name, SERVER, step, adapter_state(self.parts[c]))
        self.transport.flush()
        return StepResult(loss=float("nan"), client_compute_s=self._client_timers[c].elapsed)
