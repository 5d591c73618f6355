"""Centralized LoRA: one party holds all the data and the whole (unsplit) transformers model.

Each step trains on the union of what the clients would see at that step (one batch from each
client's shard, concatenated), so it sees the same samples in the same order as the split
strategies. The adapters sit on the same modules, with the same initial values, as the split
segments' (copied by whole-model name), which is what makes "1-client SplitLoRA without
compression equals centralized LoRA" a meaningful test.
"""
from __future__ import annotations

from ..adapters import adapter_state, lora_plan, whole_model_names, whole_model_with_adapters
from ..memory import side_memory
from ..timemodel import train_flops
from ..transport import SERVER
from .base import Side, StepResult, Strategy, Timer, causal_lm_loss, concat_right_padded, mask_kwargs


class Centralized(Strategy):
    name = "centralized"
    exact_export = True

    def __init__(self, setup) -> None:
        super().__init__(setup)
        segments = [s for s in (setup.client, setup.tail, setup.server) if s is not None]
        self.plans = [lora_plan(s) for s in segments]
        initial = {}
        for s in segments:
            initial.update(whole_model_names(s, adapter_state(s)))
        self.model = whole_model_with_adapters(setup.base_model, self.plans, initial, device=self.device)
        self.model.config.use_cache = False
        self.side = Side([self.model], self.cfg.train)

    def _logits(self, input_ids, attention_mask, position_ids=None):
        # position_ids: a packed batch's (then attention_mask is None; see base.mask_kwargs).
        kwargs = {} if position_ids is None else {"position_ids": position_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits

    def train_step(self, step: int) -> StepResult:
        timer = Timer(self.device)
        with timer:
            self.side.zero_grad()
            batches = [self._batch(c) for c in range(self.num_clients)]
            # -100: no loss on padding; position id 0: each padding token its own block (packed).
            pad = {"input_ids": 0, "attention_mask": 0, "labels": -100, "position_ids": 0}
            batch = {k: concat_right_padded([b[k] for b in batches], pad.get(k, 0)) for k in batches[0]}
            with self.activation_peaks.measure(SERVER, batch["input_ids"].numel(), exclude=self.model.parameters()):
                loss = causal_lm_loss(self._logits(batch["input_ids"], **mask_kwargs([batch])), batch["labels"])
            loss.backward()
            self.side.step()
        # Every client's batch at once, padded to the longest of them.
        sim = self.time_model.server_compute(train_flops(self._whole_model_flops(*batch["input_ids"].shape)))
        return StepResult(loss=float(loss.detach()), server_compute_s=timer.elapsed, sim_time_s=sim)

    def logits_fn(self):
        return self._logits

    def memory_per_side(self) -> dict:
        """One party (listed as the server: the place that holds all the data) with the whole model."""
        return {"client": None,
                "server": side_memory([self.model], self.side.optimizer, self.activation_peaks.bytes(SERVER))}

    def export_state(self):
        return self.plans, adapter_state(self.model)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def state_dict(self) -> dict:
        return {"model": adapter_state(self.model), "side": self.side.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        from ..adapters import load_adapter_state

        load_adapter_state(self.model, state["model"])
        self.side.load_state_dict(state["side"])
