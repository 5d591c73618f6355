"""Per-example clipping and Gaussian noise at the cut, in plain torch: what the trainer calls
where the codec does not compress, what an attack benchmark calls on its own tensors, and the
oracle the fused codec kernels are tested against.

An example is one leading index of x ([batch, ...], e.g. [B, T, d] activations). Its L2 norm is
taken in float64 over its real elements (mask) and it is scaled by min(1, clip / norm); padded
positions are zeroed and get no noise (the server knows the mask: it travels in clear). Then
N(0, (noise_multiplier * clip)^2) is added to every real element. The scale factors are computed
here for every backend (``clip_factors``), so the fused kernels and this oracle clip with the
same float32 numbers and their packets compare byte for byte.

Backward: the output is differentiable w.r.t. x *through* the clipping scale (the noise is
additive and does not depend on x), i.e. the client's gradient is that of the function it
actually sent, the standard practice of DP at the cut (e.g. Titcombe et al. 2021, Vepakomma et
al.'s NoPeek baselines); a clipped example's gradient loses its radial component.
"""
from __future__ import annotations

import torch

from .noise import draw_seed, hash_gaussian

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_clip_args(clip, noise_multiplier) -> None:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0 or clip == float("inf"):
        raise ValueError(f"clip must be a positive finite number (the L2 bound of one example), got {clip!r}")
    if (isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float))
            or not noise_multiplier >= 0 or noise_multiplier == float("inf")):
        raise ValueError(f"noise_multiplier must be a finite number >= 0 (noise std / clip), got {noise_multiplier!r}")


def _row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """mask as x.shape[:mask.dim()] bool, or None; checks its shape."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dim() < 1 or tuple(mask.shape) != tuple(x.shape[:mask.dim()]):
        raise ValueError(f"mask must have the leading shape of x: x is {tuple(x.shape)}, the mask "
                         f"{tuple(mask.shape)} (e.g. [batch, seq] for [batch, seq, hidden] activations)")
    return mask.to(device=x.device) != 0


def _expand(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return m.reshape(tuple(m.shape) + (1,) * (x.dim() - m.dim()))


def clip_factors(x: torch.Tensor, clip: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """float32[rows]: per row of the mask's grid (rows = mask.numel(), or x.shape[0] without a
    mask), the factor that clips its example: min(1, clip / norm), 0 on padded rows. Computed
    without autograd; one float64 reduction so the bound holds to float32 rounding."""
    if x.dim() < 1:
        raise ValueError("x must have a leading batch dimension (one example per leading index)")
    m = _row_mask(x, mask)
    with torch.no_grad():
        sq = x.detach().to(torch.float64).square()
        if m is not None:
            sq = sq * _expand(m, x)
        norms = sq.reshape(x.shape[0], -1).sum(dim=1).sqrt()
        # clip / max(norm, clip): 1 for short examples, and no division by a zero norm.
        f = (clip / torch.clamp(norms, min=clip)).to(torch.float32)
        if m is None:
            return f
        rows = f.reshape((-1,) + (1,) * (m.dim() - 1)).expand(m.shape)
        return torch.where(m, rows, torch.zeros_like(rows)).reshape(-1).contiguous()


def clip_and_noise(x: torch.Tensor, clip: float, noise_multiplier: float,
                   generator: torch.Generator | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each example of x (leading index) scaled to L2 norm <= clip over its real elements, padded
    positions (mask == 0, mask of shape x.shape[:k]) zeroed, then N(0, (noise_multiplier*clip)^2)
    added to the real positions. Returns x's dtype; computed in float32. Differentiable w.r.t. x
    through the clipping. The noise seed is one draw from ``generator`` (None: the OS CSPRNG), so
    the same generator state gives the same noise as the fused codec (splitlora.codec.compress
    with clip=...)."""
    check_clip_args(clip, noise_multiplier)
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a float32, float16 or bfloat16 tensor, got "
                         f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    seed = draw_seed(generator)
    return _apply(x, clip_factors(x, clip, mask), mask, float(noise_multiplier) * float(clip), seed)


def _apply(x, factors, mask, sigma, seed):
    """y = x * factors (per row of the mask grid) + noise on the real rows, in float32."""
    rows = factors.numel()
    xf = x.to(torch.float32)
    f = factors.to(x.device)
    if x.requires_grad:
        # Backward through the clipping: for a clipped example use f * (n.detach() / n), whose value
        # is exactly f (a float divided by itself is 1) and whose gradient is that of clip / norm.
        m = _row_mask(x, mask)
        xm = xf if m is None else xf * _expand(m, x)
        n = torch.linalg.vector_norm(xm.reshape(x.shape[0], -1), dim=1)
        clipped = (f.reshape(x.shape[0], -1) < 1).any(dim=1) & (n > 0)
        ratio = torch.where(clipped, n.detach() / torch.where(clipped, n, torch.ones_like(n)), torch.ones_like(n))
        f = (f.reshape(x.shape[0], -1) * ratio[:, None]).reshape(-1)
    # The arithmetic of codec_reference.private_values (the fused kernels' spec), op for op.
    y = xf.reshape(rows, -1) * f[:, None]
    if sigma > 0:
        y = y + hash_gaussian(y.numel(), seed, sigma, device=x.device).reshape(rows, -1)
    live = factors.to(x.device)[:, None] != 0
    y = torch.where(live, y, torch.zeros_like(y))
    return y.reshape(x.shape).to(x.dtype)
