"""CUDA graphs (GPU only): fusedopt optimizer steps captured with torch.cuda.graph and replayed give the params of
eager torch.optim, including a whole captured train step whose grads are allocated during capture, a tensor lr
changed between replays. The CUDA kernels' tensor table is written by
kernel launches under capture (csrc/cuda/multi_tensor_apply.cuh); the Triton backend refuses capture with an error.
"""

from __future__ import annotations

import inspect

import optim_db
import pytest
import torch
from conftest import assert_close, assert_same_steps

import fusedopt

pytestmark = pytest.mark.gpu

# Every optimizer of the registry (tests/optim_db.py), every case; capturable=True where torch's class has it
# (torch.optim.SGD and Adagrad have none: their steps are capture-safe as they are).
OPTIMIZERS = [
    (cls, ref, {**kw, "capturable": True} if "capturable" in inspect.signature(ref).parameters else kw)
    for cls, ref, kw in optim_db.cases("cuda_graphs")
]
# Many tensors and one larger than a chunk: the table (addresses, numels, block map) spans several fill launches.
SHAPES = [(3,), (70000,), (33, 65)] + [(17,)] * 200
WARMUP, REPLAYS = 3, 5


def _opt_id(x):
    if isinstance(x, type):
        return x.__name__
    return "-".join(f"{k}={v}" for k, v in x.items()) if isinstance(x, dict) else ""


def _warmup(fn, steps: int) -> None:
    """torch.cuda.graphs' recipe: eager iterations on a side stream before capture (state gets created there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(steps):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)


def _compare(fused, ref, fused_params, ref_params, where):
    for i, (p, q) in enumerate(zip(fused_params, ref_params)):
        assert_close(p.detach(), q.detach(), torch.float32, f"{where}: param {i}")
        for key, rv in ref.state[q].items():
            if key == "step":
                assert float(fused.state[p][key]) == float(rv), f"{where}: param {i} step"
            else:
                assert_close(fused.state[p][key], rv, torch.float32, f"{where}: param {i} {key}")


@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), OPTIMIZERS, ids=_opt_id)
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_captured_step_replays_like_eager_torch(cls, ref_cls, kwargs, backend):
    """opt.step() captured once and replayed with new grads copied into the static grads: every replay equals an
    eager torch.optim step (float64 reference) with the same grads."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = [torch.randn(s, device="cuda", dtype=torch.float64, generator=gen) for s in SHAPES]
    params = [torch.nn.Parameter(b.float()) for b in base]
    ref_params = [torch.nn.Parameter(b.clone()) for b in base]
    for p in params:
        p.grad = torch.zeros_like(p)  # static grads: the captured kernels read these addresses
    fused = cls(params, backend=backend, **kwargs)
    ref = ref_cls(ref_params, foreach=False, **kwargs)

    def new_grads(_=None):
        for p, q in zip(params, ref_params):
            g = torch.randn(p.shape, device="cuda", dtype=torch.float64, generator=gen)
            p.grad.copy_(g)
            q.grad = p.grad.double()

    def eager_step(i):
        new_grads()
        fused.step()
        ref.step()

    _warmup(eager_step, WARMUP)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step()
    # Capture recorded the step but ran nothing: the state is still the warm-up's.
    _compare(fused, ref, params, ref_params, "after capture")
    for r in range(REPLAYS):
        new_grads()
        graph.replay()
        ref.step()
        torch.cuda.synchronize()
        _compare(fused, ref, params, ref_params, f"replay {r + 1}")


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_captured_tensor_lr_follows_the_scheduler(backend):
    """A tensor lr stays a device read in the graph: changing it in place between replays (as torch's LR schedulers
    do for tensor lrs) changes the replayed update, like eager torch.optim with capturable=True."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    base = [torch.randn(s, device="cuda", generator=gen) for s in SHAPES[:3]]
    params = [torch.nn.Parameter(b.clone()) for b in base]
    ref_params = [torch.nn.Parameter(b.clone()) for b in base]
    for p in params:
        p.grad = torch.zeros_like(p)
    lr = lambda: torch.tensor(0.05, device="cuda")
    fused = fusedopt.AdamW(params, lr=lr(), capturable=True, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=lr(), capturable=True, foreach=False)
    scheds = [torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.7) for o in (fused, ref)]

    def new_grads(_=None):
        for p, q in zip(params, ref_params):
            p.grad.copy_(torch.randn(p.shape, device="cuda", generator=gen))
            q.grad = p.grad.clone()

    _warmup(lambda i: (new_grads(), fused.step(), ref.step()), WARMUP)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step()
    for r in range(REPLAYS):
        for sch in scheds:
            sch.step()
        new_grads()
        graph.replay()
        ref.step()
        torch.cuda.synchronize()
        _compare(fused, ref, params, ref_params, f"replay {r + 1}")


@pytest.mark.parametrize(("cls", "ref_cls", "kwargs"), OPTIMIZERS[:4], ids=_opt_id)
def test_whole_captured_train_step(cls, ref_cls, kwargs):
    """torch.cuda.graphs' whole-network recipe: zero_grad(set_to_none=True), forward, backward and step captured
    together, so the grads are allocated inside the capture (new addresses the eager warm-up never saw) and
    max_grad_norm folds the clip into the step. Replays match the same eager steps with torch.optim and torch's
    clip_grad_norm_."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    ref_model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8)).cuda()
    ref_model.load_state_dict(model.state_dict())
    fused = cls(model.parameters(), max_grad_norm=0.5, **kwargs)
    ref = ref_cls(ref_model.parameters(), foreach=False, **kwargs)
    gen = torch.Generator(device="cuda").manual_seed(3)
    static_x, static_y = torch.zeros(16, 32, device="cuda"), torch.zeros(16, 8, device="cuda")

    def fused_step():
        fused.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(static_x), static_y)
        loss.backward()
        fused.step()
        return loss

    def ref_step():
        ref.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(ref_model(static_x), static_y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.5)
        ref.step()
        return loss

    def new_batch():
        static_x.copy_(torch.randn(16, 32, device="cuda", generator=gen))
        static_y.copy_(torch.randn(16, 8, device="cuda", generator=gen))

    _warmup(lambda i: (new_batch(), fused_step(), ref_step()), WARMUP)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = fused_step()
    for r in range(REPLAYS):
        new_batch()
        graph.replay()
        ref_loss = ref_step()
        torch.cuda.synchronize()
        assert_close(static_loss, ref_loss, torch.float32, f"replay {r + 1} loss", reduction=True)
        for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
            assert_close(p, q, torch.float32, f"replay {r + 1} param {i}")


