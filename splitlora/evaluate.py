"""Evaluation of a (split) causal LM: held-out loss and perplexity, decoding, BLEU and ROUGE-L.

The model is seen only through ``logits_fn(input_ids, attention_mask) -> logits [B, T, V]``, so
the same code scores a whole model, a client and server segment composed, or a test double; a
transformers causal LM may be passed as it is (called by keyword, and decoded greedily with its
KV cache). The caller puts the model in eval mode; if `logits_fn` is itself an ``nn.Module`` this
module does it and restores the previous mode. Everything here runs under ``torch.no_grad``.

Prompts are built exactly as in training (:func:`splitlora.data.tokenize`): the source, then the
separator; a generated completion is decoded and stripped of the leading TARGET_PREFIX space.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from splitlora.data import DEFAULT_SEPARATOR, IGNORE_INDEX, Example, TokenizedDataset

__all__ = [
    "LogitsFn",
    "evaluate_loss",
    "generate",
    "greedy_search",
    "beam_search",
    "evaluate_generation",
    "score_corpus",
    "corpus_bleu",
    "lcs_length",
    "rouge_l",
]

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def _inference(logits_fn):
    """no_grad, and eval mode for the duration if logits_fn is a module (restored afterwards)."""
    module = logits_fn if isinstance(logits_fn, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if module is not None and was_training:
            module.train()


def _device_of(logits_fn, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(logits_fn, torch.nn.Module):
        for p in logits_fn.parameters():
            return p.device
    return torch.device("cpu")


def _logits(logits_fn, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if _is_causal_lm(logits_fn):
        # By keyword: GPT-2's forward takes past_key_values second.
        out = logits_fn(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    else:
        out = logits_fn(input_ids, attention_mask)
    # Accept a Hugging Face ModelOutput as well as a bare tensor.
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits_fn must return logits of shape [B, T, V] = "
                         f"[{input_ids.shape[0]}, {input_ids.shape[1]}, V], got {shape}")
    return logits


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------

def evaluate_loss(logits_fn: LogitsFn, dataset: TokenizedDataset, batch_size: int = 16, *,
                  device=None) -> dict:
    """Token-weighted mean next-token cross-entropy over the label tokens of `dataset`.

    As in Hugging Face causal LMs, logits at position t are scored against labels at t+1.
    Returns ``{"loss", "perplexity", "tokens"}`` (perplexity = exp(loss)).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(dataset) == 0:
        raise ValueError("evaluate_loss got an empty dataset")
    device = _device_of(logits_fn, device)
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    with _inference(logits_fn):
        starts = range(0, len(dataset), batch_size)
        for start in tqdm(starts, desc="eval loss", unit="batch", disable=None, leave=False):
            batch = dataset.batch(range(start, min(start + batch_size, len(dataset))), trim=True)
            input_ids = batch["input_ids"].to(device)
            logits = _logits(logits_fn, input_ids, batch["attention_mask"].to(device))
            labels = batch["labels"][:, 1:].to(device)
            shifted = logits[:, :-1].float()
            total += F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="sum").double().cpu()
            tokens += int((labels != IGNORE_INDEX).sum())
    if tokens == 0:
        raise ValueError("the dataset has no label tokens to score")
    loss = float(total) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


# ---------------------------------------------------------------------------------------------
# Decoding. A bare logits_fn (a split model's segments composed) has no KV cache: every step
# recomputes the whole prefix. A transformers causal LM passed as logits_fn is decoded greedily
# with its KV cache instead, one token's forward per new token: for SmolLM2-135M on one CPU
# thread, 48 new tokens after a 38-token prompt took 3.1-3.5 s against 13.8-15.1 s.
# ---------------------------------------------------------------------------------------------

def _check_decode_args(prompt_ids, max_new_tokens, num_beams=1):
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: generation needs at least one prompt token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _is_causal_lm(logits_fn) -> bool:
    """A transformers model, which takes past_key_values and returns them with use_cache=True."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(logits_fn, PreTrainedModel)


def _greedy_with_cache(model, prompt_ids: Sequence[int], max_new_tokens: int, eos_id: int,
                       device) -> list[int]:
    """greedy_search on a transformers causal LM: the prompt once, then one token per step."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    with _inference(model):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            mask = torch.ones((1, len(prompt_ids) + len(new)), dtype=torch.long, device=device)
            out = model(input_ids=ids.new_tensor([[token]]), attention_mask=mask,
                        past_key_values=out.past_key_values, use_cache=True)
    return new


