"""splitlora.evaluate: loss, decoding, BLEU and ROUGE-L, checked against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from splitlora.data import DEFAULT_SEPARATOR, load_tokenizer, synthetic_examples, tokenize
from splitlora.data.records import GenerationItem, generation_items_from_examples
from splitlora.evaluate import (
    beam_search,
    corpus_bleu,
    evaluate_generation,
    evaluate_loss,
    generate,
    generate_batch,
    greedy_search,
    lcs_length,
    rouge_l,
    score_corpus,
)

VOCAB = 128


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Models here are tiny: intra-op threads only add synchronisation, which on a busy machine
    # costs 20x (measured: 50 forwards 5.3 s with 2 threads under load, 0.23 s with 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TinyLM(torch.nn.Module):
    """A random GPT-2 seen as logits_fn(input_ids, attention_mask)."""

    def __init__(self, dropout=0.0, seed=0):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        # A large init spread keeps greedy rollouts of a random model from repeating one token.
        config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=VOCAB,
                            bos_token_id=0, eos_token_id=1, initializer_range=0.5,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        self.model = GPT2LMHeadModel(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.fixture(scope="module")
def tiny_lm():
    return TinyLM().eval()


@pytest.fixture(scope="module")
def synthetic():
    examples = synthetic_examples(12, seed=4)
    tok = load_tokenizer(None, synthetic_examples(400, seed=4))
    assert tok.vocab_size <= VOCAB
    return examples, tok


# ---------------------------------------------------------------------------------------------
# evaluate_loss
# ---------------------------------------------------------------------------------------------


def test_evaluate_loss_matches_hand_computation(tiny_lm, synthetic):
    examples, tok = synthetic
    ds = tokenize(examples, tok, max_length=128)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):  # one example at a time, untrimmed padding: a different path
            logits = tiny_lm(ds.input_ids[i:i + 1], ds.attention_mask[i:i + 1])[0]
            labels = ds.labels[i]
            keep = labels[1:] != -100
            total += F.cross_entropy(logits[:-1][keep], labels[1:][keep], reduction="sum").item()
            count += int(keep.sum())
    expected = total / count
    for batch_size in (1, 5, 16):
        result = evaluate_loss(tiny_lm, ds, batch_size=batch_size)
        assert result["tokens"] == count == int(ds.num_target_tokens.sum())
        assert result["loss"] == pytest.approx(expected, rel=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    # Token-weighted, not a mean of per-example means.
    per_example = [evaluate_loss(tiny_lm, ds.subset([i]))["loss"] for i in range(len(ds))]
    assert abs(sum(per_example) / len(per_example) - expected) > 1e-6


def test_evaluate_loss_eval_mode_and_restores_training(synthetic):
    examples, tok = synthetic
    ds = tokenize(examples, tok, max_length=128)
    model = TinyLM(dropout=0.5).train()
    first = evaluate_loss(model, ds)["loss"]
    assert model.training  # put back as found
    assert evaluate_loss(model, ds)["loss"] == first  # dropout was off: deterministic
    with torch.no_grad():
        expected = evaluate_loss(lambda i, m: model.eval()(i, m), ds)["loss"]
    assert first == pytest.approx(expected, rel=1e-6)


def test_evaluate_loss_rejects_bad_logits(synthetic):
    examples, tok = synthetic
    ds = tokenize(examples, tok, max_length=128)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        evaluate_loss(lambda ids, mask: torch.zeros(ids.shape[0], VOCAB), ds)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def _argmax_rollout(model, prompt, steps):
    """Greedy continuation by Hugging Face's generate (KV cache): an independent implementation."""
    ids = torch.tensor([prompt])
    out = model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                               min_new_tokens=steps, do_sample=False, num_beams=1,
                               eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("prompt", [[5], [3, 9, 17, 2], list(range(10, 30))])
