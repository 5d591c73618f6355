"""Sequence packing (data.packing): several whole examples per row, attention kept within each.

Packed rows must give the same logits, loss and gradients as the same examples unpacked: for the
whole transformers model, for the split segments (also across the wire), and for the strategies.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from splitlora.data import IGNORE_INDEX, ClientLoader, TokenizedDataset
from splitlora.data.packing import example_lengths, pack_client_datasets, pack_indices, pack_rows
from splitlora.split import split_model, split_model_u_shape
from splitlora.strategies.base import causal_lm_loss, concat_right_padded, mask_kwargs, mask_meta
from splitlora.wire import pack_tensors, unpack_tensors

VOCAB = 128
PAD = 0


def _model(kind: str, attn: str, layers: int = 3):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(n_layer=layers, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB,
                            bos_token_id=1, eos_token_id=1, pad_token_id=PAD)
    else:
        config = LlamaConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64, vocab_size=VOCAB,
                             bos_token_id=1, eos_token_id=1, pad_token_id=PAD)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).float().eval()
    model.config.use_cache = False
    return model


def _dataset(lengths, prompt_lengths, seed=0) -> TokenizedDataset:
    """Right-padded examples of random tokens; labels on the tokens after each prompt (a prompt of
    0 puts a label on the first token, which no position predicts)."""
    g = torch.Generator().manual_seed(seed)
    n, width = len(lengths), max(lengths) + 2
    input_ids = torch.full((n, width), PAD, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (m, p) in enumerate(zip(lengths, prompt_lengths)):
        input_ids[i, :m] = torch.randint(1, VOCAB, (m,), generator=g)
        attention_mask[i, :m] = 1
        labels[i, p:m] = input_ids[i, p:m]
    return TokenizedDataset(input_ids, attention_mask, labels, (labels != IGNORE_INDEX).sum(1),
                            torch.zeros(n, dtype=torch.bool))


# Lengths 1..13, some with no prompt (a label on the first token); 12 examples.
LENGTHS = [5, 9, 3, 13, 1, 7, 4, 11, 6, 2, 8, 10]
PROMPTS = [2, 0, 1, 4, 0, 3, 0, 5, 2, 1, 3, 0]
MAX_LENGTH = 16


def _packed(ds, max_length=MAX_LENGTH):
    groups = pack_indices(example_lengths(ds).tolist(), max_length)
    return groups, pack_rows(ds, groups)


def _spans(groups, lengths):
    """(row, start, example) of every example in the packed rows."""
    out = []
    for r, g in enumerate(groups):
        at = 0
        for i in g:
            out.append((r, at, i))
            at += lengths[i]
    return out


def _sum_loss(logits, labels):
    """Summed next-token cross-entropy and the number of predicted labels."""
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((shift_labels != IGNORE_INDEX).sum())


# -- packing itself -------------------------------------------------------------------------------------


def test_pack_indices_covers_every_example_once_within_max_length():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(500)]
    rows = pack_indices(lengths, 64)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))  # every example exactly once, none split
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    # Packing is worth it: far fewer rows than examples, close to the lower bound.
    assert len(rows) <= 1.05 * sum(lengths) / 64 + 1 < len(lengths) / 3
    assert pack_indices(lengths, 64) == rows  # deterministic


def test_pack_indices_rejects_an_example_longer_than_max_length():
    with pytest.raises(ValueError, match=r"example 2 has 17 tokens, more than max_length=16"):
        pack_indices([3, 4, 17, 2], 16)
    assert pack_indices([16, 16], 16) == [[0], [1]]  # exactly max_length fits


def test_pack_client_datasets_keeps_clients_apart_and_every_example_whole():
    ds = _dataset(LENGTHS, PROMPTS)
    lengths = example_lengths(ds).tolist()
    assert lengths == LENGTHS
    shards = [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    packed = pack_client_datasets(ds, shards, MAX_LENGTH)
    assert len(packed) == 2
    width = packed[0].seq_len
    assert packed[1].seq_len == width <= MAX_LENGTH  # one common width
    for shard, p in zip(shards, packed):
        assert p.packed and len(p) < len(shard)
        found = []
        for r in range(len(p)):
            ids, pos, mask, lab = p.input_ids[r], p.position_ids[r], p.attention_mask[r], p.labels[r]
            real = int(mask.sum())
            assert torch.equal(mask[:real], torch.ones(real, dtype=torch.long)) and int(mask[real:].sum()) == 0
            starts = [t for t in range(real) if pos[t] == 0] + [real]
            for a, b in zip(starts, starts[1:]):
                assert torch.equal(pos[a:b], torch.arange(b - a))  # positions restart at each example
                matches = [i for i in range(len(ds))
                           if lengths[i] == b - a and torch.equal(ds.input_ids[i, :b - a], ids[a:b])]
                assert len(matches) == 1
                i = matches[0]
                found.append(i)
                expected = ds.labels[i, :b - a].clone()
                expected[0] = IGNORE_INDEX
                assert torch.equal(lab[a:b], expected)
            assert torch.equal(pos[real:], torch.arange(width - real))  # the padding: a block of its own
            assert bool((lab[real:] == IGNORE_INDEX).all())
        assert sorted(found) == sorted(shard)  # every example of this client once, no other client's
        assert int(p.num_target_tokens.sum()) == int((p.labels != IGNORE_INDEX).sum())


def test_pack_client_datasets_too_long_example_errors_clearly():
    ds = _dataset(LENGTHS, PROMPTS)
    with pytest.raises(ValueError, match=r"client 1: example 3 has 13 tokens, more than max_length=12"):
        pack_client_datasets(ds, [[0, 2], [1, 3]], 12)
    with pytest.raises(ValueError, match="already packed"):
        pack_client_datasets(pack_client_datasets(ds, [list(range(12))], 16)[0], [[0]], 16)


def test_packed_batches_subset_and_loader_carry_position_ids():
    ds = _dataset(LENGTHS, PROMPTS)
    assert "position_ids" not in ds.batch([0, 1])  # unpacked batches are as before
    unpacked = ds.batch([0, 1])
    assert mask_kwargs([unpacked]) == {"attention_mask": unpacked["attention_mask"]}
    assert mask_kwargs([unpacked])["attention_mask"] is unpacked["attention_mask"]
    assert mask_meta(unpacked).keys() == {"attention_mask"}
    packed = pack_client_datasets(ds, [list(range(12))], 32)[0]
    sub = packed.subset([1, 0])
    assert torch.equal(sub.position_ids, packed.position_ids[[1, 0]])
    loader = ClientLoader(packed, range(len(packed)), 2, seed=3, trim=True)
    batch = loader.next_batch()
    assert batch.keys() == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert batch["position_ids"].shape == batch["input_ids"].shape
    kwargs = mask_kwargs([batch])
    assert kwargs["attention_mask"] is None and kwargs["position_ids"] is batch["position_ids"]
    with pytest.raises(ValueError, match="packed and unpacked"):
        mask_kwargs([batch, unpacked])


# -- the models: packed rows give the unpacked examples' logits, loss and gradients ----------------------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_whole_model_packed_equals_unpacked(kind, attn):
    model = _model(kind, attn)
    ds = _dataset(LENGTHS, PROMPTS)
    groups, packed = _packed(ds)
    assert len(packed) < len(ds)
    pb = packed.batch(range(len(packed)))
    ub = ds.batch(range(len(ds)))

    model.zero_grad()
    logits_p = model(input_ids=pb["input_ids"], use_cache=False, **mask_kwargs([pb])).logits
    loss_p, count_p = _sum_loss(logits_p, pb["labels"])
    loss_p.backward()
    grads_p = {n: p.grad.clone() for n, p in model.named_parameters()}
    mean_p = causal_lm_loss(logits_p, pb["labels"])

    model.zero_grad()
    logits_u = model(input_ids=ub["input_ids"], attention_mask=ub["attention_mask"], use_cache=False).logits
    loss_u, count_u = _sum_loss(logits_u, ub["labels"])
    loss_u.backward()
    grads_u = {n: p.grad.clone() for n, p in model.named_parameters()}
    mean_u = causal_lm_loss(logits_u, ub["labels"])

    # The same label tokens (the no-prompt examples' first labels are predicted in neither) ...
    assert count_p == count_u == sum(m - max(p, 1) for m, p in zip(LENGTHS, PROMPTS))
    # ... the same logits at every token of every example ...
    for r, at, i in _spans(groups, LENGTHS):
        torch.testing.assert_close(logits_p[r, at:at + LENGTHS[i]], logits_u[i, :LENGTHS[i]], atol=1e-5, rtol=1e-5)
    # ... so the same loss and gradients.
    torch.testing.assert_close(loss_p, loss_u, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(mean_p, mean_u, atol=1e-6, rtol=1e-6)
    assert max(float(g.abs().max()) for g in grads_u.values()) > 1e-3
    for name in grads_u:
        torch.testing.assert_close(grads_p[name], grads_u[name], atol=1e-5, rtol=1e-4, msg=name)

    # Sanity: with a padding mask (here all ones on the examples) the examples would attend to each
    # other, which changes the logits: the block-diagonal mask is what makes them equal.
    with torch.no_grad():
        leaky = model(input_ids=pb["input_ids"], attention_mask=pb["attention_mask"],
                      position_ids=pb["position_ids"], use_cache=False).logits
    r, at, i = next((r, at, i) for r, at, i in _spans(groups, LENGTHS) if at > 0)
    assert (leaky[r, at:at + LENGTHS[i]] - logits_u[i, :LENGTHS[i]]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_split_segments_packed_equal_whole_model_unpacked(kind, attn):
    """Two clients' packed batches through their segment, the wire (mask_meta) and the server
    batched together equal the whole model on the unpacked examples; so do the gradients."""
    model = _model(kind, attn)
    client, server = split_model(model, 1)
    ds = _dataset(LENGTHS, PROMPTS, seed=1)
    shards = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]]
    packed = pack_client_datasets(ds, shards, MAX_LENGTH)
    # Each client's batch trimmed to its own length: the server pads the shorter one.
    batches = [p.batch(range(len(p)), trim=True) for p in packed]
    hidden = [client(b["input_ids"], **mask_kwargs([b])) for b in batches]
    metas = [unpack_tensors(pack_tensors({**mask_meta(b), "labels": b["labels"]})) for b in batches]
    assert all(m.keys() == {"position_ids", "labels"} for m in metas)
    h_all = concat_right_padded([h.detach() for h in hidden]).requires_grad_(True)
    logits = server(h_all, **mask_kwargs(metas))
    sizes = [h.shape[0] for h in hidden]
    parts = logits.split(sizes)
    loss_split = sum(_sum_loss(lg[:, :m["labels"].shape[1]], m["labels"])[0] for lg, m in zip(parts, metas))
    server.zero_grad()
    client.zero_grad()
    loss_split.backward()
    for h, g in zip(hidden, h_all.grad.split(sizes)):
        h.backward(g[:, :h.shape[1]])
    split_grads = {**{client.full_model_name(n): p.grad.clone() for n, p in client.named_parameters()},
                   **{server.full_model_name(n): p.grad.clone() for n, p in server.named_parameters()}}

    model.zero_grad()
    ub = ds.batch(range(len(ds)))
    whole = model(input_ids=ub["input_ids"], attention_mask=ub["attention_mask"], use_cache=False).logits
    loss_whole = _sum_loss(whole, ub["labels"])[0]
    loss_whole.backward()
    torch.testing.assert_close(loss_split, loss_whole, atol=1e-4, rtol=1e-6)
    lengths = example_lengths(ds).tolist()
    for shard, p, lg in zip(shards, packed, parts):
        groups = pack_indices([lengths[i] for i in shard], MAX_LENGTH)
        for r, at, j in _spans(groups, [lengths[i] for i in shard]):
            i = shard[j]
            torch.testing.assert_close(lg[r, at:at + lengths[i]], whole[i, :lengths[i]], atol=1e-5, rtol=1e-5)
    named = dict(model.named_parameters(remove_duplicate=False))
    assert set(split_grads) == set(named)
    tied = model.config.tie_word_embeddings  # gpt2: lm_head.weight is wte.weight, whose gradient sums both uses
    embed = "transformer.wte.weight" if kind == "gpt2" else "model.embed_tokens.weight"
    for name, g in split_grads.items():
        if tied and name in (embed, "lm_head.weight"):
            continue
        torch.testing.assert_close(g, named[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    if tied:
        torch.testing.assert_close(split_grads[embed] + split_grads["lm_head.weight"], named[embed].grad,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_u_shape_segments_packed_equal_whole_model_unpacked(attn):
    model = _model("llama", attn, layers=4)
    client, server, tail = split_model_u_shape(model, 1, 3)
    ds = _dataset(LENGTHS, PROMPTS, seed=2)
    groups, packed = _packed(ds)
    b = packed.batch(range(len(packed)))
    meta = unpack_tensors(pack_tensors(mask_meta(b)))
    with torch.no_grad():
        logits = tail(server(client(b["input_ids"], **mask_kwargs([b])), **mask_kwargs([meta])), **mask_kwargs([b]))
        ub = ds.batch(range(len(ds)))
        whole = model(input_ids=ub["input_ids"], attention_mask=ub["attention_mask"], use_cache=False).logits
    for r, at, i in _spans(groups, LENGTHS):
        torch.testing.assert_close(logits[r, at:at + LENGTHS[i]], whole[i, :LENGTHS[i]], atol=1e-5, rtol=1e-5)


# -- the strategies: packed batches train as the unpacked batches of the same examples -------------------


class _FixedLoader:
    """Hands out given batches in turn (instead of ClientLoader's random order)."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.calls = 0

    def next_batch(self):
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return batch


def _step_batches(train_data, shards, packed: bool, steps: int, per_batch: int, max_length: int):
    """Per client, `steps` batches of `per_batch` of its examples: packed rows or plain rows."""
    lengths = example_lengths(train_data).tolist()
    out = []
    for shard in shards:
        batches = []
        for s in range(steps):
            chosen = [int(i) for i in shard[s * per_batch:(s + 1) * per_batch]]
            if packed:
                groups = [[chosen[j] for j in row] for row in pack_indices([lengths[i] for i in chosen], max_length)]
                p = pack_rows(train_data, groups)
                assert len(p) < len(chosen)
                batches.append(p.batch(range(len(p)), trim=True))
            else:
                batches.append(train_data.batch(chosen, trim=True))
        out.append(batches)
    return out


def _run_fixed(tmp_path, name, overrides, packed: bool, steps: int = 2):
    from splitlora.strategies import make_strategy
    from splitlora.trainer import build
    from trainer_testutil import tiny_config

    cfg = tiny_config(tmp_path, *overrides, name=name)
    built = build(cfg, log=lambda *_: None)
    setup = built.setup
    n = cfg.train.clients
    shards = [list(range(c, 48, n)) for c in range(n)]
    per_client = _step_batches(built.train_data, shards, packed, steps, per_batch=8, max_length=cfg.data.max_length)
    setup.loaders = [_FixedLoader(b) for b in per_client]
    strategy = make_strategy(setup)
    strategy.train(True)
    losses = []
    for step in range(steps):
        setup.transport.set_round(step // cfg.train.aggregate_every)
        losses.append(strategy.train_step(step).loss)
        if strategy.aggregates and (step + 1) % cfg.train.aggregate_every == 0:
            strategy.end_round(step)
    return losses, strategy


STRATEGIES = {
    "splitlora": ["strategy=splitlora"],
    "splitlora-u_shape": ["strategy=splitlora", "train.u_shape=true", "model.server_end=2"],
    "sl": ["strategy=sl"],
    "centralized": ["strategy=centralized"],
    "fedlora": ["strategy=fedlora"],
    "fedcybgd": ["strategy=fedcybgd", "train.lr=1e-2"],
    # Three clients at two cuts: the server batches each cut's clients (mask_kwargs per group).
    "hsplitlora": ["strategy=hsplitlora", "train.clients=3", "lora.client.r=4", "hsplitlora.min_cut_layer=1",
                   "hsplitlora.max_cut_layer=2",
                   "hsplitlora.devices={big: {tflops: 4.0, memory_gib: 8}, "
                   "small: {count: 2, tflops: 1.0, memory_gib: 0.002}}"],
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_packed_steps_equal_unpacked_steps(tmp_path, strategy):
    """Two steps of each strategy on packed batches give the losses and adapters of the same
    examples unpacked (the second step's loss checks that the first update was the same)."""
    # No dropout: its masks are drawn per tensor shape, which packing changes.
    no_dropout = ["model.config.resid_pdrop=0", "model.config.embd_pdrop=0", "model.config.attn_pdrop=0",
                  "lora.client.dropout=0", "lora.server.dropout=0"]
    common = [*no_dropout, "codec.bits=32", "train.optimizer=sgd", "train.lr=0.5", "train.max_grad_norm=null",
              "train.aggregate_every=100", "lora.server.target_modules=[c_attn,c_proj]", *STRATEGIES[strategy]]
    packed_losses, packed = _run_fixed(tmp_path, "packed", common, packed=True)
    plain_losses, plain = _run_fixed(tmp_path, "plain", common, packed=False)
    assert packed_losses == pytest.approx(plain_losses, rel=1e-5, abs=1e-6)
    if strategy == "hsplitlora":
        assert sorted({p.cut_layer for p in packed.plans}) == [1, 2]  # two groups on the server
    if strategy == "fedcybgd":
        # Mid-round, each client's trained blocks are its round's working copies.
        def working(s):
            return {f"{c}:{k}": v.detach() for c, w in enumerate(s._active) for k, v in w.params.items()}

        a, b = working(packed), working(plain)
        base = dict(plain.setup.base_model.named_parameters())
        assert max(float((v.cpu() - base[k.split(":")[1]]).abs().max()) for k, v in b.items()) > 1e-4  # trained
    else:
        a, b = packed.export_state()[1], plain.export_state()[1]
        assert max(float(v.abs().max()) for k, v in b.items() if k.endswith("lora_B")) > 1e-4
    assert set(a) == set(b) and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
