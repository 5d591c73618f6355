"""Aggregation of unequal LoRA ranks: noise-free stacking (HSplitLoRA) against zero-padding (HetLoRA)."""
import pytest
import torch
from torch import nn

from splitlora.aggregate import (fedavg, fold_into_model, fold_into_weight, hetero_fedavg_delta,
                                 hetero_fedavg_stacked, lora_pairs, lora_ranks, lora_scalings, reinit_adapters,
                                 stack_adapters, truncate, truncate_product, zero_pad_fedavg)

IN, OUT = 12, 10
MODULES = ("layers.0.q", "layers.1.v")


def _client_states(ranks, *, seed=0, dtype=torch.float64, modules=MODULES):
    g = torch.Generator().manual_seed(seed)
    states = []
    for r in ranks:
        state = {}
        for m in modules:
            state[f"{m}.lora_A"] = torch.randn(r, IN, generator=g, dtype=dtype)
            state[f"{m}.lora_B"] = torch.randn(OUT, r, generator=g, dtype=dtype)
        states.append(state)
    return states


def _weighted_mean_update(states, weights, scalings, module):
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    return sum(float(w[i]) * scalings[i] * (s[f"{module}.lora_B"].double() @ s[f"{module}.lora_A"].double())
               for i, s in enumerate(states))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


RANKS = (2, 4, 8)
WEIGHTS = (1.0, 3.0, 2.0)
ALPHA = 16.0
SCALINGS = tuple(ALPHA / r for r in RANKS)  # each client's alpha / r_i differs


def test_stacked_reproduces_the_weighted_mean_of_updates_and_zero_padding_does_not():
    states = _client_states(RANKS)
    deltas = hetero_fedavg_delta(states, WEIGHTS, list(SCALINGS))
    stacked = hetero_fedavg_stacked(states, WEIGHTS, list(SCALINGS))
    padded = zero_pad_fedavg(states, WEIGHTS)
    for m in MODULES:
        expected = _weighted_mean_update(states, WEIGHTS, SCALINGS, m)
        assert _rel(deltas[m], expected) < 1e-12
        a, b = stacked[m]
        assert a.shape == (sum(RANKS), IN) and b.shape == (OUT, sum(RANKS))
        torch.testing.assert_close(b @ a, expected, rtol=1e-6, atol=1e-6)
        # Zero-padding: rank r_max, separate averages of A and B; its update misses the weighted mean
        # by a wide margin (cross terms B_i A_j), even comparing without the per-client scalings.
        pa, pb = padded[f"{m}.lora_A"], padded[f"{m}.lora_B"]
        assert pa.shape == (max(RANKS), IN) and pb.shape == (OUT, max(RANKS))
        unscaled = _weighted_mean_update(states, WEIGHTS, (1.0,) * 3, m)
        assert _rel(pb @ pa, unscaled) > 1e-2
        assert _rel(ALPHA / max(RANKS) * pb @ pa, expected) > 1e-2


def test_scalings_per_module_dict_and_target_scaling():
    states = _client_states(RANKS, seed=1)
    per_module = [{m: s * (1 + k) for k, m in enumerate(MODULES)} for s in SCALINGS]
    stacked = hetero_fedavg_stacked(states, WEIGHTS, per_module, target_scaling=0.5)
    for k, m in enumerate(MODULES):
        expected = _weighted_mean_update(states, WEIGHTS, [s * (1 + k) for s in SCALINGS], m)
        a, b = stacked[m]
        torch.testing.assert_close(0.5 * b @ a, expected, rtol=1e-9, atol=1e-9)


def test_stack_adapters_on_pairs_and_zero_weight_clients_drop_out():
    states = _client_states(RANKS, seed=2, dtype=torch.float32)
    pairs = [lora_pairs(s)[MODULES[0]] for s in states]
    a, b = stack_adapters(pairs, [1.0, 0.0, 1.0], [2.0, 5.0, 3.0])
    assert a.dtype == torch.float32 and a.shape[0] == RANKS[0] + RANKS[2]
    expected = 0.5 * 2.0 * pairs[0][1] @ pairs[0][0] + 0.5 * 3.0 * pairs[2][1] @ pairs[2][0]
    torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-5)


