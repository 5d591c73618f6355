"""A simple time model: what a step would take on the configured devices and links.

Compute time = flops / (TFLOPS x 1e12); a transfer takes latency + bytes x 8 / bandwidth.
The simulated time of a run is what the configured setting (for example the SplitLoRA paper's:
every client and the server at 35.6 TFLOPS) would take, next to the time this machine
actually took. Flops are counted, not measured: 2 flops per multiply-add of every matrix
weight a token passes through, plus attention's score and value products.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def compute_seconds(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12)


class SimTime(float):
    """Simulated seconds that remember what of them the links took: `messages` transfers (each
    paying the latency) carrying `bits`, which cost `link_seconds` on the configured links; and
    what of them each party computed: `client_flops` at the clients' TFLOPS (which took
    `client_seconds`) and `server_flops` at the server's (`server_seconds`).

    It is a float, so the strategies compose step times as before (+ for phases one after
    another, max() for parties in parallel: max keeps the slowest party's SimTime whole). Only +
    carries the parts along; any other arithmetic gives a plain float, which counts as compute
    that no party's TFLOPS re-prices. `at(bandwidth, latency)` re-prices the link parts for another
    link, and `at(..., client_tflops=, server_tflops=)` the compute parts for other devices: the
    same run's time on another network or hardware, with the critical path (which party was
    slowest) held as it was. That is exact when the parties that max() compares are alike
    (homogeneous clients: the same flops and packets of one size), and an estimate otherwise: a
    client that was not the slowest at the recorded setting may become it at another."""

    _PARTS = ("messages", "bits", "link_seconds", "client_flops", "server_flops", "client_seconds",
              "server_seconds")

    def __new__(cls, seconds: float = 0.0, messages: float = 0.0, bits: float = 0.0, link_seconds: float = 0.0,
                client_flops: float = 0.0, server_flops: float = 0.0, client_seconds: float = 0.0,
                server_seconds: float = 0.0):
        obj = super().__new__(cls, seconds)
        obj.messages, obj.bits, obj.link_seconds = float(messages), float(bits), float(link_seconds)
        obj.client_flops, obj.server_flops = float(client_flops), float(server_flops)
        obj.client_seconds, obj.server_seconds = float(client_seconds), float(server_seconds)
        return obj

    def __add__(self, other):
        if not isinstance(other, (int, float)):
            return NotImplemented
        return SimTime(float(self) + float(other),
                       **{k: getattr(self, k) + getattr(other, k, 0.0) for k in self._PARTS})

    __radd__ = __add__

    def __repr__(self) -> str:
        return f"SimTime({float(self)!r}, " + ", ".join(f"{k}={getattr(self, k)!r}" for k in self._PARTS) + ")"

    @property
    def compute_seconds(self) -> float:
        return float(self) - self.link_seconds

    def at(self, bandwidth_mbps: float, latency_ms: float, client_tflops: float | None = None,
           server_tflops: float | None = None) -> float:
        """These seconds with every link at `bandwidth_mbps` and `latency_ms` instead and, when
        given, every client at `client_tflops` and the server at `server_tflops`."""
        compute = self.compute_seconds
        if client_tflops is not None:
            compute += compute_seconds(self.client_flops, client_tflops) - self.client_seconds
        if server_tflops is not None:
            compute += compute_seconds(self.server_flops, server_tflops) - self.server_seconds
        return compute + self.messages * latency_ms / 1e3 + self.bits / (bandwidth_mbps * 1e6)


# The names under which the trainer records a run's summed SimTime parts, beside sim_time_s, on
# every step and evaluation record (metrics.jsonl): bench.report re-prices them for other links.
SIM_LINK_KEYS = ("sim_link_s", "sim_link_messages", "sim_link_bits")
# Beside them, the summed compute parts of sim_time_s per party: flops on the critical path and the
# seconds they took at the configured TFLOPS (bench.crossover re-prices them for other devices).
SIM_COMPUTE_KEYS = ("sim_client_flops", "sim_server_flops", "sim_client_s", "sim_server_s")
# The SimTime attribute behind each recorded key.
SIM_RECORD_PARTS = dict(zip(SIM_LINK_KEYS + SIM_COMPUTE_KEYS,
                            ("link_seconds", "messages", "bits", "client_flops", "server_flops", "client_seconds",
                             "server_seconds")))


def sim_time_from_record(record: dict) -> "SimTime | None":
    """The SimTime of a step or evaluation record's summed sim_time_s with every part the record
    keeps (None when it lacks the link parts; compute parts it lacks count as compute no TFLOPS
    re-prices, which is what runs recorded before they were kept can give)."""
    if not all(k in record for k in SIM_LINK_KEYS):
        return None
    return SimTime(record["sim_time_s"], **{part: record.get(key, 0.0) for key, part in SIM_RECORD_PARTS.items()})


def as_sim_time(seconds: float) -> SimTime:
    """A SimTime for any simulated seconds; a plain float counts as compute only."""
    return seconds if isinstance(seconds, SimTime) else SimTime(seconds)


def link_seconds(nbytes: float, bandwidth_mbps: float, latency_ms: float) -> float:
    """One transfer: latency + bytes x 8 / bandwidth (a SimTime that counts one message of
    bytes x 8 bits); nothing sent costs nothing."""
    if nbytes <= 0:
        return 0.0
    seconds = latency_ms / 1e3 + nbytes * 8 / (bandwidth_mbps * 1e6)
    return SimTime(seconds, messages=1, bits=nbytes * 8, link_seconds=seconds)


@dataclass(frozen=True)
class TimeModel:
    client_tflops: float
    server_tflops: float
    bandwidth_mbps: float
    latency_ms: float

    def client_compute(self, flops: float) -> float:
        """Seconds of `flops` on one client (a SimTime that keeps the flops, to re-price)."""
        seconds = compute_seconds(flops, self.client_tflops)
        return SimTime(seconds, client_flops=flops, client_seconds=seconds)

    def server_compute(self, flops: float) -> float:
        seconds = compute_seconds(flops, self.server_tflops)
        return SimTime(seconds, server_flops=flops, server_seconds=seconds)

    def transfer(self, nbytes: float) -> float:
        return link_seconds(nbytes, self.bandwidth_mbps, self.latency_ms)


def matmul_params(module: nn.Module) -> int:
    """Weights a token is multiplied by: every parameter with 2 or more dims except lookup
    tables (embeddings). LoRA adapters count too (they are part of the work)."""
    embedding_params = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2 and id(p) not in embedding_params)


def forward_flops(module: nn.Module, batch: int, seq_len: int, num_layers: int, hidden_size: int) -> float:
    """Flops of one forward pass of `module` over batch x seq_len tokens holding `num_layers`
    decoder layers: 2 x tokens x matrix weights, plus 4 x tokens x seq_len x hidden per layer
    for attention (scores and weighted values; the causal half is not discounted)."""
    tokens = batch * seq_len
    return 2.0 * tokens * matmul_params(module) + 4.0 * tokens * seq_len * hidden_size * num_layers


def train_flops(forward: float, *, full_finetune: bool = False) -> float:
    """Forward + backward. With a frozen base the backward computes input gradients (about one
    forward) and the tiny adapter gradients; full fine-tuning also computes weight gradients."""
    return forward * (3.0 if full_finetune else 2.0)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def peak_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
