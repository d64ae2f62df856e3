"""fusedopt.optim.SGD beyond the registry (tests/optim_db.py runs its option grid, state_dict, GradScaler and the
boundary checks on every backend): torch's first-step buffer copy (also across a GradScaler-skipped first step),
torch's state keys and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from parity_steps import compare, make_params, set_grads

import fusedopt

BACKENDS = cpu_backends()
FAST = [b for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_buffer_is_grad_copy(backend):
    """torch's first step: buf = grad (with weight decay), not (1 - dampening) * grad."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1, backend=backend)
    p.grad = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    expected = p.grad + 0.1 * p.detach()
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected, rtol=1e-12, atol=0)
    assert not opt._first_flags, "no GradScaler: the first-step flags are dropped after the step"


def test_state_keys_as_torch():
    """No 'step' in SGD state, no state at all without momentum, as torch."""
    for momentum in (0.0, 0.9):
        fused, ref = make_params([(4,), (3,)], torch.float64)
        opt_f, opt_r = fusedopt.SGD(fused, lr=0.1, momentum=momentum), torch.optim.SGD(ref, lr=0.1, momentum=momentum)
        for f, r in zip(fused, ref):
            f.grad, r.grad = torch.ones_like(f), torch.ones_like(r)
        opt_f.step()
        opt_r.step()
        sd_f, sd_r = opt_f.state_dict(), opt_r.state_dict()
        assert sd_f["state"].keys() == sd_r["state"].keys()
        assert all(v.keys() == sd_r["state"][k].keys() for k, v in sd_f["state"].items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dampening", [0.0, 0.4])
def test_grad_scaler_inf_skip(backend, dampening):
    """GradScaler: unscale and skip in the kernel. A skipped FIRST step leaves the buffer waiting: the next real step
    still starts it as a copy of the grad (torch's GradScaler skips step() entirely, so its buffer starts then)."""
    kwargs = {"lr": 0.01, "momentum": 0.9, "dampening": dampening, "nesterov": dampening == 0.0}
    shapes = [(5,), (130,) if backend == "triton" else (300,)]
    fused, ref = make_params(shapes, torch.float64)
    opt_f = fusedopt.SGD(fused, backend=backend, **kwargs)
    opt_r = torch.optim.SGD(ref, **kwargs)
    sc_f, sc_r = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) for _ in range(2))
    gen = torch.Generator().manual_seed(3)
    for s in range(20):
        set_grads(fused, ref, gen, s, none_every=0, scale=sc_f.get_scale())
        for r, f in zip(ref, fused):
            r.grad = f.grad.detach().clone()
        if s in (0, 1, 6):
            fused[1].grad[2] = float("inf") if s != 6 else float("nan")
            ref[1].grad[2] = fused[1].grad[2]
        for sc in (sc_f, sc_r):
            sc.scale(torch.ones(()))
        sc_f.step(opt_f)
        sc_r.step(opt_r)
        sc_f.update()
        sc_r.update()
        compare(opt_f, opt_r, fused, ref, torch.float64, f"scaler step {s}", skipped_first=True)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grad_scaler_first_step_skip_gpu(backend):
    """A GradScaler-skipped first step on CUDA: the device flag keeps the buffer waiting, no host sync."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, device="cuda"))
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, dampening=0.5, backend=backend)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0, device="cuda"), torch.tensor(1.0, device="cuda")
    p.grad = torch.full((3,), float("inf"), dtype=torch.float64, device="cuda")
    opt.step()
    assert not opt.state[p]["momentum_buffer"].any() and p.detach().tolist() == [1.0, -2.0, 3.0]
    opt.found_inf = torch.tensor(0.0, device="cuda")
    p.grad = torch.tensor([4.0, 8.0, -4.0], dtype=torch.float64, device="cuda")
    opt.step()
    expected = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)  # the unscaled grad: a copy, not (1 - 0.5) * it
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].cpu(), expected)


def test_differentiable_not_implemented():
    with pytest.raises(NotImplementedError, match="differentiable"):
        fusedopt.SGD([torch.nn.Parameter(torch.ones(2))], differentiable=True)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"momentum": -0.1}, "Invalid momentum"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
        ({"nesterov": True}, "Nesterov momentum requires a momentum and zero dampening"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, "Nesterov momentum requires"),
        ({"lr": torch.tensor([0.1, 0.2])}, "1-element"),
        ({"backend": "nope"}, "unknown backend"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.SGD([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_sparse_grad_rejected():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fusedopt.SGD([p], lr=0.1, backend="cpu").step()
