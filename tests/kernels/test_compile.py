"""torch.compile of the fused LoRA op: the custom ops splitlora::lora_linear_fwd / lora_linear_bwd.

Under compile, `lora_linear` on CPU runs the plain-torch reference inside the custom op
("reference" path, the dropout mask drawn by torch.bernoulli outside it); the Triton paths run in
the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on a few tiny shapes: opcheck and one
compiled call of lora_linear_triton per path. Eager calls do not use the custom ops (see the
comment above lora_linear_fwd): every compiled result is compared with the eager one.

Compiled models use backend="aot_eager" (dynamo + AOTAutograd + FakeTensor, the stages that
would trip over data_ptr()/.item()), whose RNG ops run eagerly in graph order, so even training
with dropout gives bit-for-bit the eager masks; one test also runs inductor (CPU, no dropout).
Tolerance: atol 1e-5 (float32).
"""
import importlib

import pytest
import torch
import torch.nn as nn

from splitlora_kernels import FusedLoRALinear, apply_fused_lora
from splitlora_kernels.ops.lora_linear import lora_linear_bwd, lora_linear_fwd

ops_mod = importlib.import_module("splitlora_kernels.ops.lora_linear")
TOL = dict(atol=1e-5, rtol=1e-5)
IN, HID, OUT = 12, 16, 10


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# opcheck of the registered ops
# ---------------------------------------------------------------------------------------------


def _inputs(*, bias=True, fan_in_fan_out=False, grad=True, shape=(2, 3), dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, IN, generator=gen, dtype=dtype)
    if fan_in_fan_out:  # Conv1D keeps [in, out]: the op receives the transposed view
        weight = torch.randn(IN, OUT, generator=gen, dtype=dtype).t()
    else:
        weight = torch.randn(OUT, IN, generator=gen, dtype=dtype)
    lora_a = torch.randn(4, IN, generator=gen, dtype=dtype)
    lora_b = torch.randn(OUT, 4, generator=gen, dtype=dtype)
    b = torch.randn(OUT, generator=gen, dtype=dtype) if bias else None
    tensors = [x, weight, lora_a, lora_b] + ([b] if bias else [])
    if grad:
        for t in tensors:
            t.requires_grad_(True)
    return x, weight, lora_a, lora_b, b


def _mask(x, p, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(x.shape, generator=gen) >= p).to(x.dtype) / (1.0 - p)


def _fwd_samples():
    samples = []
    for bias in (True, False):
        for fifo in (False, True):
            x, w, a, b, bb = _inputs(bias=bias, fan_in_fan_out=fifo)
            samples.append((x, w, a, b, bb, 2.0, 0.0, None, None, "reference"))
            # training-mode dropout: the scaled keep mask drawn outside the op
            samples.append((x, w, a, b, bb, 2.0, 0.3, None, _mask(x, 0.3), "reference"))
    return samples


@pytest.mark.parametrize("i", range(8))
def test_opcheck_forward_reference(i):
    torch.library.opcheck(lora_linear_fwd, _fwd_samples()[i])


@pytest.mark.parametrize("needs", [[True] * 5, [True, False, True, True, False], [False, False, True, True, True],
                                   [True, False, False, False, False]])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_opcheck_backward_reference(needs, with_mask, fan_in_fan_out):
    x, w, a, b, _ = _inputs(fan_in_fan_out=fan_in_fan_out, grad=False)
    mask = _mask(x, 0.25) if with_mask else None
    _, xa = lora_linear_fwd(x, w, a, b, None, 1.5, 0.25, None, mask, "reference")
    dy = torch.randn(*x.shape[:-1], OUT, generator=torch.Generator().manual_seed(9))
    torch.library.opcheck(lora_linear_bwd, (dy, x, w, a, b, xa, 1.5, 0.25, None, mask, "reference", needs))


def _interpreter_ready():
    return ops_mod._TRITON_IMPORT_ERROR is None and ops_mod._INTERPRETED and ops_mod._interpreting()


