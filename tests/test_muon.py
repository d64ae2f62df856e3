"""fusedopt.optim.Muon beyond the registry's parity grid (tests/optim_db.py, test_optim_registry.py): the batched
Newton-Schulz iteration gives torch's bits on the CPU, torch's errors, NaN and empty matrices as torch, float16
against torch's own float16 run, and the cross-cutting families whose shared models have 1-D params (compile,
GradScaler/autocast, max_grad_norm) on 2-D params."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, cpu_backends
from optim_db import NS_INPUT_ROUNDING_SENSITIVITY
from torch.optim._muon import _zeropower_via_newtonschulz

import fusedopt
from fusedopt.optim import _newton_schulz

BACKENDS = cpu_backends()
SHAPES = [(12, 7), (7, 12), (12, 7), (9, 9), (9, 9), (0, 4), (1, 6), (6, 1)]
COEFS = (3.4445, -4.775, 2.0315)


def _params(shapes, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    return [torch.nn.Parameter(b.clone()) for b in base], [torch.nn.Parameter(b.clone()) for b in base]


def _grads(fused, ref, gen, scale=1.0):
    for f, r in zip(fused, ref):
        g = (torch.randn(f.shape, generator=gen, dtype=torch.float64) * scale).to(f.dtype)
        f.grad, r.grad = g.clone(), g.clone()


def _compare(opt_f, opt_r, fused, ref, dtype, where):
    for i, (f, r) in enumerate(zip(fused, ref)):
        assert_close(f.detach(), r.detach(), dtype, f"{where}: param {i}")
        assert set(opt_f.state[f]) == set(opt_r.state[r]) == {"momentum_buffer"}
        assert_close(opt_f.state[f]["momentum_buffer"], opt_r.state[r]["momentum_buffer"], dtype, f"{where}: buf {i}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "batch"), [((33, 17), 3), ((17, 33), 2), ((64, 64), 4), ((0, 5), 2), ((1, 9), 3)])
def test_batched_newton_schulz_is_torch_bitwise_on_cpu(shape, batch, dtype):
    """One bmm/baddbmm per product for the whole stack gives, matrix by matrix, exactly torch's per-matrix result
    (bfloat16 input, norm clamp, transposed tall matrices), zero matrices included (norm clamped at eps)."""
    gen = torch.Generator().manual_seed(1)
    stack = torch.randn((batch, *shape), generator=gen, dtype=torch.float64).to(dtype)
    stack[-1] = 0.0
    got = _newton_schulz.orthogonalize(stack, COEFS, 5, 1e-7)
    for i in range(batch):
        expected = _zeropower_via_newtonschulz(stack[i], COEFS, 5, 1e-7)
        assert got[i].dtype == expected.dtype == torch.bfloat16
        assert torch.equal(got[i], expected), f"matrix {i} differs from torch's"


def test_non_2d_params_raise_torchs_error():
    for shape in ((3,), (2, 3, 4), ()):
        p = torch.nn.Parameter(torch.ones(shape))
        with pytest.raises(ValueError) as ours:
            fusedopt.Muon([p])
        with pytest.raises(ValueError) as theirs:
            torch.optim.Muon([p])
        assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize(
    ("kwargs", "at_step"),
    [({"lr": -1.0}, False), ({"momentum": -0.1}, False), ({"weight_decay": -1.0}, False),
     ({"adjust_lr_fn": "nope"}, False), ({"lr": torch.tensor([0.1, 0.2])}, False),
     ({"ns_steps": 100}, True), ({"ns_coefficients": (1.0, 2.0)}, True)],
)  # fmt: skip
def test_bad_arguments_raise_as_torch(kwargs, at_step):
    def run(cls):
        p = torch.nn.Parameter(torch.ones(3, 2))
        p.grad = torch.ones(3, 2)
        opt = cls([p], **kwargs)
        if at_step:
            opt.step()

    with pytest.raises(ValueError) as theirs:
        run(torch.optim.Muon)
    with pytest.raises(ValueError) as ours:
        run(fusedopt.Muon)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_grad_and_empty_matrices_as_torch(backend):
    """A NaN in one grad makes that whole matrix NaN (its norm is NaN), as torch's; the other matrices of its
    Newton-Schulz batch are untouched by it; empty matrices (0 x n, n x 0) step as no-ops."""
    fused, ref = _params(SHAPES)
    opt_f, opt_r = fusedopt.Muon(fused, lr=0.02, backend=backend), torch.optim.Muon(ref, lr=0.02)
    gen = torch.Generator().manual_seed(2)
    for s in range(3):
        _grads(fused, ref, gen)
        if s == 1:
            fused[0].grad[3, 2] = ref[0].grad[3, 2] = float("nan")
        opt_f.step()
        opt_r.step()
        for i, (f, r) in enumerate(zip(fused, ref)):
            torch.testing.assert_close(f.detach(), r.detach(), rtol=1e-10, atol=1e-12, equal_nan=True,
                                       msg=lambda m, i=i, s=s: f"step {s} param {i}: {m}")  # fmt: skip
    assert fused[0].isnan().all() and not fused[2].isnan().any()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_float16_against_torchs_float16_run(backend):
    """float16 params against torch.optim.Muon run in float16 itself (the registry compares with float64), one step
    at a time from the same params and state: the momentum within
    float16's tolerance; the params within it plus lr * ratio * NS_INPUT_ROUNDING_SENSITIVITY (torch computes the
    Nesterov update from the float16-rounded buffer, fusedopt from the float32 one: the bfloat16 inputs of the
    iteration may differ by one rounding)."""
    lr = 0.01
    fused, ref = _params([s for s in SHAPES if 0 not in s], torch.float16)
    opt_f, opt_r = fusedopt.Muon(fused, lr=lr, backend=backend), torch.optim.Muon(ref, lr=lr)
    gen = torch.Generator().manual_seed(3)
    for s in range(20):
        _grads(fused, ref, gen)
        opt_f.step()
        opt_r.step()
        for i, (f, r) in enumerate(zip(fused, ref)):
            atol = 2e-5 + lr * max(1.0, f.shape[0] / f.shape[1]) ** 0.5 * NS_INPUT_ROUNDING_SENSITIVITY
            torch.testing.assert_close(f.double(), r.double(), rtol=2e-3, atol=atol,
                                       msg=lambda m, i=i, s=s: f"step {s} param {i}: {m}")  # fmt: skip
            buf_f, buf_r = opt_f.state[f]["momentum_buffer"], opt_r.state[r]["momentum_buffer"]
            assert_close(buf_f, buf_r, torch.float16, f"step {s} buf {i}")
        with torch.no_grad():
            for f, r in zip(fused, ref):
                r.copy_(f)
                opt_r.state[r]["momentum_buffer"].copy_(opt_f.state[f]["momentum_buffer"])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_folded_clip_equals_clip_then_step(backend):
    """max_grad_norm= folds the clip into the momentum kernel: equal to clip_grad_norm_ then torch.optim.Muon. The
    coefficient is float32 (as for every optimizer), so float32 tolerances."""
    fused, ref = _params(SHAPES)
    opt_f = fusedopt.Muon(fused, lr=0.02, backend=backend, max_grad_norm=1.5)
    opt_r = torch.optim.Muon(ref, lr=0.02)
    gen = torch.Generator().manual_seed(4)
    for s in range(20):
        _grads(fused, ref, gen, scale=0.1 if s % 3 == 0 else 2.0)
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.5)
        opt_f.step()
        opt_r.step()
        assert_close(opt_f.last_grad_norm, norm, torch.float32, f"step {s} norm", reduction=True)
        _compare(opt_f, opt_r, fused, ref, torch.float32, f"step {s}")


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(16, 16, bias=False), torch.nn.Tanh(),
                               torch.nn.Linear(16, 4, bias=False))  # fmt: skip


def test_grad_scaler_with_autocast_train_step():
    """bfloat16 autocast + GradScaler (unscale and inf-skip inside the momentum kernel) against torch.optim.Muon
    behind GradScaler's unscale_: the same float32 params after every step, skipped steps included."""
    model, ref_model = _mlp(0), _mlp(0)
    opt_f = fusedopt.Muon(model.parameters(), lr=0.02, backend="cpu")
    opt_r = torch.optim.Muon(ref_model.parameters(), lr=0.02)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) for _ in range(2)]
    gen = torch.Generator().manual_seed(5)
    for s in range(8):
        x, y = torch.randn(6, 12, generator=gen), torch.randn(6, 4, generator=gen)
        for m, opt, sc in ((model, opt_f, scalers[0]), (ref_model, opt_r, scalers[1])):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.mse_loss(m(x).float(), y)
            sc.scale(loss).backward()
            if s == 3:
                next(m.parameters()).grad[0, 0] = float("inf")
            sc.step(opt)
            sc.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert_close(p, q, torch.float32, f"step {s} {name}")


