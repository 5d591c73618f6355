"""bench.privacy_attacks: the two reconstruction attacks on a tiny split model, and their scores.

Properties, not fixed numbers: with no defence the attacks recover far more tokens than guessing the
most frequent token would; with strong noise at the cut they recover strictly less.
"""
from collections import Counter

import pytest
import torch

from bench.privacy_attacks import (Defence, InversionAttack, bottom_from_embeddings, cut_activations,
                                   example_norms, optimisation_attack, rouge_l_ids, token_accuracy,
                                   token_embedding)
from splitlora.data import WordTokenizer, synthetic_examples, tokenize
from splitlora.evaluate import rouge_l
from splitlora.models import load_causal_lm
from splitlora.split import ClientSegment


def test_token_accuracy_counts_only_masked_positions():
    pred = torch.tensor([[1, 2, 3, 9], [4, 5, 0, 0]])
    true = torch.tensor([[1, 2, 7, 9], [4, 6, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # real positions: 6; right: 1, 2, 9, 4 -> 4 of 6 (the padded mismatches do not count)
    assert token_accuracy(pred, true, mask) == pytest.approx(4 / 6)
    assert token_accuracy(pred, true) == pytest.approx(4 / 8)
    with pytest.raises(ValueError):
        token_accuracy(pred[:, :2], true)


def test_rouge_l_by_hand():
    # LCS of a b c d e and a x c e: a c e = 3; P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3
    assert rouge_l_ids("abcde", "axce") == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert rouge_l_ids([1, 2, 3], [1, 2, 3]) == 1.0
    assert rouge_l_ids([1, 2], [3, 4]) == 0.0
    assert rouge_l_ids([], [1]) == 0.0
    # the text form (what the benchmark reports): words, lowercased
    assert rouge_l("The cat sat", "the cat sat down") == pytest.approx(2 * 1.0 * 0.75 / 1.75)


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer GPT-2 cut after layer 1, the synthetic restaurant texts as the client's
    private data and as the attacker's disjoint public data (no shared meaning representation)."""
    torch.manual_seed(0)
    private = synthetic_examples(48, seed=1)
    seen = {e.source for e in private}
    public = [e for e in synthetic_examples(300, seed=2) if e.source not in seen][:200]
    tok = WordTokenizer.from_examples(private + public)
    model, _ = load_causal_lm(config={"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4,
                                      "n_positions": 64, "vocab_size": tok.vocab_size,
                                      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, seed=0)
    client = ClientSegment(model, 1)
    pub = tokenize(public, tok, 48)
    priv = tokenize(private, tok, 48)
    pub_acts = cut_activations(client, pub.input_ids, pub.attention_mask)
    priv_acts = cut_activations(client, priv.input_ids, priv.attention_mask)
    clip = float(example_norms(pub_acts, pub.attention_mask).median())
    ids, mask = priv.input_ids, priv.attention_mask
    counts = Counter(ids[mask.bool()].tolist())
    majority = counts.most_common(1)[0][1] / int(mask.sum())
    return dict(client=client, pub=pub, pub_acts=pub_acts, ids=ids, mask=mask, acts=priv_acts,
                clip=clip, majority=majority)


def _inversion_accuracy(t, defence):
    gen = torch.Generator().manual_seed(1)
    observed = defence.apply(t["acts"], t["mask"], gen)
    _, emb = token_embedding(t["client"])
    attack = InversionAttack(emb.weight, t["acts"].shape[-1], hidden=128, epochs=10, seed=0)
    attack.fit(t["pub_acts"], t["pub"].input_ids, t["pub"].attention_mask, defence)
    return token_accuracy(attack.predict(observed), t["ids"], t["mask"])


def test_inversion_recovers_tokens_and_strong_noise_stops_it(tiny):
    clean = _inversion_accuracy(tiny, Defence("none"))
    noisy = _inversion_accuracy(tiny, Defence("noise", "noise", noise_multiplier=1.0, clip=tiny["clip"]))
    # Chance is about 1/vocab; guessing the most frequent token everywhere gets `majority`.
    assert clean > 0.6 and clean > 3 * tiny["majority"], (clean, tiny["majority"])
    assert noisy < clean - 0.3, (clean, noisy)


def test_optimisation_attack_recovers_tokens_and_strong_noise_stops_it(tiny):
    n = 8
    acts, mask, ids = tiny["acts"][:n], tiny["mask"][:n], tiny["ids"][:n]
    clean = token_accuracy(optimisation_attack(tiny["client"], acts, mask, steps=80, lr=0.1), ids, mask)
    strong = Defence("noise", "noise", noise_multiplier=1.0, clip=tiny["clip"])
    observed = strong.apply(acts, mask, torch.Generator().manual_seed(3))
    noisy = token_accuracy(optimisation_attack(tiny["client"], observed, mask, steps=80, lr=0.1), ids, mask)
    assert clean > 0.5 and clean > 3 * tiny["majority"], (clean, tiny["majority"])
    assert noisy < clean - 0.3, (clean, noisy)
    # the attack leaves the client's own parameters and embedding module as they were
    assert all(not p.requires_grad or p.grad is None for p in tiny["client"].parameters())
    assert isinstance(token_embedding(tiny["client"])[1], torch.nn.Embedding)


def test_bottom_from_embeddings_matches_token_forward(tiny):
    client, ids, mask = tiny["client"], tiny["ids"][:4], tiny["mask"][:4]
    _, emb = token_embedding(client)
    with torch.no_grad():
        expected = client(ids, mask)
        with bottom_from_embeddings(client, emb(ids)):
            got = client(torch.zeros_like(ids), mask)
    torch.testing.assert_close(got, expected)


def test_defences_change_activations_as_specified(tiny):
    acts, mask = tiny["acts"][:6], tiny["mask"][:6]
    assert Defence("none").apply(acts, mask) is acts
    clipped = Defence("clip", "noise", noise_multiplier=0.0, clip=1.0).apply(acts, mask)
    assert torch.all(example_norms(clipped, mask) <= 1.0 + 1e-4)
    int4 = Defence("int4", "codec", bits=4).apply(acts, mask)
    int8 = Defence("int8", "codec", bits=8).apply(acts, mask)
    assert 0 < (int8 - acts).abs().max() < (int4 - acts).abs().max()
    with pytest.raises(ValueError):
        Defence("noise", "noise", noise_multiplier=1.0).apply(acts, mask)  # no clip set


def test_stand_in_clips_as_the_package_does():
    """The benchmark's stand-in (used only where splitlora.privacy is missing) clips like the package."""
    privacy = pytest.importorskip("splitlora.privacy")
    from bench.privacy_attacks import _clip_and_noise_reference

    x = torch.randn(3, 5, 4) * 3
    mask = torch.ones(3, 5)
    mask[0, 3:] = 0
    torch.testing.assert_close(_clip_and_noise_reference(x, 2.0, 0.0, mask=mask),
                               privacy.clip_and_noise(x, 2.0, 0.0, mask=mask))
    noisy = _clip_and_noise_reference(x, 2.0, 1.0, generator=torch.Generator().manual_seed(0), mask=mask)
    assert torch.all(noisy[0, 3:] == 0)  # padding gets no noise
    assert 1.5 < float((noisy - _clip_and_noise_reference(x, 2.0, 0.0, mask=mask))[mask.bool()].std()) < 2.5