def test_greedy_equals_argmax_rollout(tiny_lm, prompt):
    steps = 12
    reference = _argmax_rollout(tiny_lm, prompt, steps)
    assert len(set(reference)) > 2  # a rollout that actually varies
    never = next(t for t in range(VOCAB) if t not in reference)
    assert greedy_search(tiny_lm, prompt, max_new_tokens=steps, eos_id=never) == reference
    assert generate(tiny_lm, prompt, max_new_tokens=5, eos_id=never) == reference[:5]
    # Stops at the first eos, which is not returned.
    eos = reference[4]
    cut = reference.index(eos)
    assert generate(tiny_lm, prompt, max_new_tokens=steps, eos_id=eos) == reference[:cut]
    # Beam search with one beam is greedy search.
    for eos_id in (never, eos):
        assert beam_search(tiny_lm, prompt, max_new_tokens=steps, eos_id=eos_id, num_beams=1) == \
            greedy_search(tiny_lm, prompt, max_new_tokens=steps, eos_id=eos_id)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=1, initializer_range=0.5)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_model_as_logits_fn_decodes_with_its_cache(tiny_lm, synthetic, arch):
    # A transformers causal LM passed as it is: greedy search takes the KV-cache path and must
    # give Hugging Face's own greedy rollout; the other paths call it by keyword (GPT-2's forward
    # takes past_key_values second) and must agree with the same model behind a plain function.
    model = tiny_lm.model if arch == "gpt2" else _tiny_llama()
    plain = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    prompt, steps = [3, 9, 17, 2], 12
    reference = _argmax_rollout(type("Wrapped", (), {"model": model})(), prompt, steps)
    assert len(set(reference)) > 2
    never = next(t for t in range(VOCAB) if t not in reference)
    lengths = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        assert greedy_search(model, prompt, max_new_tokens=steps, eos_id=never) == reference
    finally:
        hook.remove()
    assert lengths == [len(prompt)] + [1] * (steps - 1)  # the prompt once, then one token per forward
    assert greedy_search(plain, prompt, max_new_tokens=steps, eos_id=never) == reference
    assert greedy_search(model, prompt, max_new_tokens=5, eos_id=never) == reference[:5]
    assert greedy_search(model, prompt, max_new_tokens=0, eos_id=never) == []
    eos = reference[4]
    assert greedy_search(model, prompt, max_new_tokens=steps, eos_id=eos) == reference[:reference.index(eos)]
    assert beam_search(model, prompt, max_new_tokens=6, eos_id=never, num_beams=3) == \
        beam_search(plain, prompt, max_new_tokens=6, eos_id=never, num_beams=3)
    examples, tok = synthetic
    dataset = tokenize(examples, tok, max_length=48)
    assert evaluate_loss(model, dataset, batch_size=4)["loss"] == pytest.approx(
        evaluate_loss(plain, dataset, batch_size=4)["loss"], rel=1e-6)


class TransitionTable:
    """logits_fn whose next-token distribution depends only on the last token."""

    def __init__(self, table):
        probs = torch.tensor(table, dtype=torch.float64)
        self.log_probs = torch.where(probs > 0, probs.log(), torch.full_like(probs, -1e9)).float()
        self.calls = 0

    def __call__(self, input_ids, attention_mask):
        self.calls += 1
        return self.log_probs[input_ids]


# Tokens: 0 eos, 1 A, 2 B, 3 C, 4 D, 5 start. Greedy takes A (0.6) then C (0.36): p = 0.216.
# B (0.4) then eos (1.0): p = 0.4, the better sequence, which needs a second beam to find.
TABLE = [
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # eos (unused)
    [0.30, 0.0, 0.0, 0.36, 0.34, 0.0],  # A
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # B -> eos
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # C -> eos
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # D -> eos
    [0.0, 0.6, 0.4, 0.0, 0.0, 0.0],  # start
]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_what_greedy_misses(length_penalty):
    fn = TransitionTable(TABLE)
    assert generate(fn, [5], max_new_tokens=10, eos_id=0) == [1, 3]
    assert generate(fn, [5], max_new_tokens=10, eos_id=0, num_beams=2,
                    length_penalty=length_penalty) == [2]
    assert beam_search(fn, [5], max_new_tokens=10, eos_id=0, num_beams=1) == [1, 3]


def test_beam_search_without_eos_stops_at_max_new_tokens():
    # A cycle 1 -> 2 -> 1 with no way to eos: the unfinished best beam is returned.
    table = [[1.0, 0.0, 0.0], [0.0, 0.1, 0.9], [0.0, 0.8, 0.2]]
    fn = TransitionTable(table)
    out = beam_search(fn, [1], max_new_tokens=6, eos_id=0, num_beams=3)
    assert out == [2, 1, 2, 1, 2, 1]
    assert greedy_search(fn, [1], max_new_tokens=6, eos_id=0) == out
    assert fn.calls == 12  # 6 steps each; no KV cache, one call a step
    assert generate(fn, [1], max_new_tokens=0, eos_id=0) == []
    with pytest.raises(ValueError, match="prompt"):
        generate(fn, [], max_new_tokens=3, eos_id=0)