class _GraphRecorder:
    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def op_names(self) -> set:
        return {str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_compiled_step_matches_eager_torch(backend):
    """torch.compile(fullgraph=True) around step(): both fused ops in the graph, the params and state of eager
    torch.optim.Muon in float64 (aot_eager keeps the bfloat16 products as eager runs them)."""
    torch._dynamo.reset()
    fused, ref = _params([(12, 7), (7, 12), (12, 7)])
    opt_f, opt_r = fusedopt.Muon(fused, lr=0.02, backend=backend), torch.optim.Muon(ref, lr=0.02)
    recorder = _GraphRecorder()
    step = torch.compile(opt_f.step, backend=recorder, fullgraph=True)
    gen = torch.Generator().manual_seed(6)
    for s in range(6):
        _grads(fused, ref, gen)
        step()
        opt_r.step()
        _compare(opt_f, opt_r, fused, ref, torch.float64, f"step {s}")
    assert {"fusedopt.muon_momentum_step.default", "fusedopt.muon_update_step.default"} <= recorder.op_names()
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lr_tensor_and_scheduler(backend):
    """A tensor lr changed by a scheduler between steps, as with torch.optim.Muon (which reads it as a float)."""
    fused, ref = _params([(9, 7), (7, 9)])
    opt_f = fusedopt.Muon(fused, lr=torch.tensor(0.02, dtype=torch.float64), backend=backend)
    opt_r = torch.optim.Muon(ref, lr=torch.tensor(0.02, dtype=torch.float64))
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt_f, opt_r)]
    gen = torch.Generator().manual_seed(7)
    for s in range(6):
        _grads(fused, ref, gen)
        opt_f.step()
        opt_r.step()
        for sc in sched:
            sc.step()
        _compare(opt_f, opt_r, fused, ref, torch.float64, f"step {s}")


