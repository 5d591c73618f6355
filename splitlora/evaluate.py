"""Evaluation of a (split) causal LM: held-out loss and perplexity, decoding, BLEU and ROUGE-L.

The model is seen only through ``logits_fn(input_ids, attention_mask) -> logits [B, T, V]``, so
the same code scores a whole model, a client and server segment composed, or a test double; a
transformers causal LM may be passed as it is (called by keyword; :func:`evaluate_generation`
decodes it in left-padded batches through its own ``generate`` with the KV cache). The caller puts
the model in eval mode; if `logits_fn` is itself an ``nn.Module`` this module does it and restores
the previous mode. Everything here runs under ``torch.no_grad``.

Prompts are :class:`splitlora.data.records.GenerationItem` token ids, exactly those that precede
the completion in training (for E2E examples: the source, then the separator); a generated
completion is decoded and stripped of the leading TARGET_PREFIX space.
"""
from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from splitlora.data import DEFAULT_SEPARATOR, IGNORE_INDEX, Example, TokenizedDataset
from splitlora.data.records import GenerationItem, generation_items_from_examples

__all__ = [
    "LogitsFn",
    "evaluate_loss",
    "generate",
    "greedy_search",
    "beam_search",
    "generate_batch",
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
# recomputes the whole prefix, one prompt at a time. A transformers causal LM passed as logits_fn
# is decoded with its KV cache instead, one token's forward per new token: for SmolLM2-135M on one
# CPU thread, 48 new tokens after a 38-token prompt took 3.1-3.5 s against 13.8-15.1 s.
# generate_batch (what evaluate_generation uses) goes further for such a model: left-padded
# batches of prompts through its own `generate`, one forward per new token for the whole batch
# (bench/eval_speed.py measures it against the one-at-a-time cached path).
#
# Decoding stops at `eos_id` and at any of `stop_ids` (a chat template ends a turn with a token
# of its own); the stop token is not returned.
# ---------------------------------------------------------------------------------------------

def _check_decode_args(prompt_ids, max_new_tokens, num_beams=1):
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: generation needs at least one prompt token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _stop_set(eos_id: int, stop_ids: Iterable[int] | None) -> frozenset[int]:
    return frozenset([int(eos_id), *(int(t) for t in (stop_ids or ()))])


def _is_causal_lm(logits_fn) -> bool:
    """A transformers model, which takes past_key_values and returns them with use_cache=True."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(logits_fn, PreTrainedModel)


def _can_generate(logits_fn) -> bool:
    """A transformers causal LM with its own `generate` (an LM head, GenerationMixin)."""
    if not _is_causal_lm(logits_fn):
        return False
    from transformers import GenerationMixin

    return isinstance(logits_fn, GenerationMixin) and logits_fn.can_generate()


def _greedy_with_cache(model, prompt_ids: Sequence[int], max_new_tokens: int, stops: frozenset[int],
                       device) -> list[int]:
    """greedy_search on a transformers causal LM: the prompt once, then one token per step."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    with _inference(model):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            if len(new) == max_new_tokens:
                break
            mask = torch.ones((1, len(prompt_ids) + len(new)), dtype=torch.long, device=device)
            out = model(input_ids=ids.new_tensor([[token]]), attention_mask=mask,
                        past_key_values=out.past_key_values, use_cache=True)
    return new


def greedy_search(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int,
                  eos_id: int, stop_ids: Iterable[int] | None = None, device=None) -> list[int]:
    """Most likely next token at every step; returns the new tokens, without the eos (or stop id).

    A transformers causal LM as `logits_fn` is decoded with its KV cache (same tokens, fewer flops).
    """
    _check_decode_args(prompt_ids, max_new_tokens)
    device = _device_of(logits_fn, device)
    stops = _stop_set(eos_id, stop_ids)
    if _is_causal_lm(logits_fn):
        return _greedy_with_cache(logits_fn, prompt_ids, max_new_tokens, stops, device)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    new: list[int] = []
    with _inference(logits_fn):
        for _ in range(max_new_tokens):
            logits = _logits(logits_fn, ids, torch.ones_like(ids))
            token = int(logits[0, -1].argmax())
            if token in stops:
                break
            new.append(token)
            ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new


def beam_search(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int,
                eos_id: int, num_beams: int, length_penalty: float = 1.0,
                stop_ids: Iterable[int] | None = None, device=None) -> list[int]:
    """Beam search; returns the new tokens of the best hypothesis, without the eos (or stop id).

    The semantics of Hugging Face's beam search with ``early_stopping=True`` (what
    :func:`generate_batch` runs on a transformers model): a finished hypothesis is scored
    ``sum log p / length ** length_penalty`` (length counts the eos); an eos only finishes a
    hypothesis if it ranks among the top `num_beams` candidates of its step; search stops as soon
    as `num_beams` hypotheses have finished (the beams still running then do not compete), so
    ``num_beams=1`` is exactly greedy search. At the last step (`max_new_tokens`) the top
    `num_beams` candidates finish whatever their token. Scores add up in float64 here and in
    float32 in transformers: only near ties can rank differently.
    """
    _check_decode_args(prompt_ids, max_new_tokens, num_beams)
    device = _device_of(logits_fn, device)
    stops = _stop_set(eos_id, stop_ids)
    prompt = list(prompt_ids)
    live: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int]]] = []

    def normalized(score: float, length: int) -> float:
        return score / (max(length, 1) ** length_penalty)

    with _inference(logits_fn):
        for step in range(max_new_tokens):
            last = step == max_new_tokens - 1
            ids = torch.tensor([prompt + tokens for _, tokens in live], dtype=torch.long,
                               device=device)
            logits = _logits(logits_fn, ids, torch.ones_like(ids))[:, -1].float()
            vocab = logits.shape[-1]
            scores = torch.log_softmax(logits, dim=-1).cpu().double()
            scores += torch.tensor([s for s, _ in live], dtype=torch.float64)[:, None]
            # As many candidates as Hugging Face keeps: enough for num_beams beams that go on
            # even if every stop token of every beam ranks first.
            keep = min((1 + len(stops)) * num_beams, scores.numel())
            top_scores, flat = scores.reshape(-1).topk(keep)
            next_live = []
            for rank, (score, index) in enumerate(zip(top_scores.tolist(), flat.tolist())):
                beam, token = divmod(index, vocab)
                tokens = live[beam][1]
                if token in stops:
                    if rank < num_beams:
                        finished.append((normalized(score, len(tokens) + 1), tokens))
                else:
                    if last and rank < num_beams:  # out of steps: finished by the length limit
                        finished.append((normalized(score, len(tokens) + 1), tokens + [token]))
                    next_live.append((score, tokens + [token]))
                if len(next_live) == num_beams:
                    break
            live = next_live
            if len(finished) >= num_beams or not live:
                break
    if not finished:  # max_new_tokens == 0, or every candidate was a low-ranked stop token
        finished = [(normalized(s, len(t)), t) for s, t in live] or [(0.0, [])]
    return max(finished, key=lambda c: c[0])[1]