def test_equal_ranks_identical_a_zero_padding_is_fedavg_of_b():
    states = _client_states((4, 4, 4), seed=3)
    for s in states[1:]:
        for m in MODULES:
            s[f"{m}.lora_A"] = states[0][f"{m}.lora_A"].clone()
    padded = zero_pad_fedavg(states, WEIGHTS)
    plain = fedavg(states, WEIGHTS)
    deltas = hetero_fedavg_delta(states, WEIGHTS)
    for m in MODULES:
        torch.testing.assert_close(padded[f"{m}.lora_B"], plain[f"{m}.lora_B"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(padded[f"{m}.lora_A"], states[0][f"{m}.lora_A"], rtol=1e-12, atol=1e-12)
        # ... and then both methods agree.
        torch.testing.assert_close(padded[f"{m}.lora_B"] @ padded[f"{m}.lora_A"], deltas[m], rtol=1e-10, atol=1e-10)


def test_truncate_gives_each_client_its_rank_back():
    states = _client_states(RANKS, seed=4)
    padded = zero_pad_fedavg(states, WEIGHTS)
    for r, s in zip(RANKS, states):
        own = truncate(padded, {m: r for m in MODULES})
        assert lora_ranks(own) == {m: r for m in MODULES}
        assert set(own) == set(s)
        for m in MODULES:
            assert torch.equal(own[f"{m}.lora_A"], padded[f"{m}.lora_A"][:r])
            assert torch.equal(own[f"{m}.lora_B"], padded[f"{m}.lora_B"][:, :r])
    assert lora_ranks(truncate(padded, 3)) == {m: 3 for m in MODULES}
    with pytest.raises(ValueError, match="must be an integer in"):
        truncate(padded, 9)
    with pytest.raises(ValueError, match="no rank given"):
        truncate(padded, {MODULES[0]: 2})
    with pytest.raises(ValueError, match="does not have"):
        truncate(padded, {**{m: 2 for m in MODULES}, "other": 1})


def test_clients_missing_modules():
    full = _client_states((2, 4), seed=5)
    partial = _client_states((8,), seed=6, modules=MODULES[:1])
    states = full + partial
    with pytest.raises(ValueError, match="allow_missing"):
        hetero_fedavg_delta(states, WEIGHTS)
    with pytest.raises(ValueError, match="allow_missing"):
        zero_pad_fedavg(states, WEIGHTS)
    deltas = hetero_fedavg_delta(states, WEIGHTS, allow_missing=True)
    torch.testing.assert_close(deltas[MODULES[0]], _weighted_mean_update(states, WEIGHTS, (1.0,) * 3, MODULES[0]))
    # The module only clients 0 and 1 hold: their weights renormalized.
    torch.testing.assert_close(deltas[MODULES[1]], _weighted_mean_update(full, WEIGHTS[:2], (1.0,) * 2, MODULES[1]))


def test_errors_name_the_problem():
    states = _client_states((2, 4), seed=7)
    bad_in = [dict(states[0]), states[1]]
    bad_in[0][f"{MODULES[0]}.lora_A"] = torch.randn(2, IN + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="same module"):
        hetero_fedavg_delta(bad_in, (1, 1))
    with pytest.raises(ValueError, match=r"\[10 x 12\]|\[10 x 13\]"):
        zero_pad_fedavg(bad_in, (1, 1))
    bad_rank = [dict(states[0]), states[1]]
    bad_rank[0][f"{MODULES[0]}.lora_B"] = torch.randn(OUT, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="same r"):
        hetero_fedavg_delta(bad_rank, (1, 1))
    half = dict(states[0])
    del half[f"{MODULES[1]}.lora_B"]
    with pytest.raises(ValueError, match="has no lora_B"):
        hetero_fedavg_delta([half, states[1]], (1, 1))
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        hetero_fedavg_delta([{**states[0], "ln.weight": torch.ones(3)}, states[1]], (1, 1))
    with pytest.raises(ValueError, match="2 clients but 3 weights"):
        hetero_fedavg_delta(states, (1, 1, 1))
    with pytest.raises(ValueError, match="positive sum"):
        zero_pad_fedavg(states, (0, 0))
    with pytest.raises(ValueError, match="positive sum"):
        hetero_fedavg_stacked(states, (1, -1))
    with pytest.raises(ValueError, match="2 state dicts but 1 scalings"):
        hetero_fedavg_delta(states, (1, 1), [1.0])
    with pytest.raises(ValueError, match="no entry for module"):
        hetero_fedavg_delta(states, (1, 1), [{MODULES[0]: 1.0}, 1.0])
    with pytest.raises(ValueError, match="> 0"):
        stack_adapters([lora_pairs(states[0])[MODULES[0]]], [1.0], [0.0])
    with pytest.raises(ValueError, match="at least one"):
        hetero_fedavg_delta([], [])
    with pytest.raises(ValueError, match="the weight is"):
        fold_into_weight(torch.zeros(OUT, IN), torch.zeros(IN, OUT))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.q = nn.Linear(IN, OUT)
        self.c = Conv1D(OUT, IN)  # GPT-2 layout: weight [in, out]

    def forward(self, x):
        return self.q(x) + self.c(x)


def test_fold_then_reinit_reproduces_the_weighted_mean_of_client_models():
    # Clients = copies of one model with LoRA at their own ranks; for linear layers the weighted mean
    # of their outputs is the output of W + sum_i w_i s_i B_i A_i: what folding the aggregate gives.
    from splitlora.adapters import adapter_state
    from splitlora_kernels import apply_fused_lora

    torch.manual_seed(0)
    base = _Tiny().double()
    clients = []
    for r in RANKS:
        m = apply_fused_lora(_copy(base), ["q", "c"], r=r, alpha=ALPHA)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_()
        clients.append(m)
    x = torch.randn(5, IN, dtype=torch.float64)
    w = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    expected = sum(float(wi) * m(x) for wi, m in zip(w, clients)).detach()

    states = [adapter_state(m) for m in clients]
    deltas = hetero_fedavg_delta(states, WEIGHTS, [lora_scalings(m) for m in clients])
    global_model = _copy(clients[0])
    fold_into_model(global_model, deltas)
    torch.testing.assert_close(global_model(x), expected, rtol=1e-10, atol=1e-10)

    # Each client restarts at its own rank (here client 0 goes from rank 2 to 6) from the folded model.
    client = _copy(global_model)
    changed = reinit_adapters(client, {"q": 6}, seed=3)
    assert changed and lora_ranks(adapter_state(client)) == {"q": 6, "c": RANKS[0]}
    assert all(float(v.abs().max()) == 0 for k, v in adapter_state(client).items() if k.endswith("lora_B"))
    torch.testing.assert_close(client(x), expected, rtol=1e-10, atol=1e-10)
    assert not reinit_adapters(client, seed=3)  # same ranks: same Parameter objects
    with pytest.raises(ValueError, match="not LoRA modules"):
        fold_into_model(client, {"nope": torch.zeros(OUT, IN)})


def _copy(m):
    import copy

    return copy.deepcopy(m)


def test_truncate_product_is_the_best_rank_k_approximation_from_the_factors():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(9, IN, generator=g, dtype=torch.float64)
    b = torch.randn(OUT, 9, generator=g, dtype=torch.float64)
    full = b @ a
    u, s, vh = torch.linalg.svd(full)
    for k in (1, 3, 9):
        a_k, b_k = truncate_product(a, b, k)
        assert a_k.shape == (k, IN) and b_k.shape == (OUT, k)
        best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young: the best rank-k approximation
        torch.testing.assert_close(b_k @ a_k, best, rtol=0, atol=1e-10)
        # The singular values are split evenly: A_k's rows and B_k's columns have the same norms.
        torch.testing.assert_close(a_k.norm(dim=1), b_k.norm(dim=0), rtol=1e-10, atol=0)
    # A rank above the product's keeps all of it (k stops at min(R, in, out)).
    a_k, b_k = truncate_product(a, b, 50)
    assert a_k.shape[0] == 9
    torch.testing.assert_close(b_k @ a_k, full, rtol=0, atol=1e-10)
    # float32 factors come back in float32.
    a32, b32 = truncate_product(a.float(), b.float(), 2)
    assert a32.dtype == b32.dtype == torch.float32


@pytest.mark.parametrize("a_shape, b_shape, rank, match", [
    ((4, IN), (OUT, 3), 2, "same R"),
    ((4, IN), (OUT, 4), 0, "rank must be an integer >= 1"),
])
def test_truncate_product_errors(a_shape, b_shape, rank, match):
    with pytest.raises(ValueError, match=match):
        truncate_product(torch.zeros(a_shape), torch.zeros(b_shape), rank)
