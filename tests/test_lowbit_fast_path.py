"""The eager fast path of low-bit steps: a bucket's params, codes, absmax and steps held in C++ (TensorBucket,
<op>_step_q8_bucket), the grads read there. It must step exactly as the list path (<op>_step_q8 through the
registered op) does, bit for bit, and it must not outlive the tensors it holds (load_state_dict replaces them).
The fused kernels themselves are checked against the definition in test_lowbit_states.py, which now runs this path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_steps

import fusedopt
from fusedopt.ops import optim_step

SHAPES = [(80, 64), (5000,), (7, 9)]  # two quantized params (whole blocks; a tail), one below MIN_QUANT_NUMEL
CASES = {
    "AdamW-amsgrad": (fusedopt.AdamW, dict(lr=0.01, weight_decay=0.1, amsgrad=True)),
    "Adam-lr_tensor": (fusedopt.Adam, dict(lr=torch.tensor(0.01))),
    "SGD-nesterov": (fusedopt.SGD, dict(lr=0.01, momentum=0.9, nesterov=True)),  # first-step flags
    "RMSprop-centered": (fusedopt.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    "Lion": (fusedopt.Lion, dict(lr=0.001, weight_decay=0.1)),
    "Adagrad": (fusedopt.Adagrad, dict(lr=0.01)),
}
STEPS = 20


def _params(dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in SHAPES]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * (1 + step % 3)).to(p.device, p.dtype)


def run_steps(opt, params, first: int, count: int) -> None:
    """Steps first .. first + count - 1, each with _set_grads' grads of that step."""
    for s in range(first, first + count):
        _set_grads(params, s)
        opt.step()


def _list_path_only(opt):
    """The optimizer's steps take the list path: its fast path declines every step."""
    opt._step_cached = lambda *args, **kwargs: False
    return opt


