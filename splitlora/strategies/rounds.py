"""Rounds of the split strategies: which clients train in a round, and (on a federation's server)
what happens when one fails or comes back.

A round is `train.aggregate_every` steps (SplitLoRA) or one step (vanilla SL, which has no
average). At a round's start the server takes in the clients that (re)joined (`_admit`), samples
the ones that train (federation.clients_per_round, `sample_clients`: the same draw in one process
and in a federation) and tells every client in the run whether it trains (a control message,
outside the byte counts).

In a federation (`splitlora server`, whose transport carries a `Membership`) every exchange with
a client goes through `_attempt`: a client that disconnects, misses federation.step_timeout_s or
sends a packet that does not decode is dropped from the run and the others go on. A step whose
clients have all dropped is skipped (`_skipped_step`: no loss, the server's weights unchanged); a
round nobody finished keeps the global adapters. The run fails only when fewer than
federation.min_clients remain for federation.wait_s (`_admit`). Without a membership (one
process, or transport=dist) any failure stops the run, as before.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..adapters import adapter_state, load_adapter_state
from ..aggregate import fedavg
from ..federation.membership import sample_clients
from ..transport import SERVER, TransportError, client_name
from .base import StepResult

# What `_attempt` returns for a client that failed (and was dropped).
FAILED = object()


class RoundsMixin:
    """The round and membership logic shared by SplitLoRA (plain and U-shaped) and vanilla SL.
    Needs the strategy's `transport`, `cfg`, `setup`, `parts`, `time_model` and its adapter
    exchange (`_send_adapters` / `_recv_adapters`)."""

    round_clients: Optional[List[int]] = None

    # -- where we are -------------------------------------------------------------------------------
    def _members(self):
        """The federation server's Membership, None elsewhere (one process, transport=dist, a client)."""
        return getattr(self.transport, "membership", None)

    def _steps_per_round(self) -> int:
        return self.cfg.train.aggregate_every

    def _new_round(self, step: int) -> bool:
        return step % self._steps_per_round() == 0 or self.round_clients is None

    def _round_index(self, step: int) -> int:
        return step // self._steps_per_round()

    def _sample(self, step: int, available: Sequence[int]) -> List[int]:
        self.round_clients = sample_clients(available, self.cfg.federation.clients_per_round, self.cfg.seed,
                                            self._round_index(step))
        return self.round_clients

    # -- one exchange with one client, in a federation --------------------------------------------
    def _attempt(self, members, c: int, step: int, exchange: Callable[[], object]):
        """exchange()'s result, or FAILED when client c failed in it: a federation drops c from the
        run (its unfinished step is discarded) and goes on; without a membership the failure stops
        the run."""
        try:
            return exchange()
        except TransportError as err:
            if members is None:
                raise
            members.drop(c, step, str(err))
            return FAILED

    def _receive_from(self, step: int, group: Sequence[int], members) -> Tuple[list, list, List[int]]:
        """Each client's activations and metadata of `step`: (received, metas, the clients they came
        from). A client that fails is dropped and left out of the step."""
        if members is None:
            received, metas = self._server_receive(step, group)
            return received, metas, list(group)
        received, metas, kept = [], [], []
        for c in group:
            got = self._attempt(members, c, step, lambda c=c: self._server_receive(step, [c]))
            if got is FAILED:
                continue
            (r,), (m,) = got
            received.append(r)
            metas.append(m)
            kept.append(c)
        return received, metas, kept

    def _member_events(self, members) -> dict:
        """The drops and joins since the last step, for its metrics record."""
        if members is None:
            return {}
        extra = {"dropped": members.events(), "joined": members.joins()}
        return {k: v for k, v in extra.items() if v}

    def _skipped_step(self, step: int, members, why: str, sim_time_s: float = 0.0) -> StepResult:
        """A step that trained nothing: every client of it failed. The server's weights are unchanged."""
        return StepResult(loss=math.nan, sim_time_s=sim_time_s, skipped=f"{why} at step {step}",
                          extra=self._member_events(members))

    # -- a round's start ----------------------------------------------------------------------------
    def _step_group(self, step: int, members) -> Tuple[List[int], float]:
        """The clients that train in `step` (a new round starts as federation.clients_per_round
        samples) and the simulated seconds of the round's start (its adapter downloads)."""
        if members is None:
            return list(range(self.num_clients)), 0.0
        start_sim = self._server_round_start(step, members) if self._new_round(step) else 0.0
        return [c for c in self.round_clients if c in members.training()], start_sim

    def _server_round_start(self, step: int, members) -> float:
        """A federation round begins: the server samples among the clients in the run, tells each
        whether it trains this round, and sends the global adapters to the sampled clients that
        lack them. The non-sampled clients wait for the next round's message. Returns the
        simulated seconds of that download."""
        self._admit(step, members)
        available = members.training()
        sample = self._sample(step, available)
        for c in available:
            self._attempt(members, c, step, lambda c=c: self.transport.send_control(client_name(c), {
                "type": "round", "round": self._round_index(step), "step": step, "train": c in sample,
                "adapters": c in sample and c not in self._fresh}))
        down = 0
        for c in sample:
            if c in self._fresh or c not in members.training():
                continue
            # The server's copies of the client parts hold the global adapters (end_round).
            sent = self._attempt(members, c, step, lambda c=c: self._send_adapters(
                SERVER, client_name(c), step, adapter_state(self.parts[0])))
            if sent is not FAILED:
                down = max(down, sent)
                self._fresh.add(c)
        return self.time_model.transfer(down) if down else 0.0

    def _admit(self, step: int, members) -> None:
        """Takes in the clients that (re)joined since the last round (their FedAvg weight is the
        sample count they report; they get the global adapters when sampled). With fewer than
        federation.min_clients in the run, waits up to federation.wait_s for more to join."""
        deadline = time.monotonic() + (members.wait_s or 0.0)
        while True:
            if members.admit is not None:
                for c, samples in members.admit(step).items():
                    self.setup.client_weights[c] = float(samples)
                    self._fresh.discard(c)
            have = members.training()
            if len(have) >= members.min_clients:
                return
            if time.monotonic() >= deadline:
                raise TransportError(f"only {len(have)} client(s) remain ("
                                     f"{', '.join(members.names[c] for c in have) or 'none'}) at step {step}, and "
                                     f"none came back within federation.wait_s={members.wait_s or 0:g} s; the run "
                                     f"needs federation.min_clients={members.min_clients}")
            time.sleep(0.2)

    def _local_round_start(self, step: int) -> float:
        """In-process sampling: draws the round's clients and sends the global adapters to those
        that lack them (counted as a federation would send them); the simulated seconds."""
        sample = self._sample(step, range(self.num_clients))
        down = 0
        for c in sample:
            if c not in self._fresh:
                # In one process every client's copy already holds the global adapters (end_round
                # loads them into all); this is the transfer a real client would need.
                down = max(down, self._send_adapters(SERVER, client_name(c), step, adapter_state(self.parts[c])))
                load_adapter_state(self.parts[c], self._recv_adapters(client_name(c), SERVER, step))
                self._fresh.add(c)
        return self.time_model.transfer(down) if down else 0.0

    def _client_round_start(self, c: int, step: int) -> dict:
        """A federation client at a round's start: the server says whether it trains this round
        ("train") and whether adapters follow ("adapters"). A client left out may wait a whole
        round for the next message. Elsewhere (one process, transport=dist) every client trains."""
        if not (hasattr(self.transport, "next_round") and self._new_round(step)):
            return {"train": self._trains_this_round}
        wait = (self._steps_per_round() + 1) * self.transport.timeout_s
        message = self.transport.next_round(step, wait)
        self.round_clients = [c] if message["train"] else []
        self._trains_this_round = bool(message["train"])
        return message

    # -- a SplitLoRA round's end on the federation server -------------------------------------------
    def _server_end_round(self, step: int) -> float:
        """The server's FedAvg over the round's clients that sent their adapters (weighted by their
        samples, renormalised); a client that fails here is dropped. A round that nobody finished
        keeps the global adapters. Returns the simulated seconds of the exchange."""
        members = self._members()
        tm = self.time_model
        # The round's clients still in the run (all of them without a membership).
        group = (list(range(self.num_clients)) if members is None
                 else [c for c in (self.round_clients if self.round_clients is not None else members.training())
                       if c in members.training()])
        received, finished = [], []
        for c in group:
            state = self._attempt(members, c, step, lambda c=c: self._decode_from(
                c, step, "adapters", lambda: self._recv_adapters(SERVER, client_name(c), step)))
            if state is not FAILED:
                received.append(state)
                finished.append(c)
        if not finished:
            self._end_federation(step, members)
            return 0.0  # every client of the round dropped: the global adapters stay as they were
        up = max(tm.transfer(self.transport.received.round_total(self.transport.round_index, client=client_name(c),
                                                                 kind="adapters")) for c in finished)
        average = fedavg(received, [self.setup.client_weights[c] for c in finished])
        self._count_adapter_releases(finished)
        down = 0
        for c in finished:
            sent = self._attempt(members, c, step, lambda c=c: self._send_adapters(SERVER, client_name(c), step,
                                                                                    average))
            if sent is not FAILED:
                down = max(down, sent)
        # The server's copies of the client parts hold the global adapters: for evaluation and export.
        for p in self.parts:
            load_adapter_state(p, average)
        if members is not None:
            self._fresh = set(c for c in finished if c in members.training())
        self._end_federation(step, members)
        self.transport.flush()
        return up + tm.transfer(down)

    def _end_federation(self, step: int, members) -> None:
        """After the last round no client can join any more (the server program refuses them)."""
        if members is not None and step + 1 >= self.cfg.train.steps and members.finish is not None:
            members.finish()

    def _rounds_state(self) -> Dict[str, list]:
        """Who holds the global adapters, for the checkpoint (sampling or a federation's membership)."""
        if self._sampling or self._members() is not None:
            return {"fresh": sorted(self._fresh)}
        return {}
