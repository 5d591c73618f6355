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
    paying the latency) carrying `bits`, which cost `link_seconds` on the configured links.

    It is a float, so the strategies compose step times as before (+ for phases one after
    another, max() for parties in parallel: max keeps the slowest party's SimTime whole). Only +
    carries the link parts along; any other arithmetic gives a plain float, which counts as
    compute. `at(bandwidth, latency)` re-prices the link parts for another link: the same run's
    time on a slower or faster network, with the critical path (which party was slowest) held as
    it was. That is exact when the parties that max() compares differ only in compute or are
    alike (homogeneous clients sending packets of one size), and an estimate otherwise."""

    def __new__(cls, seconds: float = 0.0, messages: float = 0.0, bits: float = 0.0, link_seconds: float = 0.0):
        obj = super().__new__(cls, seconds)
        obj.messages, obj.bits, obj.link_seconds = float(messages), float(bits), float(link_seconds)
        return obj

    def __add__(self, other):
        if not isinstance(other, (int, float)):
            return NotImplemented
        return SimTime(float(self) + float(other), self.messages + getattr(other, "messages", 0.0),
                       self.bits + getattr(other, "bits", 0.0), self.link_seconds + getattr(other, "link_seconds", 0.0))

    __radd__ = __add__

    def __repr__(self) -> str:
        return (f"SimTime({float(self)!r}, messages={self.messages!r}, bits={self.bits!r}, "
                f"link_seconds={self.link_seconds!r})")

    @property
    def compute_seconds(self) -> float:
        return float(self) - self.link_seconds

    def at(self, bandwidth_mbps: float, latency_ms: float) -> float:
        """These seconds with every link at `bandwidth_mbps` and `latency_ms` instead."""
        return self.compute_seconds + self.messages * latency_ms / 1e3 + self.bits / (bandwidth_mbps * 1e6)


# The names under which the trainer records a run's summed SimTime parts, beside sim_time_s, on
# every step and evaluation record (metrics.jsonl): bench.report re-prices them for other links.
SIM_LINK_KEYS = ("sim_link_s", "sim_link_messages", "sim_link_bits")


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
        return compute_seconds(flops, self.client_tflops)

    def server_compute(self, flops: float) -> float:
        return compute_seconds(flops, self.server_tflops)

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
