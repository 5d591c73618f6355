"""MultiLoRALinear (splitlora_kernels.multi_layer) against one FusedLoRALinear per adapter.

Oracle: for each group of samples, a FusedLoRALinear over the same base weight holding that
group's adapter (same A, B, alpha, rsLoRA flag), run on those samples alone. Outputs and every
gradient (input, each A_g, each B_g) must agree to float32 summation-order rounding (atol/rtol
1e-5); an adapter whose group is empty must get an exactly zero gradient.
"""
import pytest
import torch
from torch import nn

from splitlora_kernels import FusedLoRALinear
from splitlora_kernels.multi_layer import MultiLoRALinear, adapter_groups, multi_lora_modules

IN, OUT, ALPHA = 24, 20, 8.0
TOL = dict(atol=1e-5, rtol=1e-5)


def base_layer(kind: str, device="cpu"):
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(IN, OUT)
    else:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(OUT, IN)
        with torch.no_grad():
            layer.bias.normal_()
    return layer.to(device)


def randomize(multi: MultiLoRALinear, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in zip(multi.lora_A, multi.lora_B):
            a.copy_(torch.randn(a.shape, generator=gen) * 0.3)
            b.copy_(torch.randn(b.shape, generator=gen) * 0.3)


def one_per_adapter(multi: MultiLoRALinear, base: nn.Module):
    """A FusedLoRALinear per adapter, each over a copy of the base with that adapter's values."""
    layers = []
    for g, r in enumerate(multi.ranks):
        layer = FusedLoRALinear.from_linear(base_copy(base), r, multi.lora_alpha, use_rslora=multi.use_rslora)
        with torch.no_grad():
            layer.lora_A.copy_(multi.lora_A[g])
            layer.lora_B.copy_(multi.lora_B[g])
        layers.append(layer)
    return layers


def base_copy(base):
    import copy

    return copy.deepcopy(base)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_match_one_layer_per_adapter(kind, rslora):
    base = base_layer(kind)
    reference_base = base_copy(base)
    ranks, sizes = [1, 4, 7, 2], [3, 0, 2, 1]
    fused = FusedLoRALinear.from_linear(base, 4, ALPHA, use_rslora=rslora)
    multi = MultiLoRALinear.from_lora_layer(fused, ranks)
    assert multi.weight is base.weight and multi.bias is base.bias  # shared, not copied
    randomize(multi)
    singles = one_per_adapter(multi, reference_base)
    x = torch.randn(sum(sizes), 5, IN)
    x_ref = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    with adapter_groups(multi, sizes):
        y = multi(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    outs = [singles[g](x_ref[starts[g]:starts[g + 1]]) for g in range(len(sizes))]
    y_ref = torch.cat(outs)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOL)
    for g, single in enumerate(singles):
        if sizes[g] == 0:
            assert multi.lora_A[g].grad is None or not multi.lora_A[g].grad.any()
            assert multi.lora_B[g].grad is None or not multi.lora_B[g].grad.any()
            continue
        torch.testing.assert_close(multi.lora_A[g].grad, single.lora_A.grad, **TOL)
        torch.testing.assert_close(multi.lora_B[g].grad, single.lora_B.grad, **TOL)
    assert base.weight.grad is None  # the base stays frozen


def test_scalings_follow_each_rank_and_delta_weight_is_the_update():
    fused = FusedLoRALinear.from_linear(base_layer("conv1d"), 4, ALPHA, use_rslora=False)
    multi = MultiLoRALinear.from_lora_layer(fused, [2, 8])
    assert multi.scalings == [ALPHA / 2, ALPHA / 8]
    randomize(multi)
    x = torch.randn(1, 3, IN)
    with adapter_groups(multi, [0, 1]):
        y = multi(x)
    # Conv1D stores [in, out]: y = x @ (W + delta) + b with delta in that layout.
    expected = x @ (fused.weight + multi.delta_weight(1)) + fused.bias
    torch.testing.assert_close(y, expected, **TOL)


def test_fresh_adapters_compute_the_base_and_set_rank_restarts():
    base = base_layer("linear")
    multi = MultiLoRALinear.from_lora_layer(FusedLoRALinear.from_linear(base, 4, ALPHA), [3, 5])
    x = torch.randn(4, IN)
    with adapter_groups(multi, [2, 2]):
        torch.testing.assert_close(multi(x), nn.functional.linear(x, base.weight, base.bias), **TOL)
    randomize(multi)
    old = multi.lora_A[1]
    multi.set_rank(1, 9)
    assert multi.ranks == [3, 9] and multi.lora_A[1] is not old and not multi.lora_B[1].any()


def test_adapter_groups_sets_every_module_and_restores():
    model = nn.Sequential(*(MultiLoRALinear.from_lora_layer(FusedLoRALinear.from_linear(nn.Linear(IN, IN), 2, 4),
                                                            [2, 2]) for _ in range(2)))
    assert len(multi_lora_modules(model)) == 2
    with adapter_groups(model, [1, 2]):
        assert all(m.group_sizes == [1, 2] for m in model)
        model(torch.randn(3, IN))
    assert all(m.group_sizes is None for m in model)


def test_bad_input_is_explained():
    multi = MultiLoRALinear.from_lora_layer(FusedLoRALinear.from_linear(nn.Linear(IN, OUT), 2, 4), [2, 3])
    with pytest.raises(RuntimeError, match="adapter_groups"):
        multi(torch.randn(2, IN))
    with adapter_groups(multi, [1, 1]):
        with pytest.raises(ValueError, match="add up to the input's first dimension"):
            multi(torch.randn(3, IN))
        with pytest.raises(ValueError, match="dtype"):
            multi(torch.randn(2, IN, dtype=torch.float64))
    with adapter_groups(multi, [2]):
        with pytest.raises(ValueError, match="2 adapters but was given 1"):
            multi(torch.randn(2, IN))
    with pytest.raises(ValueError, match="non-negative integer"):
        with adapter_groups(multi, [-1, 2]):
            pass
    with pytest.raises(ValueError, match="ranks\\[1\\] must be an integer >= 1"):
        MultiLoRALinear(torch.zeros(OUT, IN), None, [2, 0], 4.0)
    with pytest.raises(ValueError, match="lora_dropout must be a number in"):
        MultiLoRALinear(torch.zeros(OUT, IN), None, [2], 4.0, lora_dropout=1.0)
    with pytest.raises(ValueError, match="must be a FusedLoRALinear"):
        MultiLoRALinear.from_lora_layer(nn.Linear(IN, OUT), [2])


def test_dropout_carries_over_and_acts_only_while_training():
    layer = FusedLoRALinear.from_linear(nn.Linear(IN, OUT), 2, 4, dropout=0.25)
    multi = MultiLoRALinear.from_lora_layer(layer, [2, 3])
    assert multi.lora_dropout == 0.25 and "lora_dropout=0.25" in repr(multi)
    with torch.no_grad():
        for b in multi.lora_B:
            b.normal_()
    x = torch.randn(4, 3, IN)
    with adapter_groups(multi, [1, 3]):
        multi.eval()
        evaluated = multi(x)
        assert torch.equal(evaluated, multi(x))  # no dropout in eval mode
        multi.train()
        torch.manual_seed(5)
        trained = multi(x)
    # In training, the adapters' branch sees the inputs through one mask of the batch's shape.
    torch.manual_seed(5)
    mask = torch.empty_like(x).bernoulli_(0.75) / 0.75
    expected = evaluated.clone()
    for g, (lo, hi) in enumerate([(0, 1), (1, 4)]):
        a, b = multi.lora_A[g].detach(), multi.lora_B[g].detach()
        xs = x[lo:hi]
        expected[lo:hi] += multi.scaling(g) * ((xs * mask[lo:hi]) @ a.t() @ b.t() - xs @ a.t() @ b.t())
    torch.testing.assert_close(trained.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_cuda_forward_and_gradients_match_the_cpu_layer(kind):
    cpu_base = base_layer(kind)
    cpu = MultiLoRALinear.from_lora_layer(FusedLoRALinear.from_linear(cpu_base, 4, ALPHA), [1, 16, 5])
    randomize(cpu)
    gpu_base = base_copy(cpu_base).cuda()
    gpu = MultiLoRALinear.from_lora_layer(FusedLoRALinear.from_linear(gpu_base, 4, ALPHA), [1, 16, 5])
    with torch.no_grad():
        for g in range(3):
            gpu.lora_A[g].copy_(cpu.lora_A[g])
            gpu.lora_B[g].copy_(cpu.lora_B[g])
    sizes = [5, 9, 2]
    x = torch.randn(sum(sizes), 7, IN)
    outs = []
    for layer, xx in ((cpu, x.clone()), (gpu, x.cuda())):
        xx.requires_grad_(True)
        with adapter_groups(layer, sizes):
            y = layer(xx)
        y.square().sum().backward()
        outs.append((y.detach().cpu(), xx.grad.cpu(), [a.grad.cpu() for a in layer.lora_A],
                     [b.grad.cpu() for b in layer.lora_B]))
    (y0, dx0, da0, db0), (y1, dx1, da1, db1) = outs
    # GPU fp32 matmuls may use TF32-free but differently ordered sums: a looser bound than on CPU.
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(dx1, dx0, **tol)
    for a, b in zip(da1 + db1, da0 + db0):
        torch.testing.assert_close(a, b, **tol)


def test_from_lora_layer_keeps_float32_adapters_on_a_bfloat16_base():
    base = base_layer("linear").to(torch.bfloat16)
    layer = FusedLoRALinear.from_linear(base, r=4, alpha=ALPHA, adapter_dtype=torch.float32)
    multi = MultiLoRALinear.from_lora_layer(layer, [2, 3])
    assert all(p.dtype == torch.float32 for p in [*multi.lora_A, *multi.lora_B])
    randomize(multi)
    x = torch.randn(3, 5, IN, dtype=torch.bfloat16)
    with adapter_groups(multi, [1, 2]):
        out = multi(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    # Gradients (and so the optimizer state) in the adapters' float32, non-zero for used adapters.
    assert all(a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0 for a in multi.lora_A)
    reference = MultiLoRALinear.from_lora_layer(FusedLoRALinear.from_linear(base_layer("linear").to(torch.bfloat16),
                                                                              r=4, alpha=ALPHA), [2, 3])
    assert all(p.dtype == torch.bfloat16 for p in reference.lora_A)