def generate(logits_fn: LogitsFn, prompt_ids: Sequence[int], *, max_new_tokens: int, eos_id: int,
             num_beams: int = 1, length_penalty: float = 1.0, stop_ids: Iterable[int] | None = None,
             device=None) -> list[int]:
    """Continue `prompt_ids`: greedy for ``num_beams=1``, beam search otherwise.

    Returns only the new tokens, stopping before the eos or a stop id (which is not included).
    """
    if num_beams == 1:
        return greedy_search(logits_fn, prompt_ids, max_new_tokens=max_new_tokens, eos_id=eos_id,
                             stop_ids=stop_ids, device=device)
    return beam_search(logits_fn, prompt_ids, max_new_tokens=max_new_tokens, eos_id=eos_id,
                       num_beams=num_beams, length_penalty=length_penalty, stop_ids=stop_ids,
                       device=device)


def _generation_config(*, max_new_tokens, stops, pad_id, num_beams, length_penalty):
    from transformers import GenerationConfig

    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=False,
                  num_beams=num_beams, num_return_sequences=1, eos_token_id=sorted(stops),
                  pad_token_id=int(pad_id), use_cache=True, repetition_penalty=1.0,
                  no_repeat_ngram_size=0, renormalize_logits=False, return_dict_in_generate=False)
    if num_beams > 1:
        kwargs.update(early_stopping=True, length_penalty=float(length_penalty))
    return GenerationConfig(**kwargs)