def test_zero_column_matrix_raises_as_torch():
    """An n x 0 param: torch's adjust_lr divides by its 0 columns (ZeroDivisionError at step); so does fusedopt."""
    for cls in (torch.optim.Muon, fusedopt.Muon):
        p = torch.nn.Parameter(torch.ones(4, 0))
        p.grad = torch.ones(4, 0)
        with pytest.raises(ZeroDivisionError):
            cls([p]).step()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_captured_step_replays_like_eager_torch(backend):
    """opt.step() captured in a CUDA graph (the momentum kernel, the batched products, the update kernel) and replayed
    with new grads copied into the static grads: each replay equals an eager torch.optim.Muon step, within the
    bfloat16 noise of the Newton-Schulz iteration (cuBLAS's batched kernels may round differently from its
    per-matrix ones)."""
    if backend == "triton":
        pytest.skip("the Triton launcher refuses capture (test_cuda_graphs.py)")
    lr = 0.02
    shapes = [(64, 32), (32, 64), (64, 32), (48, 48)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(s, device="cuda", dtype=torch.float64, generator=gen) for s in shapes]
    params = [torch.nn.Parameter(b.float()) for b in base]
    ref_params = [torch.nn.Parameter(b.clone()) for b in base]
    for p in params:
        p.grad = torch.zeros_like(p)
    fused, ref = fusedopt.Muon(params, lr=lr, backend=backend), torch.optim.Muon(ref_params, lr=lr)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused.step()  # warm-up builds the state and the cached stacks outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.no_grad():
        for p, q in zip(params, ref_params):
            p.copy_(q)
            fused.state[p]["momentum_buffer"].zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step()
    for s in range(5):
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, device="cuda", dtype=torch.float64, generator=gen)
            p.grad.copy_(g)
            q.grad = g.float().double()
        graph.replay()
        ref.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            atol = 2e-6 + lr * max(1.0, p.shape[0] / p.shape[1]) ** 0.5 * NS_INPUT_ROUNDING_SENSITIVITY * (s + 1)
            torch.testing.assert_close(p.double(), q, rtol=2e-5, atol=atol, msg=lambda m, i=i: f"param {i}: {m}")