def test_beam_search_stops_when_num_beams_have_finished():
    # Hugging Face's early_stopping=True: once num_beams hypotheses have finished, the beams still
    # running do not compete. Tokens: 0 eos, 1 start, 2 X, 3 Y, 4 Z. Step 1: eos (p 0.5) finishes
    # [] (score log 0.5 / 1 = -0.69); X, Y run on. Step 2: X Z (0.27) runs on, Y eos (0.2) finishes
    # [Y] (log 0.2 / 2 = -0.80): two finished, search over. [X, Z] would score log 0.27 / 2 = -0.65
    # had it been let to compete.
    table = [[1.0, 0, 0, 0, 0], [0.5, 0, 0.3, 0.2, 0], [0.1, 0, 0, 0, 0.9], [1.0, 0, 0, 0, 0],
             [1.0, 0, 0, 0, 0]]
    assert beam_search(TransitionTable(table), [1], max_new_tokens=10, eos_id=0, num_beams=2) == []
    # Out of steps at step 2, the top num_beams candidates finish whatever their token: [X, Z] too, and wins.
    assert beam_search(TransitionTable(table), [1], max_new_tokens=2, eos_id=0, num_beams=2) == [2, 4]


# ---------------------------------------------------------------------------------------------
# Batched generation (generate_batch) against one prompt at a time
# ---------------------------------------------------------------------------------------------

# Prompts of different lengths, in no length order: batches are left-padded and sorted by length.
PROMPT_LENGTHS = (6, 1, 13, 3, 9, 4, 21)


def _model(arch):
    return TinyLM().model.eval() if arch == "gpt2" else _tiny_llama()


def _prompts(seed=7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def _some_stop_early(model, prompts, steps):
    """An eos that ends some greedy rollouts before `steps` new tokens and not others."""
    rollouts = [greedy_search(model, p, max_new_tokens=steps, eos_id=VOCAB) for p in prompts]
    for token in dict.fromkeys(t for r in rollouts for t in r):
        if 2 <= sum(token in r for r in rollouts) <= len(rollouts) - 2:
            return token
    raise AssertionError("no token ends some rollouts and not others")


def _batch_sizes(model, calls):
    """Record the batch size of every forward of `model` into `calls`; returns the hook."""
    return model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_greedy_equals_one_at_a_time(arch):
    model, prompts, steps = _model(arch), _prompts(), 16
    eos = _some_stop_early(model, prompts, steps)
    reference = [greedy_search(model, p, max_new_tokens=steps, eos_id=eos) for p in prompts]
    assert 0 < sum(len(r) < steps for r in reference) < len(prompts)  # some stop at the eos, some run out
    for batch_size in (1, 3, len(prompts) + 2):
        calls = []
        hook = _batch_sizes(model, calls)
        try:
            out = generate_batch(model, prompts, max_new_tokens=steps, eos_id=eos, pad_id=0, batch_size=batch_size)
        finally:
            hook.remove()
        assert out == reference, batch_size  # exactly the same ids, in the order of the prompts
        assert max(calls) == min(batch_size, len(prompts))  # decoded in batches, not one at a time
    # The pad id is masked out: another one changes nothing.
    assert generate_batch(model, prompts, max_new_tokens=steps, eos_id=eos, pad_id=eos, batch_size=4) == reference
    assert generate_batch(model, prompts, max_new_tokens=0, eos_id=eos, batch_size=4) == [[]] * len(prompts)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_batched_beam_search_equals_beam_search(arch, length_penalty):
    # transformers' beam search (early_stopping=True) against beam_search recomputing every
    # prefix of one prompt with the same model behind a plain function: the same hypotheses.
    model, prompts, steps = _model(arch), _prompts(), 10
    plain = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    eos = _some_stop_early(model, prompts, steps)
    reference = [beam_search(plain, p, max_new_tokens=steps, eos_id=eos, num_beams=3, length_penalty=length_penalty)
                 for p in prompts]
    greedy = [greedy_search(model, p, max_new_tokens=steps, eos_id=eos) for p in prompts]
    assert reference != greedy  # beam search finds other hypotheses here: the comparison means something
    for batch_size in (1, 3, len(prompts) + 2):
        out = generate_batch(model, prompts, max_new_tokens=steps, eos_id=eos, pad_id=0, num_beams=3,
                             length_penalty=length_penalty, batch_size=batch_size)
        assert out == reference, batch_size


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_stop_ids_end_a_hypothesis(arch):
    model, prompts, steps = _model(arch), _prompts(), 12
    never = VOCAB  # no such token: only the stop ids end a rollout
    free = [greedy_search(model, p, max_new_tokens=steps, eos_id=never) for p in prompts]
    stops = {free[0][3], free[2][5]}

    def cut(tokens):
        return next((tokens[:i] for i, t in enumerate(tokens) if t in stops), tokens)

    expected = [cut(r) for r in free]
    assert len(expected[0]) <= 3 and expected != free  # both cut rollouts short
    plain = lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
    assert [greedy_search(model, p, max_new_tokens=steps, eos_id=never, stop_ids=stops) for p in prompts] == expected
    assert [greedy_search(plain, p, max_new_tokens=steps, eos_id=never, stop_ids=stops) for p in prompts] == expected
    for fn in (model, plain):  # batched through generate, and one at a time without a cache
        assert generate_batch(fn, prompts, max_new_tokens=steps, eos_id=never, stop_ids=stops, pad_id=0,
                              batch_size=3) == expected
    # Beam search stops at them too (one beam: greedy), and treats them as it treats the eos.
    assert [beam_search(plain, p, max_new_tokens=steps, eos_id=never, num_beams=1, stop_ids=stops)
            for p in prompts] == expected
    eos, other = sorted(stops)
    assert generate_batch(model, prompts, max_new_tokens=steps, eos_id=eos, stop_ids=[other], num_beams=3,
                          batch_size=4) == \
        [beam_search(plain, p, max_new_tokens=steps, eos_id=other, stop_ids=[eos], num_beams=3) for p in prompts]


def test_evaluate_generation_batched_keeps_order_and_equals_one_at_a_time(synthetic):
    from transformers import GPT2Config, GPT2LMHeadModel

    examples, tok = synthetic
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=tok.vocab_size,
                                       bos_token_id=tok.eos_id, eos_token_id=tok.eos_id,
                                       initializer_range=0.5)).eval()
    items = generation_items_from_examples(examples, tok)
    assert len({len(i.prompt_ids) for i in items}) > 2  # prompts of several lengths
    reference = [tok.decode(greedy_search(model, i.prompt_ids, max_new_tokens=10, eos_id=tok.eos_id)).strip()
                 for i in items]
    for batch_size in (1, 4, len(items) + 1):
        result = evaluate_generation(model, items, tok, max_new_tokens=10, batch_size=batch_size)
        assert [o["source"] for o in result["outputs"]] == [i.key for i in items]
        assert [o["hypothesis"] for o in result["outputs"]] == reference
        assert [o["references"] for o in result["outputs"]] == [list(i.references) for i in items]
    # max_sources takes the first items.
    first = evaluate_generation(model, items, tok, max_new_tokens=10, max_sources=3, batch_size=2)
    assert first["num_sources"] == 3 and [o["hypothesis"] for o in first["outputs"]] == reference[:3]