def _generate_hf(model, prompts: Sequence[Sequence[int]], *, config, pad_id: int, stops: frozenset[int],
                 device) -> list[list[int]]:
    """One left-padded batch through the model's own `generate`; the new tokens of each prompt,
    cut before its first stop token (what follows is padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    # Decoding depends on the arguments alone: none of the model's own generation_config (a
    # checkpoint's repetition penalty, suppressed tokens, sampling, ...) fills what they leave unset.
    from transformers import GenerationConfig

    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
    finally:
        model.generation_config = own
    results = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results


def _generate_sequential(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                         eos_id: int, stop_ids=None, num_beams: int = 1, length_penalty: float = 1.0,
                         device=None, progress: bool = True) -> list[list[int]]:
    """One prompt at a time through :func:`generate` (a transformers model: greedy with its KV cache
    by hand, beam search recomputing every prefix); what evaluate_generation did before batching."""
    outputs = []
    for prompt in tqdm(prompts, desc="generating", unit="source", disable=None if progress else True, leave=False):
        outputs.append(generate(logits_fn, prompt, max_new_tokens=max_new_tokens, eos_id=eos_id, num_beams=num_beams,
                                length_penalty=length_penalty, stop_ids=stop_ids, device=device))
    return outputs


def generate_batch(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                   stop_ids: Iterable[int] | None = None, pad_id: int | None = None, num_beams: int = 1,
                   length_penalty: float = 1.0, batch_size: int = 16, device=None,
                   progress: bool = True) -> list[list[int]]:
    """Continue every prompt; the new tokens of each, in the order of `prompts`, each cut before its
    first eos or stop id.

    A transformers causal LM with `generate` decodes `batch_size` prompts at a time, left-padded
    with `pad_id` (default: `eos_id`; masked out, so its value does not matter), through its own
    ``generate`` with the KV cache: greedy for ``num_beams=1``, else beam search with
    ``early_stopping=True`` (the semantics of :func:`beam_search`). Prompts are sorted by length,
    longest first, so that a batch holds prompts of similar length and pads little. transformers
    derives position ids from the attention mask (cumulative sum), so a left-padded prompt sees
    the positions it has alone. Anything else (a bare logits_fn: no KV cache) decodes one prompt
    at a time with :func:`generate`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [list(p) for p in prompts]
    for prompt in prompts:
        _check_decode_args(prompt, max_new_tokens, num_beams)
    device = _device_of(logits_fn, device)
    if not _can_generate(logits_fn):
        return _generate_sequential(logits_fn, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id,
                                    stop_ids=stop_ids, num_beams=num_beams, length_penalty=length_penalty,
                                    device=device, progress=progress)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    stops = _stop_set(eos_id, stop_ids)
    pad_id = eos_id if pad_id is None else pad_id
    config = _generation_config(max_new_tokens=max_new_tokens, stops=stops, pad_id=pad_id, num_beams=num_beams,
                                length_penalty=length_penalty)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # stable: ties keep their order
    outputs: list[list[int] | None] = [None] * len(prompts)
    with _inference(logits_fn), tqdm(total=len(prompts), desc="generating", unit="source",
                                     disable=None if progress else True, leave=False) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            new = _generate_hf(logits_fn, [prompts[i] for i in rows], config=config, pad_id=pad_id, stops=stops,
                               device=device)
            for i, tokens in zip(rows, new):
                outputs[i] = tokens
            bar.update(len(rows))
    return outputs


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


def evaluate_generation(logits_fn: LogitsFn, items: Sequence[GenerationItem] | Sequence[Example], tokenizer, *,
                        max_new_tokens: int = 64, num_beams: int = 1,
                        max_sources: int | None = None, separator: str = DEFAULT_SEPARATOR,
                        length_penalty: float = 1.0, num_samples: int = 5, batch_size: int = 16,
                        stop_ids: Iterable[int] | None = None, device=None, progress: bool = True) -> dict:
    """Decode each item's prompt once and score the hypothesis against all its references.

    `items` are :class:`GenerationItem` (one per distinct prompt, with every reference), taken in
    order (the first `max_sources` if given); a list of :class:`splitlora.data.Example` is accepted
    too and grouped by source (:func:`generation_items_from_examples` with `separator`). Decoding
    (:func:`generate_batch`, `batch_size` prompts at a time for a transformers model) stops at the
    tokenizer's eos and at any of `stop_ids`. Returns ``{"bleu", "rouge_l", "num_sources",
    "samples", "outputs"}``: BLEU and ROUGE-L on a 0-100 scale; every item's output as a dict with
    source (the item's key), hypothesis and references ("outputs", what a significance test needs),
    and the first `num_samples` of them ("samples").
    """
    items = list(items)
    if items and all(isinstance(x, Example) for x in items):
        items = generation_items_from_examples(items, tokenizer, separator)
    elif not all(isinstance(x, GenerationItem) for x in items):
        kinds = sorted({type(x).__name__ for x in items})
        raise TypeError(f"evaluate_generation takes GenerationItem or Example objects, got {kinds}")
    if max_sources is not None:
        if max_sources < 1:
            raise ValueError(f"max_sources must be >= 1 or None, got {max_sources}")
        items = items[:max_sources]
    if not items:
        raise ValueError("evaluate_generation got no examples")
    new = generate_batch(logits_fn, [item.prompt_ids for item in items], max_new_tokens=max_new_tokens,
                         eos_id=tokenizer.eos_id, stop_ids=stop_ids, pad_id=getattr(tokenizer, "pad_id", None),
                         num_beams=num_beams, length_penalty=length_penalty, batch_size=batch_size, device=device,
                         progress=progress)
    hypotheses = [tokenizer.decode(tokens).strip() for tokens in new]
    refs = [list(item.references) for item in items]
    scores = score_corpus(hypotheses, refs)
    outputs = [{"source": item.key, "hypothesis": h, "references": r} for item, h, r in zip(items, hypotheses, refs)]
    return {**scores, "num_sources": len(items), "samples": outputs[:num_samples], "outputs": outputs}
