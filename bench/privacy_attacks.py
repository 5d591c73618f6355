"""Attacks of a curious server on the smashed data of split fine-tuning, and their scores.

The server sees what the protocol sends: the activations at the cut ([B, T, d], after whatever
defence the client applies), the padding mask, the labels in the plain (not U-shaped) variant, and
the client adapters at every FedAvg round. Knowing the base model and the adapters, it can run the
client's bottom layers itself on any text. Two reconstructions of the client's tokens follow:

- `InversionAttack`: a learned map from one position's activation to a token, trained with
  cross-entropy on public text that the attacker passes through the same bottom layers (with the
  same defence applied, since the defence's settings are part of the protocol: an adaptive attacker).
  Per position: LayerNorm, a 2-layer MLP into the embedding space, and logits against the model's
  own (frozen) token embedding matrix, so a token the public text never shows can still be named.
- `optimisation_attack`: searches for input embeddings whose bottom-layer activations match the
  observed ones (1 - cosine per position, so a per-example clipping scale changes nothing), then
  takes the nearest token embedding (cosine) per position. Needs no public data.

Scores: `token_accuracy` over real positions, `rouge_l_ids` on token sequences, and the ROUGE-L of
the decoded text (splitlora.evaluate.rouge_l). `Defence` applies a setting to activations: none,
per-example clipping plus Gaussian noise (`splitlora.privacy.clip_and_noise`), or the codec's int8 /
int4 quantization round trip.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from splitlora.evaluate import lcs_length

__all__ = [
    "Defence",
    "InversionAttack",
    "bottom_from_embeddings",
    "clip_and_noise_impl",
    "cut_activations",
    "example_norms",
    "optimisation_attack",
    "rouge_l_ids",
    "token_accuracy",
    "token_embedding",
]


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def token_accuracy(predicted: torch.Tensor, true: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """Share of positions (where `mask` is nonzero; all when None) whose predicted token is the true one."""
    if predicted.shape != true.shape:
        raise ValueError(f"predicted and true must have the same shape; got {tuple(predicted.shape)} "
                         f"and {tuple(true.shape)}.")
    keep = torch.ones_like(true, dtype=torch.bool) if mask is None else mask.bool()
    n = int(keep.sum())
    if n == 0:
        raise ValueError("token_accuracy: the mask selects no position.")
    return float(((predicted == true) & keep).sum()) / n


def rouge_l_ids(hypothesis: Sequence, reference: Sequence) -> float:
    """ROUGE-L F1 in [0, 1] of two token sequences (longest common subsequence)."""
    hyp, ref = list(hypothesis), list(reference)
    if not hyp or not ref:
        return 0.0
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------------
# Defences
# ---------------------------------------------------------------------------------------------


def _clip_and_noise_reference(x, clip, noise_multiplier, generator=None, mask=None):
    """What splitlora.privacy.clip_and_noise is specified to do, used only while that module is
    missing: per-example L2 clip of [B, T, d] (over the real positions) to `clip`, then Gaussian
    noise of std noise_multiplier * clip on the real positions (padded positions zeroed)."""
    keep = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask.to(x.dtype)
    keep = keep.unsqueeze(-1)
    norms = (x.float() * keep).flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (clip / norms).clamp(max=1.0).to(x.dtype).view(-1, 1, 1)
    out = x * scale * keep
    if noise_multiplier > 0:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device)
        out = out + (noise * (noise_multiplier * clip)).to(x.dtype) * keep
    return out


def clip_and_noise_impl() -> tuple[Callable, str]:
    """(clip_and_noise, where it comes from): the package's when splitlora.privacy has it, else the
    reference above (the benchmark records which one served)."""
    try:
        from splitlora.privacy import clip_and_noise
    except ModuleNotFoundError as err:
        if err.name != "splitlora.privacy":  # the package is there but broken: say so, do not stand in
            raise
        return _clip_and_noise_reference, "bench.privacy_attacks._clip_and_noise_reference (stand-in)"
    return clip_and_noise, "splitlora.privacy.clip_and_noise"


@dataclass(frozen=True)
class Defence:
    """One setting of what the client does to its activations before sending them.

    kind: "none", "noise" (per-example L2 clip to `clip`, then N(0, (noise_multiplier*clip)^2)
    per element) or "codec" (int `bits` quantization round trip, group `group_size`). A noise
    setting's clip may be None until `with_clip` fixes it (the benchmark sets it per cut).
    """

    name: str
    kind: str = "none"
    noise_multiplier: float = 0.0
    clip: Optional[float] = None
    bits: int = 8
    group_size: int = 64

    def with_clip(self, clip: float) -> "Defence":
        return Defence(self.name, self.kind, self.noise_multiplier, float(clip), self.bits, self.group_size)

    def apply(self, h: torch.Tensor, mask: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if self.kind == "none":
            return h
        if self.kind == "noise":
            if self.clip is None:
                raise ValueError(f"defence {self.name!r}: set its clip (with_clip) before applying it.")
            fn, _ = clip_and_noise_impl()
            return fn(h, self.clip, self.noise_multiplier, generator=generator, mask=mask)
        if self.kind == "codec":
            from splitlora.codec import compress, decompress

            return decompress(compress(h.contiguous(), bits=self.bits, group_size=self.group_size))
        raise ValueError(f"defence {self.name!r}: kind must be none, noise or codec; got {self.kind!r}.")


def example_norms(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example L2 norm of [B, T, d] activations over the real positions."""
    return (h.float() * mask.unsqueeze(-1).float()).flatten(1).norm(dim=1)


