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


def link_seconds(nbytes: float, bandwidth_mbps: float, latency_ms: float) -> float:
    """One transfer: latency + bytes x 8 / bandwidth; nothing sent costs nothing."""
    if nbytes <= 0:
        return 0.0
    return latency_ms / 1e3 + nbytes * 8 / (bandwidth_mbps * 1e6)


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