def test_triton_backend_refuses_capture():
    """The Triton kernels copy their table from host memory on each call: capturing them would replay a stale
    host buffer, so fusedopt raises instead."""
    params = [torch.nn.Parameter(torch.randn(100, device="cuda"))]
    params[0].grad = torch.randn(100, device="cuda")
    opt = fusedopt.Adam(params, backend="triton", capturable=True)
    _warmup(lambda i: opt.step(), 1)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"), torch.cuda.graph(graph):
        opt.step()


LOWBIT = [(fusedopt.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "capturable": True}),
          (fusedopt.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": True})]  # fmt: skip


@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8"])
@pytest.mark.parametrize(("cls", "kwargs"), LOWBIT, ids=[c.__name__ for c, _ in LOWBIT])
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_captured_lowbit_step_replays_like_eager(cls, kwargs, backend, state_dtype):
    """Low-bit states (docs/LOW_BIT_STATES.md) under capture: the captured step dequantizes, updates and requantizes
    the codes and absmax in place, so every replay equals an eager twin of the same format and backend, bit for bit
    (params, codes, absmax, step). Two quantized params (one past a chunk) and one small full-precision one."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    base = [torch.randn(s, device="cuda", generator=gen) for s in [(5000,), (70000,), (33, 65)]]
    params = [torch.nn.Parameter(b.clone()) for b in base]
    twins = [torch.nn.Parameter(b.clone()) for b in base]
    for p in params:
        p.grad = torch.zeros_like(p)
    fused = cls(params, backend=backend, state_dtype=state_dtype, **kwargs)
    eager = cls(twins, backend=backend, state_dtype=state_dtype, **kwargs)

    def new_grads(_=None):
        for p, q in zip(params, twins):
            p.grad.copy_(torch.randn(p.shape, device="cuda", generator=gen))
            q.grad = p.grad.clone()

    _warmup(lambda i: (new_grads(), fused.step(), eager.step()), WARMUP)
    assert any(k.endswith("_codes") for k in fused.state[params[0]]), "the states are not quantized"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused.step()
    for r in range(REPLAYS):
        new_grads()
        graph.replay()
        eager.step()
        torch.cuda.synchronize()
        assert_same_steps(fused, params, eager, twins, f"replay {r + 1}")