def test_evaluate_generation_takes_items_and_examples(synthetic):
    examples, tok = synthetic
    second = [type(e)(e.source, "It is a place .", e.group) for e in examples]
    data = [x for pair in zip(examples, second) for x in pair]
    oracle = Oracle(data, tok)
    items = generation_items_from_examples(data, tok)
    assert all(isinstance(i, GenerationItem) for i in items) and len(items) == len(examples)
    from_items = evaluate_generation(oracle, items, tok, max_new_tokens=64)
    from_examples = evaluate_generation(oracle, data, tok, max_new_tokens=64)
    assert from_items == from_examples
    # An item's key names it in the outputs; its prompt is what is decoded.
    renamed = [GenerationItem(f"mr {n}", i.prompt_ids, i.references) for n, i in enumerate(items)]
    out = evaluate_generation(oracle, renamed, tok, max_new_tokens=64)["outputs"]
    assert [o["source"] for o in out] == [f"mr {n}" for n in range(len(items))]
    assert [o["hypothesis"] for o in out] == [o["hypothesis"] for o in from_items["outputs"]]
    # Stop ids end a hypothesis on this path (a bare logits_fn) too.
    stop = tok.encode(" " + examples[0].target)[2]
    stopped = evaluate_generation(oracle, items[:1], tok, max_new_tokens=64, stop_ids=[stop])
    assert stopped["outputs"][0]["hypothesis"] == tok.decode(tok.encode(" " + examples[0].target)[:2]).strip()
    with pytest.raises(TypeError, match="GenerationItem or Example"):
        evaluate_generation(oracle, [items[0], data[0]], tok)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_generation(oracle, [], tok)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0
    assert lcs_length([1, 2, 3], [1, 2, 3]) == 3
    assert lcs_length("abc", "xyz") == 0
    assert lcs_length("axbycz", "abc") == 3