def greedy_search(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int,
                  eos_id: int, device=None) -> list[int]:
    """Most likely next token at every step; returns the new tokens, without the eos.

    A transformers causal LM as `logits_fn` is decoded with its KV cache (same tokens, fewer flops).
    """
    _check_decode_args(prompt_ids, max_new_tokens)
    device = _device_of(logits_fn, device)
    if _is_causal_lm(logits_fn):
        return _greedy_with_cache(logits_fn, prompt_ids, max_new_tokens, eos_id, device)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    with _inference(logits_fn):
        for _ in range(max_new_tokens):
            logits = _logits(logits_fn, ids, torch.ones_like(ids))
            token = int(logits[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


def beam_search(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int,
                eos_id: int, num_beams: int, length_penalty: float = 1.0,
                device=None) -> list[int]:
    """Beam search; returns the new tokens of the best hypothesis, without the eos.

    A finished hypothesis is scored ``sum log p / length ** length_penalty`` (length counts the
    eos). Search stops as soon as `num_beams` hypotheses have finished (Hugging Face's
    ``early_stopping=True``), so ``num_beams=1`` is exactly greedy search. As in Hugging Face, an
    eos only finishes a hypothesis if it ranks among the top `num_beams` candidates of its step.
    """
    _check_decode_args(prompt_ids, max_new_tokens, num_beams)
    device = _device_of(logits_fn, device)
    prompt = list(prompt_ids)
    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []

    def normalized(score: float, length: int) -> float:
        return score / (max(length, 1) ** length_penalty)

    with _inference(logits_fn):
        for _ in range(max_new_tokens):
            ids = torch.tensor([prompt + tokens for _, tokens in live], dtype=torch.long,
                               device=device)
            logits = _logits(logits_fn, ids, torch.ones_like(ids))[:, -1].float()
            vocab = logits.shape[-1]
            scores = torch.log_softmax(logits, dim=-1).cpu().double()
            scores += torch.tensor([s for s, _ in live], dtype=torch.float64)[:, None]
            top_scores, flat = scores.reshape(-1).topk(min(2 * num_beams, scores.numel()))
            next_live = []
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), flat.tolist())):
                beam, token = divmod(index, vocab)
                tokens = live[beam][1]
                if token == eos_id:
                    if rank < num_beams:
                        finished.append((normalized(score, len(tokens) + 1), tokens))
                else:
                    next_live.append((score, tokens + [token]))
                if len(next_live) == num_beams:
                    break
            live = next_live
            if len(finished) >= num_beams or not live:
                break
    # Out of steps: unfinished beams compete too (as in Hugging Face's finalize).
    candidates = finished + [(normalized(s, len(t)), t) for s, t in live]
    return max(candidates, key=lambda c: c[0])[1]


def generate(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int, eos_id: int,
             num_beams: int = 1, length_penalty: float = 1.0, device=None) -> list[int]:
    """Continue `prompt_ids`: greedy for ``num_beams=1``, beam search otherwise.

    Returns only the new tokens, stopping before the eos (which is not included).
    """
    if num_beams == 1:
        return greedy_search(logits_fn, prompt_ids, max_new_tokens=max_new_tokens, eos_id=eos_id,
                             device=device)
    return beam_search(logits_fn, prompt_ids, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       num_beams=num_beams, length_penalty=length_penalty, device=device)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

_ROUGE_TOKEN = re.compile(r"\w+|[^\w\s]")


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_tokens(text: str) -> list[str]:
    return _ROUGE_TOKEN.findall(text.lower())


def rouge_l(hypothesis: str, references: Sequence[str] | str) -> float:
    """ROUGE-L F1 in [0, 1] on lowercased word/punctuation tokens; the best over references."""
    if isinstance(references, str):
        references = [references]
    hyp = _rouge_tokens(hypothesis)
    best = 0.0
    for reference in references:
        ref = _rouge_tokens(reference)
        lcs = lcs_length(hyp, ref)
        if lcs == 0:
            continue
        precision, recall = lcs / len(hyp), lcs / len(ref)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU (0-100), references[i] holding all references of hypothesis i."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("corpus_bleu needs at least one hypothesis")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
    # force: E2E references are tokenised ("... .") on purpose; do not warn about it.
    return float(sacrebleu.corpus_bleu(list(hypotheses), reference_streams(references), force=True).score)


def reference_streams(references: Sequence[Sequence[str]]) -> list[list]:
    """sacrebleu's layout of a varying number of references per hypothesis: reference streams of
    equal length (stream k holds every hypothesis's k-th reference), None where one has fewer."""
    width = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def score_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """``{"bleu", "rouge_l"}``, both 0-100: corpus BLEU and mean per-hypothesis ROUGE-L F1."""
    bleu = corpus_bleu(hypotheses, references)
    rouge = sum(rouge_l(h, refs) for h, refs in zip(hypotheses, references)) / len(hypotheses)
    return {"bleu": bleu, "rouge_l": 100.0 * rouge}


def evaluate_generation(logits_fn: LogitsFn, examples: Sequence[Example], tokenizer, *,
                        max_new_tokens: int = 64, num_beams: int = 1,
                        max_sources: int | None = None, separator: str = DEFAULT_SEPARATOR,
                        length_penalty: float = 1.0, num_samples: int = 5,
                        device=None) -> dict:
    """Decode each distinct source once and score against all its references.

    Sources are taken in order of first appearance (the first `max_sources` if given).
    Returns ``{"bleu", "rouge_l", "num_sources", "samples", "outputs"}``: BLEU and ROUGE-L on a
    0-100 scale; every source's output as a dict with source, hypothesis and references
    ("outputs", what a significance test needs), and the first `num_samples` of them ("samples").
    """
    references: dict[str, list[str]] = {}
    for example in examples:
        references.setdefault(example.source, []).append(example.target)
    sources = list(references)
    if max_sources is not None:
        if max_sources < 1:
            raise ValueError(f"max_sources must be >= 1 or None, got {max_sources}")
        sources = sources[:max_sources]
    if not sources:
        raise ValueError("evaluate_generation got no examples")
    hypotheses = []
    for source in tqdm(sources, desc="generating", unit="source", disable=None, leave=False):
        new = generate(logits_fn, tokenizer.encode(source + separator),
                       max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id,
                       num_beams=num_beams, length_penalty=length_penalty, device=device)
        hypotheses.append(tokenizer.decode(new).strip())
    refs = [references[s] for s in sources]
    scores = score_corpus(hypotheses, refs)
    outputs = [{"source": s, "hypothesis": h, "references": r} for s, h, r in zip(sources, hypotheses, refs)]
    return {**scores, "num_sources": len(sources), "samples": outputs[:num_samples], "outputs": outputs}
