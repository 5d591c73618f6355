"""Where the privacy noise comes from: a counter-hash Gaussian keyed by a per-packet seed, and the
per-client generator that draws those seeds.

Why a counter hash and not ``torch.normal``: the fused codec kernels (csrc/codec_cpu.cpp,
csrc/codec_cuda.cu) add the noise in the same pass that quantizes, one element per thread, and
the plain-torch oracle must reproduce their noise to compare packets byte for byte. Every
backend therefore draws element i's noise from the codec's 32-bit counter hash (``sr_hash`` of
csrc/codec.h) keyed by one 62-bit seed per packet: Box-Muller on two 32-bit hashes, in float64,
then rounded to float32 (the specification the kernels implement):

    h1 = hash(seed, 2 i), h2 = hash(seed, 2 i + 1)
    u1 = (h1 + 1) 2^-32 in (0, 1],  u2 = h2 2^-32 in [0, 1)
    z  = sqrt(-2 ln u1) cos(2 pi u2)                      (float64)
    n  = float32(sigma * z)                                (sigma a float64)

libm's float64 log and cos may differ in the last bit between torch, glibc and CUDA, so in
about one element in 2^29 the float32 noise can differ by one ulp across backends; the tests use
fixed seeds. The 32-bit u1 truncates the Gaussian at |z| <= 6.66 (probability 3e-11), and, as for
any floating-point sampler, the noise is not a formally exact Gaussian (Mironov, CCS 2012).

The seed of each packet is drawn from the client's ``torch.Generator``, which is seeded from the
operating system's CSPRNG (``secrets``) so that the server cannot guess it, and checkpointed so a
resumed run draws the same seeds. The hash is a statistical mixer, not a cryptographic stream
cipher: its secrecy rests on the 62-bit seed staying on the client.
"""
from __future__ import annotations

import secrets

import torch

from ..codec_reference import gaussian

# 62 bits: what the codec's seed argument (an int64 op argument) carries without sign trouble.
SEED_BITS = 62


def secure_generator() -> torch.Generator:
    """A CPU torch.Generator seeded from the OS CSPRNG (never from the run's seed: the server
    knows the config, and noise it could regenerate would protect nothing)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def draw_seed(generator: torch.Generator | None) -> int:
    """One packet's noise seed: one randint from ``generator`` (so it is reproducible from the
    generator's state), or straight from ``secrets`` when no generator is given."""
    if generator is None:
        return secrets.randbits(SEED_BITS)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return int(torch.randint(0, 2**SEED_BITS, (1,), generator=generator, device=generator.device).item())


def hash_gaussian(numel: int, seed: int, sigma: float, device=None) -> torch.Tensor:
    """float32[numel]: the noise the fused kernels add to element i of a packet (spec above)."""
    return gaussian(numel, int(seed), float(sigma), device)