# ---------------------------------------------------------------------------------------------
# The bottom layers, from tokens or from embeddings
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def cut_activations(client: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    batch_size: int = 16) -> torch.Tensor:
    """The client's activations at the cut for every row, [N, T, d] (float32)."""
    out = [client(input_ids[i:i + batch_size], attention_mask[i:i + batch_size]).float()
           for i in range(0, input_ids.shape[0], batch_size)]
    return torch.cat(out)


def token_embedding(client: nn.Module) -> tuple[str, nn.Embedding]:
    """(name, module) of the segment's token embedding: its nn.Embedding with vocab_size rows."""
    vocab = client.config.vocab_size
    for name, module in client.named_children():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return name, module
    raise ValueError(f"no token embedding ({vocab} rows) among the segment's children "
                     f"{[n for n, _ in client.named_children()]}.")


class _GivenEmbeddings(nn.Module):
    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids):
        return self.embeddings


@contextlib.contextmanager
def bottom_from_embeddings(client: nn.Module, embeddings: torch.Tensor):
    """Within the block, `client(dummy_ids, mask)` runs the bottom layers on `embeddings` [B, T, d]
    in place of the token embedding lookup (positions, scaling and the rest as the family does)."""
    name, module = token_embedding(client)
    setattr(client, name, _GivenEmbeddings(embeddings))
    try:
        yield
    finally:
        setattr(client, name, module)


# ---------------------------------------------------------------------------------------------
# Attack 1: learned inversion
# ---------------------------------------------------------------------------------------------