def test_rouge_l_hand_examples():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("dogs bark", "the cat sat") == 0.0
    # LCS 5 of hypothesis 5 and reference 6 tokens: P = 1, R = 5/6, F1 = 10/11.
    assert rouge_l("the cat on the mat", "the cat sat on the mat") == pytest.approx(10 / 11)
    # P = 2/4, R = 2/3: F1 = 4/7. Case and punctuation are tokens too.
    assert rouge_l("A cat sits .", "a dog , cat") == pytest.approx(
        2 * (2 / 4) * (2 / 4) / (2 / 4 + 2 / 4))
    assert rouge_l("the cat", ["dogs", "the cat"]) == 1.0  # best reference
    assert rouge_l("", "the cat") == 0.0


def test_bleu_of_references_against_themselves():
    refs = [["The Eagle is a pub near Cafe Rouge .", "A pub called The Eagle ."],
            ["Aromi is a cheap coffee shop in the city centre ."],
            ["Zizzi serves French food .", "French food at Zizzi .", "Zizzi : French food ."]]
    assert corpus_bleu([r[0] for r in refs], refs) == pytest.approx(100.0)
    assert corpus_bleu([r[-1] for r in refs], refs) == pytest.approx(100.0)  # any reference
    scores = score_corpus([r[0] for r in refs], refs)
    assert scores == {"bleu": pytest.approx(100.0), "rouge_l": pytest.approx(100.0)}
    worse = score_corpus(["The Eagle is a pub .", "Aromi is a coffee shop .", "Zizzi ."], refs)
    assert 0 < worse["bleu"] < 100 and 0 < worse["rouge_l"] < 100
    with pytest.raises(ValueError):
        corpus_bleu(["a"], [])


class Oracle:
    """logits_fn that continues each known prompt with its first reference, then eos."""

    def __init__(self, examples, tok, separator=DEFAULT_SEPARATOR):
        self.continuations = {}
        for e in examples:
            prompt = tuple(tok.encode(e.source + separator))
            self.continuations.setdefault(prompt, tok.encode(" " + e.target) + [tok.eos_id])
        self.vocab, self.eos_id = tok.vocab_size, tok.eos_id

    def __call__(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            for prompt, completion in self.continuations.items():
                if tuple(ids[:len(prompt)]) == prompt:
                    done = ids[len(prompt):]
                    on_path = done == completion[:len(done)] and len(done) < len(completion)
                    # Off the reference path (a lower beam): end the hypothesis.
                    logits[row, -1, completion[len(done)] if on_path else self.eos_id] = 10.0
                    break
            else:
                raise AssertionError(f"unexpected prompt {ids}")
        return logits


def test_evaluate_generation_multi_reference(synthetic):
    examples, tok = synthetic
    # A second, different reference for every source: hypotheses match the first one.
    second = [type(e)(e.source, "It is a place .", e.group) for e in examples]
    data = [x for pair in zip(examples, second) for x in pair]
    oracle = Oracle(data, tok)
    result = evaluate_generation(oracle, data, tok, max_new_tokens=64)
    assert result["num_sources"] == len(examples)
    assert result["bleu"] == pytest.approx(100.0)
    assert result["rouge_l"] == pytest.approx(100.0)
    sample = result["samples"][0]
    assert sample == {"source": examples[0].source, "hypothesis": examples[0].target,
                      "references": [examples[0].target, "It is a place ."]}
    # Every source's output is returned (the samples are its first few), and rescoring them gives
    # the reported BLEU: what a significance test on the outputs starts from.
    outputs = result["outputs"]
    assert len(outputs) == len(examples) and outputs[:len(result["samples"])] == result["samples"]
    assert corpus_bleu([o["hypothesis"] for o in outputs], [o["references"] for o in outputs]) == \
        pytest.approx(result["bleu"], abs=1e-9)
    # Beam search reaches the same answers; max_sources limits the work.
    limited = evaluate_generation(oracle, data, tok, num_beams=3, max_sources=4)
    assert limited["num_sources"] == 4 and limited["bleu"] == pytest.approx(100.0)
    # Too few new tokens: truncated hypotheses score lower.
    short = evaluate_generation(oracle, data, tok, max_new_tokens=4)
    assert short["samples"][0]["hypothesis"] == tok.decode(tok.encode(" " + examples[0].target)[:4]).strip()
    assert short["bleu"] < 90 and short["rouge_l"] < 70
