"""Federated LoRA: every client trains the whole model with LoRA on its own data; the adapters
are averaged (FedAvg, weighted by samples) every `aggregate_every` steps."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from ..adapters import adapter_state, clone_sharing_frozen, load_adapter_state, lora_plan, whole_model_names
from ..aggregate import fedavg
from ..memory import most_demanding, side_memory
from ..timemodel import train_flops
from ..transport import client_name
from .base import Side, StepResult, Strategy, Timer, causal_lm_loss, mask_kwargs


class _WholeModel(nn.Module):
    """The client segment and the server segment run back to back in one place."""

    def __init__(self, client: nn.Module, server: nn.Module) -> None:
        super().__init__()
        self.client = client
        self.server = server

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.server(self.client(input_ids, attention_mask, position_ids), attention_mask, position_ids)


class FedLoRA(Strategy):
    name = "fedlora"
    aggregates = True
    exact_export = True

    def __init__(self, setup) -> None:
        super().__init__(setup)
        template = _WholeModel(setup.client, setup.server)
        self.models = [clone_sharing_frozen(template) for _ in range(self.num_clients)]
        self.sides = [Side([m], self.cfg.train) for m in self.models]

    def train_step(self, step: int) -> StepResult:
        timer = Timer(self.device)
        losses, sims = [], []
        for model, side, c in zip(self.models, self.sides, range(self.num_clients)):
            with timer:
                side.zero_grad()
                batch = self._batch(c)
                with self.activation_peaks.measure(client_name(c), batch["input_ids"].numel(),
                                                   exclude=model.parameters()):
                    loss = causal_lm_loss(model(batch["input_ids"], **mask_kwargs([batch])), batch["labels"])
                loss.backward()
                side.step()
            losses.append(loss.detach())
            sims.append(self.time_model.client_compute(train_flops(self._whole_model_flops(*batch["input_ids"].shape))))
        # Clients train in parallel, each the whole model on its own device: the slowest sets the time.
        sim = max(sims)
        return StepResult(loss=float(torch.stack(losses).mean()), client_compute_s=timer.elapsed, sim_time_s=sim)

    def memory_per_side(self) -> dict:
        """Each client holds the whole model: the most demanding client's memory; no server."""
        clients = [side_memory([m], side.optimizer, self.activation_peaks.bytes(client_name(c)))
                   for c, (m, side) in enumerate(zip(self.models, self.sides))]
        return {"client": most_demanding(clients), "server": None}

    def end_round(self, step: int) -> float:
        averaged, sim = self._fedavg_round(step, [adapter_state(m) for m in self.models])
        for m, s in zip(self.models, averaged):
            load_adapter_state(m, s)
        return sim

    def _global_state(self) -> Dict[str, torch.Tensor]:
        return fedavg([adapter_state(m) for m in self.models], self.setup.client_weights)

    def logits_fn(self):
        model = clone_sharing_frozen(self.models[0])
        load_adapter_state(model, self._global_state())
        model.eval()
        return model

    def export_state(self):
        state = self._global_state()
        plans, out = [], {}
        for part in ("client", "server"):
            segment = getattr(self.models[0], part)
            plans.append(lora_plan(segment))
            out.update(whole_model_names(segment, {k[len(part) + 1:]: v for k, v in state.items()
                                                   if k.startswith(part + ".")}))
        return plans, out

    def train(self, mode: bool = True) -> None:
        for m in self.models:
            m.train(mode)

    def state_dict(self) -> dict:
        return {"models": [adapter_state(m) for m in self.models], "sides": [s.state_dict() for s in self.sides]}

    def load_state_dict(self, state: dict) -> None:
        for m, s in zip(self.models, state["models"]):
            load_adapter_state(m, s)
        for side, s in zip(self.sides, state["sides"]):
            side.load_state_dict(s)