@pytest.mark.skipif(not _interpreter_ready(), reason="needs triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("path", ["cublas", "triton"])
def test_opcheck_fused_paths_with_seed(path):
    """The Triton paths (interpreter on CPU tensors), dropout from a seed tensor, fan_in_fan_out."""
    x, w, a, b, bb = _inputs(fan_in_fan_out=True, shape=(5,))
    seed = torch.tensor([7], dtype=torch.int64)
    torch.library.opcheck(lora_linear_fwd, (x, w, a, b, bb, 2.0, 0.3, seed, None, path))
    with torch.no_grad():
        _, xa = lora_linear_fwd(x, w, a, b, bb, 2.0, 0.3, seed, None, path)
    dy = torch.randn(5, OUT, generator=torch.Generator().manual_seed(9))
    args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in (dy, x, w, a, b, xa))
    torch.library.opcheck(lora_linear_bwd, (*args, 2.0, 0.3, seed, None, path, [True, False, True, True, True]))


def test_fused_seed_tensor_matches_int_seed_and_replayed_mask():
    """lora_linear_triton with an int seed and with the same seed as a tensor give the same call,
    whose mask is the one dropout_mask rebuilds (dropout semantics unchanged)."""
    if not _interpreter_ready():
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1)")
    from splitlora_kernels.ops import dropout_mask, lora_linear_reference, lora_linear_triton

    x, w, a, b, bb = _inputs(shape=(6,), grad=False)
    y_int = lora_linear_triton(x, w, a, b, 2.0, bb, dropout_p=0.4, seed=11)
    y_t = lora_linear_triton(x, w, a, b, 2.0, bb, dropout_p=0.4, seed=torch.tensor([11]))
    assert torch.equal(y_int, y_t)
    y_ref = lora_linear_reference(x, w, a, b, 2.0, bb, dropout_mask(x.shape, 0.4, 11, x.device))
    torch.testing.assert_close(y_int, y_ref, **TOL)


@pytest.mark.parametrize("path,seed", [("cublas", 13), ("triton", None), (None, None)])
def test_compile_fused_path_fullgraph_matches_eager(path, seed):
    """lora_linear_triton (interpreter) compiled with fullgraph: the custom op with a seed tensor
    (given, or drawn by torch.randint in the graph) gives the eager call's mask, output and grads;
    path None resolves the default path (SPLITLORA_LORA_PATH read) inside the traced code."""
    if not _interpreter_ready():
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1)")
    from splitlora_kernels.ops import lora_linear_triton

    def fn(x, w, a, b, bb):
        return lora_linear_triton(x, w, a, b, 2.0, bb, dropout_p=0.3, seed=seed, path=path)

    def run(f):
        tensors = _inputs(fan_in_fan_out=True, shape=(6,))
        torch.manual_seed(3)
        y = f(*tensors)
        grads = torch.autograd.grad(y.pow(2).sum(), [t for t in tensors if t is not None])
        return y.detach(), dict(enumerate(grads))

    eager = run(fn)
    _assert_same(eager, run(torch.compile(fn, fullgraph=True, backend="aot_eager")))


