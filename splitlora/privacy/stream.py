"""The encode of one private packet, in the shape the strategies' EncodeWorker expects (an object
with ``encode(x)``): the stream's codec settings and stochastic-rounding generator, plus the
clipping, the noise and the client's noise generator, fused into the codec's compress."""
from __future__ import annotations

from typing import Optional

import torch

from .. import codec
from ..wire import TensorStream, pack_tensors
from .clip import clip_and_noise


class PrivateEncode:
    def __init__(self, stream: TensorStream, clip: float, noise_multiplier: float, generator: torch.Generator,
                 mask: Optional[torch.Tensor]) -> None:
        self.stream, self.clip, self.noise_multiplier = stream, clip, noise_multiplier
        self.generator, self.mask = generator, mask

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stream.settings
        if not s.compressed:  # 32 bits: the plain-torch path, the same float32 values
            return pack_tensors({"x": clip_and_noise(x.detach().to(torch.float32), self.clip, self.noise_multiplier,
                                                     self.generator, self.mask)})
        return codec.compress(x, bits=s.bits, group_size=s.group_size, stochastic=s.stochastic,
                              generator=self.stream.generator, clip=self.clip,
                              noise_multiplier=self.noise_multiplier, mask=self.mask,
                              noise_generator=self.generator)


def clip_for_backward(x: torch.Tensor, clip: float, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x clipped as the packet was (no noise: it is additive), differentiable through the clipping:
    the tensor a client calls backward on with the gradient the server returns."""
    from .clip import _apply, clip_factors

    return _apply(x, clip_factors(x, clip, mask), mask, 0.0, 0)