def _make(name, state_dtype, dtype=torch.float32, device="cpu", **extra):
    cls, kw = CASES[name]
    kw = {k: v.clone().to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    params = _params(dtype, device)
    return params, cls(params, backend=device, state_dtype=state_dtype, **kw, **extra)


@pytest.fixture
def list_path_calls(monkeypatch):
    """Counts the steps that went through optim_step.step_q8 (the list path)."""
    calls = []
    real = optim_step.step_q8

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(optim_step, "step_q8", counting)
    return calls


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", ["int8", "int4", "fp8"])
@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_steps_like_the_list_path(name, state_dtype, device, list_path_calls):
    """20 steps on each path (backend cpu or cuda): params and every state tensor (codes, absmax, the
    full-precision state of the small param, steps) equal bit for bit; after the first step (SGD's first-step flags
    take the list path then) the fast optimizer never calls the list path, the other one every step."""
    fast_params, fast = _make(name, state_dtype, device=device)
    slow_params, slow = _make(name, state_dtype, device=device)
    _list_path_only(slow)
    for step in range(STEPS):
        _set_grads(fast_params, step)
        _set_grads(slow_params, step)
        before = len(list_path_calls)
        fast.step()
        if step > 0:
            assert len(list_path_calls) == before, "the fast optimizer took the list path"
        slow.step()
        assert len(list_path_calls) == before + 1 + (step == 0 and name.startswith("SGD"))
    assert_same_steps(fast, fast_params, slow, slow_params)


@pytest.mark.parametrize(("saved", "loaded"), [("int8", "int8"), ("int8", "int4"), ("fp8", "int8")])
def test_fast_path_follows_load_state_dict(saved, loaded):
    """load_state_dict replaces the state tensors (and converts them to the group's format): the fast path must step
    the new ones. The optimizer loads a checkpoint of its own earlier state, in `saved` format, and must then step
    like an optimizer on the list path that loaded the same checkpoint."""
    params, opt = _make("AdamW-amsgrad", saved)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    checkpoint = copy.deepcopy(opt.state_dict())
    values = [p.detach().clone() for p in params]
    for step in range(3, 6):  # moves the state the C++ bucket holds
        _set_grads(params, step)
        opt.step()
    if loaded != saved:
        params, opt = _make("AdamW-amsgrad", loaded)
        for step in range(2):  # a fast path made before the load
            _set_grads(params, step)
            opt.step()
    ref_params, ref = _make("AdamW-amsgrad", loaded)
    _list_path_only(ref)
    with torch.no_grad():
        for p, q, v in zip(params, ref_params, values):
            p.copy_(v)
            q.copy_(v)
    opt.load_state_dict(copy.deepcopy(checkpoint))
    ref.load_state_dict(copy.deepcopy(checkpoint))
    for step in range(6, 6 + STEPS):
        _set_grads(params, step)
        _set_grads(ref_params, step)
        opt.step()
        ref.step()
    assert_same_steps(opt, params, ref, ref_params)


def test_fast_path_with_bf16_stochastic_rounding():
    """bf16 params rounded stochastically from int8 states: the fast path passes the same [seed, counter]."""
    fast_params, fast = _make("AdamW-amsgrad", "int8", torch.bfloat16, bf16_stochastic_round=True)
    slow_params, slow = _make("AdamW-amsgrad", "int8", torch.bfloat16, bf16_stochastic_round=True)
    _list_path_only(slow)
    for step in range(STEPS):
        _set_grads(fast_params, step)
        _set_grads(slow_params, step)
        fast.step()
        slow.step()
    assert_same_steps(fast, fast_params, slow, slow_params)
    assert not torch.equal(fast_params[0], _params(torch.bfloat16)[0])


def test_fast_path_declines_master_weights(list_path_calls):
    """Master weights are not held in C++: those steps take the list path (and stay exact)."""
    params, opt = _make("AdamW-amsgrad", "int8", torch.bfloat16, master_weights=True)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    assert len(list_path_calls) == 3


def _bad_step(case: str, fast: bool):
    """Two int8 AdamW steps, the second on bad input; (the error's message, or None; the param and state after)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 80, generator=gen)
    p = torch.nn.Parameter(base.t() if case == "non-contiguous param" else base.clone())
    opt = fusedopt.AdamW([p], lr=0.01, state_dtype="int8", backend="cpu")
    if not fast:
        _list_path_only(opt)
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    grad = torch.randn(p.shape, generator=gen)
    if case == "resized param":
        p.data = torch.randn(90, 64, generator=gen)
        grad = torch.randn(90, 64, generator=gen)
    elif case == "non-contiguous grad":
        grad = torch.randn(p.shape[::-1], generator=gen).t()
    elif case in ("nan grad", "inf grad"):
        grad[3, 4] = float(case[:3])
    elif case == "huge grad":
        grad.fill_(3e38)
    p.grad = grad
    try:
        opt.step()
    except RuntimeError as e:
        return str(e), p.detach().clone(), dict(opt.state[p])
    return None, p.detach().clone(), dict(opt.state[p])


BAD = ["resized param", "non-contiguous param", "non-contiguous grad", "nan grad", "inf grad", "huge grad"]


@pytest.mark.parametrize("case", BAD)
def test_fast_path_bad_input_as_the_list_path(case):
    """Bad and edge input through the C++-held lists: the same checks run every step, so a resized param gets the
    list path's error (its codes no longer fit; nothing is read past them), and NaN, inf, huge grads and
    non-contiguous tensors give the same params and states bit for bit."""
    fast_error, fast_param, fast_state = _bad_step(case, fast=True)
    list_error, list_param, list_state = _bad_step(case, fast=False)
    assert fast_error == list_error
    if case == "resized param":
        assert "codes must be a contiguous torch.uint8 tensor of its param's shape [90, 64]" in fast_error
        return
    assert fast_error is None
    assert torch.equal(fast_param.view(torch.int32), list_param.view(torch.int32))  # NaN payloads too
    for k, v in fast_state.items():
        assert torch.equal(v.view(-1).view(torch.uint8), list_state[k].view(-1).view(torch.uint8)), k
