"""splitlora.split: segments of a causal LM compute exactly what the whole model computes."""
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from splitlora.split import (
    SUPPORTED_MODEL_TYPES,
    ClientSegment,
    ClientTail,
    ServerSegment,
    split_model,
    split_model_u_shape,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128
LAYERS = 4
ATOL = 1e-5

# Small random models; the sliding windows (3) are shorter than the test sequences (8) so that the
# sliding-window masks of Mistral and of Qwen2's upper layers really differ from plain causal ones.
CONFIGS = {
    "gpt2": lambda **kw: transformers.GPT2Config(
        n_layer=LAYERS, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0, **kw
    ),
    "llama": lambda **kw: transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, **kw
    ),
    "qwen2": lambda **kw: transformers.Qwen2Config(
        num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
        use_sliding_window=True, sliding_window=3, max_window_layers=2, **kw
    ),
    "mistral": lambda **kw: transformers.MistralConfig(
        num_hidden_layers=LAYERS, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, sliding_window=3, **kw
    ),
}


# The families this file tests; the newer ones (qwen3, gemma2, gemma3_text, phi3, olmo2) are in
# test_architectures.py.
FAMILIES = tuple(CONFIGS)


def make_model(model_type, seed=0, **kw):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[model_type](**kw)).eval()


@pytest.fixture(scope="module")
def models():
    return {t: make_model(t) for t in FAMILIES}


def batch(seed=1, b=3, t=8):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (b, t), generator=g)
    # Right padding, rows of different lengths; the first row is full.
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, 5:] = 0
    attention_mask[2, 3:] = 0
    return input_ids, attention_mask


def assert_close(actual, expected, atol=ATOL):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