# ---------------------------------------------------------------------------------------------
# torch.compile of models with FusedLoRALinear layers
# ---------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, dropout=0.0, fan_in_fan_out=False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = FusedLoRALinear(IN, HID, r=4, lora_alpha=8, lora_dropout=dropout, fan_in_fan_out=fan_in_fan_out)
        self.fc2 = FusedLoRALinear(HID, OUT, r=2, lora_alpha=4, lora_dropout=dropout, bias=False)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in (self.fc1, self.fc2):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.1)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _grads(model):
    # A compiled module's parameters are its original module's, named with an "_orig_mod." prefix.
    return {n.removeprefix("_orig_mod."): p.grad.detach().clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _run(model, x, seed=42):
    """Output and the gradients of x and of every trainable parameter, after torch.manual_seed."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    y.pow(2).sum().backward()
    grads = _grads(model)
    grads["x"] = x.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


def _assert_same(eager, compiled):
    torch.testing.assert_close(compiled[0], eager[0], **TOL)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], **TOL, msg=lambda m: f"{name}: {m}")


def _x(shape=(3, 5, IN)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dropout,training,fan_in_fan_out",
                         [(0.0, True, False), (0.3, True, True), (0.3, False, False)])
def test_compile_mlp_fullgraph_matches_eager(dropout, training, fan_in_fan_out):
    model = MLP(dropout, fan_in_fan_out).train(training)
    x = _x()
    eager = _run(model, x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(eager, _run(compiled, x))
    if dropout > 0 and training:  # the mask really is drawn (and replayed by the compiled graph)
        assert not torch.allclose(eager[0], _run(model.eval(), x)[0])


def test_explain_mlp_no_graph_break():
    model = MLP(0.3).train()
    explanation = torch._dynamo.explain(model)(_x())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_graph_calls_the_custom_op():
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    model = MLP(0.3).train()
    torch.compile(model, fullgraph=True, backend=backend)(_x())
    assert sum("splitlora.lora_linear_fwd" in t for t in seen) == 2, seen


def test_compile_mlp_inductor_matches_eager():
    model = MLP(0.0).train()
    x = _x()
    eager = _run(model, x)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    _assert_same(eager, _run(compiled, x))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compile_tiny_lm_with_apply_fused_lora(arch, build_model, lora_targets, randomize, token_ids):
    model = build_model(arch)
    apply_fused_lora(model, lora_targets[arch], r=4, alpha=8, dropout=0.1)
    randomize(model, seed=1)
    model.train()

    eager = _lm_step(model, token_ids)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(eager, _lm_step(compiled, token_ids))


def _lm_step(m, token_ids):
    """(logits, LoRA gradients) of one next-token loss backward, dropout seeded the same each call."""
    m.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    # The loss outside the model: transformers' own loss_function logs a warning_once on the
    # first call, which dynamo cannot trace (a graph break in transformers, not in the op).
    logits = m(token_ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), token_ids[:, 1:].flatten()).backward()
    return logits.detach(), _grads(m)


# ---------------------------------------------------------------------------------------------
# A PEFT model patched by patch_peft
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compile_patched_peft_fullgraph(arch, build_model, lora_targets, randomize, token_ids):
    """PEFT's LoRA forward traces without a graph break (peft 0.21 / transformers 5), so the
    patched model compiles with fullgraph=True, every LoRA linear as one lora_linear_fwd node."""
    peft = pytest.importorskip("peft")
    from splitlora_kernels import patch_peft
    from peft.tuners.lora import layer as lora_layer

    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.1,
                             target_modules=lora_targets[arch], fan_in_fan_out=(arch == "gpt2"))
    model = peft.get_peft_model(build_model(arch), config)
    randomize(model, seed=1)
    patch_peft(model, verbose=False)
    model.train()
    n_lora = sum(type(m) is lora_layer.Linear for m in model.modules())

    explanation = torch._dynamo.explain(model)(token_ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert sum("splitlora.lora_linear_fwd" in t for t in targets) == n_lora > 0
    torch._dynamo.reset()

    eager = _lm_step(model, token_ids)
    _assert_same(eager, _lm_step(torch.compile(model, fullgraph=True, backend="aot_eager"), token_ids))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compile_fullgraph_cuda_triton_matches_eager(dtype):
    """On a GPU the op runs its Triton kernels: torch.compile(fullgraph=True) with inductor gives the
    eager outputs and gradients (bf16: the kernels' own tolerance for a 16-bit base)."""
    model = MLP(0.0).to("cuda", dtype).train()
    x = _x().to("cuda", dtype)
    eager = _run(model, x)
    compiled = _run(torch.compile(model, fullgraph=True), x)
    tol = TOL if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(compiled[0], eager[0], **tol)
    assert compiled[1].keys() == eager[1].keys()
    for name in eager[1]:
        torch.testing.assert_close(compiled[1][name], eager[1][name], **tol, msg=lambda m: f"{name}: {m}")
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
