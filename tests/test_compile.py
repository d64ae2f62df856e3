"""fusedopt inside torch.compile: compiled optimizer steps and train steps match eager torch.optim, the compiled
graphs call the fusedopt custom ops, and the ops pass torch.library.opcheck. (Losses: test_compile_losses.py;
CUDA graphs: test_cuda_graphs.py.)"""

from __future__ import annotations

import optim_db
import pytest
import torch
from conftest import assert_close

import fusedopt

# (fusedopt class, reference class, kwargs): every optimizer of the registry (tests/optim_db.py), every case.
OPTIMIZERS = optim_db.cases("compile")
SHAPES = [(7,), (33, 5), (1100,)]
STEPS = 6


_opt_id = optim_db.case_id


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new graphs: without a reset, recompiles of the shared step function would hit Dynamo's
    recompile limit and silently fall back to eager."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class GraphRecorder:
    """A torch.compile backend that keeps every FX graph Dynamo hands over, then runs it with aot_eager (so the
    custom ops also go through AOTAutograd's functionalization, like inductor)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def op_names(self) -> set:
        return {str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"}


def _params(dtype, gen, device="cpu"):
    base = [torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in SHAPES]
    return [torch.nn.Parameter(b.to(dtype)) for b in base], [torch.nn.Parameter(b.clone()) for b in base]


def _set_grads(fused_params, ref_params, step, gen, dtype):
    for k, (p, q) in enumerate(zip(fused_params, ref_params)):
        if (step + k) % 5 == 3:  # some grads missing: the bucket set changes (a recompile) and must stay right
            p.grad = q.grad = None
            continue
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device) * (3.0 if step % 2 else 0.2)
        p.grad, q.grad = g.to(dtype), g.to(dtype).double()


def _compare(fused, ref, fused_params, ref_params, dtype, where):
    for i, (p, q) in enumerate(zip(fused_params, ref_params)):
        assert_close(p.detach(), q.detach(), dtype, f"{where}: param {i}")
        for key, rv in ref.state[q].items():
            fv = fused.state[p][key]
            if key == "step":
                assert float(fv) == float(rv), f"{where}: param {i} step"
            else:
                assert_close(fv, rv, dtype, f"{where}: param {i} state {key}")


@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), OPTIMIZERS, ids=_opt_id)
@pytest.mark.parametrize(
    ("device", "backend"),
    [("cpu", "cpu"), ("cpu", "torch"), *(pytest.param("cuda", b, marks=pytest.mark.gpu) for b in ("cuda", "triton"))],
)
def test_compiled_step_matches_eager_torch(cls, ref_cls, kwargs, device, backend):
    """torch.compile(fullgraph=True) around opt.step(): the same params and state as eager torch.optim in float64,
    step after step, and the graph calls fusedopt::<op> (not the eager fast path, which Dynamo would trace into)."""
    gen = torch.Generator().manual_seed(5)
    fused_params, ref_params = _params(torch.float32, gen, device)
    fused = cls(fused_params, backend=backend, **kwargs)
    ref = ref_cls(ref_params, foreach=False, **kwargs)
    recorder = GraphRecorder()
    step = torch.compile(fused.step, backend=recorder, fullgraph=True)
    for s in range(STEPS):
        _set_grads(fused_params, ref_params, s, gen, torch.float32)
        step()
        ref.step()
        _compare(fused, ref, fused_params, ref_params, torch.float32, f"step {s + 1}")
    assert f"fusedopt.{optim_db.op_of(cls)}.default" in recorder.op_names()


@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), optim_db.one_case_per_op("compile"), ids=_opt_id)
def test_inductor_step_with_folded_clip(cls, ref_cls, kwargs):
    """Inductor (which re-inplaces the functionalized ops) around a step with max_grad_norm folded in: equal to
    eager torch clip_grad_norm_ + step. The folded clip coefficient is float32, so float32 tolerances."""
    gen = torch.Generator().manual_seed(6)
    fused_params, ref_params = _params(torch.float64, gen)
    fused = cls(fused_params, backend="cpu", max_grad_norm=1.0, **kwargs)
    ref = ref_cls(ref_params, foreach=False, **kwargs)
    step = torch.compile(fused.step, backend="inductor", fullgraph=True)
    for s in range(STEPS):
        _set_grads(fused_params, ref_params, s, gen, torch.float64)
        step()
        norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref.step()
        assert_close(fused.last_grad_norm, norm, torch.float32, f"step {s + 1} norm", reduction=True)
        _compare(fused, ref, fused_params, ref_params, torch.float32, f"step {s + 1}")


def _mlp(gen):
    torch.manual_seed(int(torch.randint(0, 1000, (), generator=gen)))
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()


@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), optim_db.one_case_per_op("compile"), ids=_opt_id)
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_train_step_matches_eager_torch(cls, ref_cls, kwargs, compile_backend):
    """torch.compile around a whole train step (forward, loss, backward, clip_grad_norm_, step, zero_grad) with
    fusedopt's optimizer and clipping gives the params of the same eager step with torch.optim and torch's clip."""
    gen = torch.Generator().manual_seed(7)
    model = _mlp(gen)
    ref_model = _mlp(torch.Generator().manual_seed(7))
    fused = cls(model.parameters(), backend="cpu", **kwargs)
    ref = ref_cls(ref_model.parameters(), foreach=False, **kwargs)

    def train_step(x, y, m, opt, clip):
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        clip(m.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend=compile_backend)
    for s in range(STEPS):
        x, y = torch.randn(8, 12, generator=gen, dtype=torch.float64), torch.randn(8, 4, generator=gen).double()
        loss = compiled(x, y, model, fused, fusedopt.nn.utils.clip_grad_norm_)
        ref_loss = train_step(x, y, ref_model, ref, torch.nn.utils.clip_grad_norm_)
        assert_close(loss, ref_loss, torch.float64, f"step {s + 1} loss")
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            assert_close(p, q, torch.float64, f"step {s + 1} {name}")


def test_tensor_lr_and_scheduler_compile_once():
    """A tensor lr (what torch recommends for compiled optimizers) changed by an LR scheduler between steps: the
    params follow eager torch.optim with the same schedule, with no recompile per lr value. The scheduler wraps
    opt.step in a function Dynamo never traces (torch.optim's own step gives the same error under fullgraph=True),
    so, as torch's tutorial does, the step is called from a compiled function with graph breaks allowed."""
    gen = torch.Generator().manual_seed(8)
    fused_params, ref_params = _params(torch.float64, gen)
    fused = fusedopt.AdamW(fused_params, lr=torch.tensor(0.05, dtype=torch.float64), backend="cpu")
    ref = torch.optim.AdamW(ref_params, lr=torch.tensor(0.05, dtype=torch.float64), foreach=False)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (fused, ref)]
    recorder = GraphRecorder()
    step = torch.compile(lambda: fused.step(), backend=recorder)
    for s in range(STEPS):
        for p, q in zip(fused_params, ref_params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            q.grad = p.grad.clone()
        step()
        ref.step()
        for sch in scheds:
            sch.step()
        _compare(fused, ref, fused_params, ref_params, torch.float64, f"step {s + 1}")
        if s == 1:
            graphs_after_two = len(recorder.graphs)  # the first step creates the state: its own graph
    assert "fusedopt.adam_step.default" in recorder.op_names()
    assert len(recorder.graphs) == graphs_after_two, "a new lr value recompiled the step"


def _op_cases():
    gen = torch.Generator().manual_seed(21)
    ps = lambda: [torch.randn(n, generator=gen) for n in (5, 300)]
    zeros = lambda: [torch.zeros(n) for n in (5, 300)]
    steps = lambda: [torch.zeros(()) for _ in range(2)]
    amp = lambda: (torch.tensor(2.0), torch.tensor(0.0))
    return {
        "adam_step": (ps(), ps(), zeros(), zeros(), zeros(), steps(), 0.01, None, 0.9, 0.99, 1e-8, 0.1, True, True,
                      False, *amp(), True, None, [], "cpu"),
        "rmsprop_step": (ps(), ps(), zeros(), zeros(), zeros(), steps(), 0.0, torch.tensor(0.01), 0.9, 1e-8, 0.1, 0.5,
                         True, False, *amp(), True, None, [], "cpu"),
        "sgd_step": (ps(), ps(), zeros(), [torch.ones(()) for _ in range(2)], 0.01, None, 0.9, 0.1, 0.01, True, False,
                     *amp(), True, None, [], "cpu"),
        "grad_norm": (ps(), 2.0, "cpu"),
        "scale_grads": (ps(), torch.tensor(0.5, dtype=torch.float64), "cpu"),
    }


@pytest.mark.parametrize("name", ["adam_step", "rmsprop_step", "sgd_step", "grad_norm", "scale_grads"])
def test_optimizer_ops_pass_full_opcheck(name):
    """Every opcheck utility, including AOTAutograd with dynamic shapes (what inductor runs) and the autograd
    registration check: the fake impls and the (a!) mutation annotations are what the kernels do."""
    op = getattr(torch.ops.fusedopt, name).default
    result = torch.library.opcheck(op, _op_cases()[name])
    assert set(result.values()) == {"SUCCESS"}, result
