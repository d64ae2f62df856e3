"""Every fusedopt loss, module and functional form, under torch.compile(fullgraph=True): no graph break, the
compiled graph calls the fusedopt custom op, and the loss and the input gradients (the compiled backward) equal
eager torch's, on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from loss_cases import CASES, cast_module, make_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("name", "kind", "ours", "theirs"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_loss_compiled_fullgraph_matches_eager_torch(name, kind, ours, theirs, dtype, compile_backend, device):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(compile_backend)(gm, example_inputs)

    ours, theirs = cast_module(ours, dtype, device), cast_module(theirs, dtype, device)
    compiled = torch.compile(lambda x, t: ours(x, t), backend=backend, fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for step in range(2):  # the second call runs the cached graph
        x, t = make_inputs(kind, dtype, gen, device)
        x_ref = x.detach().clone().requires_grad_()
        loss, ref = compiled(x, t), theirs(x_ref, t)
        assert loss.dtype == ref.dtype and loss.shape == ref.shape, f"{name}: {loss.dtype} {loss.shape}"
        assert_close(loss, ref, dtype, f"{name} step {step} loss", reduction=True)
        up = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(device, dtype)  # a non-trivial grad_output
        (grad,) = torch.autograd.grad(loss, x, up)
        (ref_grad,) = torch.autograd.grad(ref, x_ref, up)
        assert_close(grad, ref_grad, dtype, f"{name} step {step} input grad")
    # An autograd.Function is traced as a higher-order op: its forward is a subgraph (a submodule).
    called = {str(n.target) for g in graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule)
              for n in m.graph.nodes if n.op == "call_function"}  # fmt: skip
    assert any(c.startswith("fusedopt.") for c in called), f"{name}: no fusedopt op in the graph: {called}"


@pytest.mark.parametrize("module", [False, True])
def test_compiled_bce_still_rejects_inputs_outside_0_1(module):
    """The eager BCE raises torch's error on a probability outside [0, 1]; compiled, the check is an assert op in
    the graph, so it still raises."""
    import fusedopt

    fn = fusedopt.nn.BCELoss() if module else fusedopt.nn.functional.binary_cross_entropy
    compiled = torch.compile(lambda x, t: fn(x, t), backend="aot_eager", fullgraph=True)
    x, t = torch.full((3, 4), 0.5), torch.rand(3, 4)
    compiled(x, t)
    x[1, 2] = 1.5
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        compiled(x, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("module", [False, True])
@pytest.mark.parametrize("mode", ["row_chunked", "vocab_blocked"])
def test_linear_cross_entropy_compiled_fullgraph(dtype, module, mode):
    """LinearCrossEntropyLoss / linear_cross_entropy (several chunks and vocabulary blocks) compiled: loss and the
    input, weight and bias gradients of eager F.linear + F.cross_entropy."""
    import fusedopt
    from fusedopt.nn.linear_cross_entropy import linear_cross_entropy

    gen = torch.Generator().manual_seed(9)
    leaf = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    x, w, b = leaf(12, 8), leaf(20, 8), leaf(20)
    t = torch.randint(0, 20, (12,), generator=gen)
    t[3] = -100
    extras = dict(chunk_size=5, mode=mode, vocab_block_size=6)
    if module:
        head = fusedopt.nn.LinearCrossEntropyLoss(8, 20, bias=True, dtype=dtype, **extras)
        with torch.no_grad():
            head.linear.weight.copy_(w), head.linear.bias.copy_(b)
        w, b = head.linear.weight, head.linear.bias
        fn = lambda x, t: head(x, t)
    else:
        fn = lambda x, t: linear_cross_entropy(x, w, t, linear_bias=b, **extras)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    loss = compiled(x, t)
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w, b), t)
    assert_close(loss, ref, dtype, "loss", reduction=True)
    for name, g, r in zip("xwb", torch.autograd.grad(loss, (x, w, b)), torch.autograd.grad(ref, (x, w, b))):
        assert_close(g, r, dtype, f"grad {name}", reduction=True)


def _ce_op_cases():
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(7, 13, generator=gen)
    target = torch.randint(0, 13, (7,), generator=gen)
    target[1] = -100
    weight = torch.rand(13, generator=gen) + 0.5
    probs = torch.softmax(torch.randn(7, 13, generator=gen), dim=1)
    cases = [
        ("cross_entropy_fwd", (logits, target, None, None, None, True, -100, 0.1, 1e-3, None, False, "cpu")),
        ("cross_entropy_fwd", (logits, target, weight, torch.empty_like(logits), torch.tensor([0.5]), True, -100, 0.0,
                               0.0, 30.0, False, "cpu")),
    ]  # fmt: skip
    return cases + [
        ("cross_entropy_fwd", (logits, probs, None, None, None, True, -100, 0.0, 0.0, None, True, "cpu")),
        ("cross_entropy_fwd", (logits, target, None, None, None, False, -100, 0.0, 0.0, None, False, "cpu")),
        ("cross_entropy_scale_grad_", (torch.randn(7, 13, generator=gen), torch.rand(7, generator=gen), "cpu")),
    ]


@pytest.mark.parametrize("case", range(5))
def test_cross_entropy_ops_pass_full_opcheck(case):
    """Every opcheck utility on the cross-entropy ops (the loss tests cover the pointwise ones): schema and the
    (a!) gradient buffers, fake impl, autograd registration, AOTAutograd with dynamic shapes."""
    name, args = _ce_op_cases()[case]
    result = torch.library.opcheck(getattr(torch.ops.fusedopt, name).default, args)
    assert set(result.values()) == {"SUCCESS"}, result