def test_supported_model_types():
    assert SUPPORTED_MODEL_TYPES[:len(FAMILIES)] == FAMILIES == ("gpt2", "llama", "qwen2", "mistral")
    assert {"qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"} <= set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("masked", [True, False], ids=["padding-mask", "no-mask"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_split_logits_equal_whole_model_for_every_cut(models, model_type, masked):
    model = models[model_type]
    input_ids, attention_mask = batch()
    mask = attention_mask if masked else None
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
        for cut in range(1, LAYERS):
            client, server = split_model(model, cut)
            assert client.layer_range == (0, cut) and server.layer_range == (cut, LAYERS)
            hidden = client(input_ids, mask)
            assert hidden.shape == (3, 8, model.config.hidden_size)
            logits = server(hidden, mask)
            assert_close(logits, expected)


@pytest.mark.parametrize("masked", [True, False], ids=["padding-mask", "no-mask"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_u_shape_logits_equal_whole_model_for_every_cut_pair(models, model_type, masked):
    model = models[model_type]
    input_ids, attention_mask = batch(seed=2)
    mask = attention_mask if masked else None
    pairs = [(c, e) for c, e in itertools.combinations(range(1, LAYERS), 2)]
    assert pairs == [(1, 2), (1, 3), (2, 3)]
    with torch.no_grad():
        expected = model(input_ids, attention_mask=mask).logits
        for cut, end in pairs:
            client, server, tail = split_model_u_shape(model, cut, end)
            assert isinstance(server, ServerSegment) and not server.returns_logits
            assert (client.layer_range, server.layer_range, tail.layer_range) == ((0, cut), (cut, end), (end, LAYERS))
            middle = server(client(input_ids, mask), mask)
            assert middle.shape == (3, 8, model.config.hidden_size)
            assert_close(tail(middle, mask), expected)


def test_explicit_position_ids_and_eager_attention():
    # Eager attention gets a float additive mask instead of sdpa's boolean one: both must round-trip.
    model = make_model("llama", attn_implementation="eager")
    input_ids, attention_mask = batch(seed=3)
    position_ids = torch.arange(2, 10).unsqueeze(0).expand(3, -1)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        client, server = split_model(model, 2)
        assert server.config._attn_implementation == "eager"
        logits = server(client(input_ids, attention_mask, position_ids), attention_mask, position_ids)
    assert_close(logits, expected)


def _loss(logits, input_ids, attention_mask):
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_gradients_across_the_cut_equal_whole_model_gradients(model_type):
    model = make_model(model_type)
    input_ids, attention_mask = batch(seed=4)
    client, server = split_model(model, 2)

    _loss(model(input_ids, attention_mask=attention_mask).logits, input_ids, attention_mask).backward()

    # The split protocol: the client's output goes over the wire as a fresh leaf; the server
    # backpropagates into it and sends its .grad back; the client finishes the backward.
    hidden = client(input_ids, attention_mask)
    received = hidden.detach().requires_grad_(True)
    _loss(server(received, attention_mask), input_ids, attention_mask).backward()
    assert received.grad is not None
    hidden.backward(received.grad)

    # Sum segment gradients per whole-model Parameter: a tied embedding/head (GPT-2) is one Parameter
    # in the model but two in the split, and its whole-model gradient is the sum of both.
    whole = dict(model.named_parameters(remove_duplicate=False))
    summed = {}
    for segment in (client, server):
        for name, p in segment.named_parameters():
            target = whole[segment.full_model_name(name)]
            assert p.grad is not None, name
            summed[id(target)] = summed.get(id(target), 0) + p.grad
    assert len(summed) == len({id(p) for p in model.parameters()})
    for name, p in model.named_parameters():
        assert_close(summed[id(p)], p.grad, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_tied_head_gets_its_own_weight(model_type):
    kw = {} if model_type == "gpt2" else {"tie_word_embeddings": True}
    model = make_model(model_type, **kw)
    backbone = model.transformer if model_type == "gpt2" else model.model
    embedding = backbone.get_input_embeddings().weight
    assert model.lm_head.weight is embedding  # tied in the source
    original = embedding.detach().clone()

    client, server = split_model(model, 1)
    client_emb = client.wte.weight if model_type == "gpt2" else client.embed_tokens.weight
    head = server.lm_head.weight
    assert head is not client_emb and head.data_ptr() != client_emb.data_ptr()
    assert head.data_ptr() != embedding.data_ptr() and client_emb.data_ptr() != embedding.data_ptr()
    assert_close(head, original, atol=0)

    with torch.no_grad():
        head.add_(1.0)
    assert_close(client_emb, original, atol=0)
    assert_close(embedding, original, atol=0)
    with torch.no_grad():
        client_emb.mul_(2.0)
    assert_close(head, original + 1.0, atol=0)
    assert_close(embedding, original, atol=0)
    assert model.lm_head.weight is embedding  # the source model is untouched, still tied


def test_segments_are_independent_copies(models):
    model = models["llama"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    client, server = split_model(model, 2)
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    replica = copy.deepcopy(client)
    for (name, p), (_, q) in zip(client.named_parameters(), replica.named_parameters()):
        assert p.data_ptr() != q.data_ptr() and p.data_ptr() not in model_ptrs, name
    for p in server.parameters():
        assert p.data_ptr() not in model_ptrs
    with torch.no_grad():
        for p in list(client.parameters()) + list(server.parameters()):
            p.zero_()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(p.abs().sum() > 0 for p in replica.parameters())
    # Each segment's layers share the segment's one config object.
    assert replica.config is replica.decoder_layers["0"].self_attn.config
    assert replica.config is not client.config and client.config is not model.config


def test_train_and_eval_mode_follow_the_model():
    model = make_model("gpt2")  # GPT-2 keeps its default dropout of 0.1
    assert not split_model(model, 2)[0].training
    model.train()
    client, server = split_model(model, 2)
    assert client.training and server.training
    input_ids, _ = batch(seed=5)
    with torch.no_grad():
        assert not torch.equal(client(input_ids), client(input_ids))  # dropout active
        client.eval()
        assert torch.equal(client(input_ids), client(input_ids))


def test_names_map_to_the_whole_model(models):
    model = models["qwen2"]
    whole = dict(model.named_parameters(remove_duplicate=False))
    client, server, tail = split_model_u_shape(model, 1, 3)
    seen = set()
    for segment in (client, server, tail):
        for name, p in segment.named_parameters():
            full = segment.full_model_name(name)
            assert torch.equal(p, whole[full]), name
            assert segment.local_name(full) == name
            seen.add(full)
    assert seen == set(whole)
    assert server.full_model_name("layers.2.self_attn.q_proj") == "model.layers.2.self_attn.q_proj"
    assert tail.full_model_name("lm_head") == "lm_head"
    assert server.local_name("model.layers.0.self_attn.q_proj.weight") is None  # lives on the client
    assert server.local_name("lm_head.weight") is None
    assert list(server.decoder_layers) == ["1", "2"]
    with pytest.raises(ValueError, match="not a name inside this segment"):
        server.full_model_name("embed_tokens.weight")


@pytest.mark.parametrize(
    "model_type,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])], ids=["llama", "gpt2"]
)
def test_apply_fused_lora_on_segments(models, model_type, targets):
    from splitlora_kernels.layers import apply_fused_lora, lora_modules

    model = models[model_type]
    input_ids, attention_mask = batch(seed=6)
    with torch.no_grad():
        expected = model(input_ids, attention_mask=attention_mask).logits
    client, server = split_model(model, 2)
    whole_modules = dict(model.named_modules())
    for segment in (client, server):
        apply_fused_lora(segment, target_modules=targets, r=4, alpha=8)
        names = list(lora_modules(segment))
        assert len(names) == 2 * len(targets)  # two layers per side
        for name in names:
            assert segment.full_model_name(name) in whole_modules
    with torch.no_grad():  # B starts at zero: the adapted split computes the base model exactly
        assert_close(server(client(input_ids, attention_mask), attention_mask), expected)

    # Adapters on both sides receive gradients through the cut.
    hidden = client(input_ids, attention_mask)
    received = hidden.detach().requires_grad_(True)
    _loss(server(received, attention_mask), input_ids, attention_mask).backward()
    hidden.backward(received.grad)
    for segment in (client, server):
        trainable = [(n, p) for n, p in segment.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith(("lora_A", "lora_B")) for n, _ in trainable)
        assert all(p.grad is not None for _, p in trainable)
        assert any(p.grad.abs().sum() > 0 for n, p in trainable if n.endswith("lora_B"))


def test_unknown_model_types_are_rejected():
    bert = transformers.BertModel(
        transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                vocab_size=VOCAB)
    )
    with pytest.raises(ValueError, match="'bert'.*gpt2, llama, qwen2, mistral.*architectures.register_architecture"):
        split_model(bert, 1)
    opt = transformers.OPTForCausalLM(
        transformers.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                               vocab_size=VOCAB, word_embed_proj_dim=32)
    )
    with pytest.raises(ValueError, match="'opt'.*supported model types"):
        split_model_u_shape(opt, 1, 2)
    with pytest.raises(ValueError, match="type None .Linear.; supported model types"):
        split_model(torch.nn.Linear(2, 2), 1)


def test_a_backbone_without_head_is_rejected(models):
    with pytest.raises(ValueError, match="no LM head"):
        split_model(models["llama"].model, 1)


@pytest.mark.parametrize("cut", [0, LAYERS, -1, 99])
def test_cut_out_of_range(models, cut):
    with pytest.raises(ValueError, match=rf"cut_layer must be in \[1, {LAYERS - 1}\].*got {cut}"):
        split_model(models["gpt2"], cut)


@pytest.mark.parametrize("cut", [1.5, True, "2"])
def test_cut_must_be_an_integer(models, cut):
    with pytest.raises(ValueError, match="cut_layer must be an integer"):
        split_model(models["gpt2"], cut)


@pytest.mark.parametrize(
    "cut,end,argument",
    [(0, 2, "cut_layer"), (3, 4, "cut_layer"), (2, 2, "server_end"), (1, 4, "server_end"), (2, 1, "server_end")],
)
def test_u_shape_cuts_out_of_range(models, cut, end, argument):
    with pytest.raises(ValueError, match=rf"{argument} must be in .*got {cut if argument == 'cut_layer' else end}"):
        split_model_u_shape(models["llama"], cut, end)


def test_bad_inputs_are_explained(models):
    client, server = split_model(models["llama"], 2)
    input_ids, attention_mask = batch()
    with pytest.raises(ValueError, match="input_ids must have shape"):
        client(input_ids[0])
    with pytest.raises(ValueError, match=r"attention_mask must be a \[3, 8\] padding mask"):
        client(input_ids, attention_mask[:, :4])
    with pytest.raises(ValueError, match="hidden must have shape"):
        server(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="position_ids must have shape"):
        client(input_ids, position_ids=torch.arange(4).unsqueeze(0))


def test_segment_classes_are_exported():
    assert issubclass(ClientSegment, torch.nn.Module)
    assert issubclass(ClientTail, torch.nn.Module)