class _Inverter(nn.Module):
    def __init__(self, d_in: int, embedding: torch.Tensor, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, embedding.shape[1]))
        # Unit rows: the score is a cosine times a learned temperature, so rare tokens with small
        # embeddings are not ruled out by their norm.
        self.register_buffer("embedding", F.normalize(embedding.detach().float(), dim=1), persistent=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.zeros(embedding.shape[0]))

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(self.norm(h)), dim=-1) * self.log_scale.exp()

    def logits(self, h: torch.Tensor, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
        f = self.features(h)
        if candidates is None:
            return f @ self.embedding.T + self.bias
        return f @ self.embedding[candidates].T + self.bias[candidates]


class InversionAttack:
    """A per-position map from cut activations to tokens, trained on public text.

        attack = InversionAttack(embedding_weight, d_in)
        attack.fit(public_acts, public_ids, public_mask, defence)   # defended afresh each epoch
        predicted = attack.predict(observed_acts)                   # [N, T] token ids

    With a vocabulary above `full_softmax_max` tokens the training loss is a sampled softmax (the
    batch's own tokens plus `negatives` random ones); prediction always scores the whole vocabulary.
    """

    def __init__(self, embedding: torch.Tensor, d_in: int, *, hidden: int = 512, lr: float = 2e-3,
                 epochs: int = 20, batch_positions: int = 512, negatives: int = 4096,
                 full_softmax_max: int = 8192, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = _Inverter(d_in, embedding, hidden)
        self.lr, self.epochs, self.batch_positions = lr, epochs, batch_positions
        self.negatives, self.full_softmax_max = negatives, full_softmax_max
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab = embedding.shape[0]

    def fit(self, acts: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            defence: Optional[Defence] = None) -> list[float]:
        """Trains on the real positions of public activations [N, T, d]; returns the loss per epoch."""
        keep = attention_mask.bool()
        targets = input_ids[keep]
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        losses = []
        self.model.train()
        for _ in range(self.epochs):
            seen = acts if defence is None else defence.apply(acts, attention_mask, self.generator)
            x = seen[keep]
            order = torch.randperm(x.shape[0], generator=self.generator)
            total = 0.0
            for start in range(0, x.shape[0], self.batch_positions):
                idx = order[start:start + self.batch_positions]
                xb, yb = x[idx], targets[idx]
                if self.vocab <= self.full_softmax_max:
                    loss = F.cross_entropy(self.model.logits(xb), yb)
                else:
                    negatives = torch.randint(self.vocab, (self.negatives,), generator=self.generator)
                    candidates, inverse = torch.unique(torch.cat([yb, negatives]), return_inverse=True)
                    loss = F.cross_entropy(self.model.logits(xb, candidates), inverse[:yb.shape[0]])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.shape[0]
            losses.append(total / x.shape[0])
        self.model.eval()
        return losses

    @torch.no_grad()
    def predict(self, acts: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """The most likely token at every position of [N, T, d] activations, [N, T]."""
        flat = acts.reshape(-1, acts.shape[-1])
        out = [self.model.logits(flat[i:i + chunk]).argmax(-1) for i in range(0, flat.shape[0], chunk)]
        return torch.cat(out).view(acts.shape[:2])


# ---------------------------------------------------------------------------------------------
# Attack 2: optimisation (activation matching)
# ---------------------------------------------------------------------------------------------


def nearest_tokens(z: torch.Tensor, embedding: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """The token whose embedding is nearest (cosine) to each vector of z [..., d]."""
    e = F.normalize(embedding.float(), dim=1)
    flat = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=1)
    out = [(flat[i:i + chunk] @ e.T).argmax(-1) for i in range(0, flat.shape[0], chunk)]
    return torch.cat(out).view(z.shape[:-1])


def optimisation_attack(client: nn.Module, observed: torch.Tensor, attention_mask: torch.Tensor, *,
                        steps: int = 200, lr: float = 0.05, seed: int = 0,
                        batch_size: int = 16) -> torch.Tensor:
    """Token ids [N, T] whose bottom-layer activations best match `observed` [N, T, d].

    Input embeddings start at the mean token embedding plus small noise and follow Adam on the mean
    over real positions of 1 - cosine(activation, observed); each is then read as its nearest token
    embedding. The client's parameters are not changed (their gradients are not kept).
    """
    _, emb = token_embedding(client)
    weight = emb.weight.detach()
    scale = weight.float().std()
    gen = torch.Generator().manual_seed(seed)
    requires = [p.requires_grad for p in client.parameters()]
    for p in client.parameters():
        p.requires_grad_(False)
    found = []
    try:
        for start in range(0, observed.shape[0], batch_size):
            target = observed[start:start + batch_size].float()
            mask = attention_mask[start:start + batch_size]
            keep = mask.float()
            z0 = weight.float().mean(0).expand(*target.shape[:2], -1)
            z = (z0 + 0.1 * scale * torch.randn(z0.shape, generator=gen)).to(weight.dtype).requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr * float(scale))
            dummy = torch.zeros(target.shape[:2], dtype=torch.long)
            for _ in range(steps):
                with bottom_from_embeddings(client, z):
                    h = client(dummy, mask).float()
                cos = F.cosine_similarity(h, target, dim=-1, eps=1e-6)
                loss = ((1 - cos) * keep).sum() / keep.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            found.append(nearest_tokens(z.detach(), weight))
    finally:
        for p, r in zip(client.parameters(), requires):
            p.requires_grad_(r)
    return torch.cat(found)
