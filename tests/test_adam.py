"""fusedopt.optim.Adam / AdamW beyond the registry (tests/optim_db.py runs their option grids on every backend):
edge betas and eps, param groups, None grads and torch's errors."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends
from parity_steps import SHAPES, SMALL_SHAPES, run_parity_with

import fusedopt


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("betas,eps", [((0.5, 0.9), 1e-3), ((0.0, 0.5), 1e-6), ((0.99, 0.9999), 0.0)])
def test_adam_betas_eps(backend, betas, eps):
    shapes = SMALL_SHAPES if backend == "triton" else SHAPES
    run_parity_with(
        lambda ps: fusedopt.Adam(ps, lr=0.01, betas=betas, eps=eps, backend=backend),
        lambda ps: torch.optim.Adam(ps, lr=0.01, betas=betas, eps=eps, foreach=False),
        torch.float32,
        shapes=shapes,
    )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_param_groups_and_add_param_group(backend):
    def build(cls, ps, **kw):
        opt = cls([{"params": ps[:2], "lr": 0.05, "weight_decay": 0.2}, {"params": ps[2:4], "amsgrad": True}],
                  lr=0.01, **kw)  # fmt: skip
        opt.add_param_group({"params": ps[4:], "betas": (0.8, 0.95), "maximize": True})
        return opt

    run_parity_with(lambda ps: build(fusedopt.Adam, ps, backend=backend),
                    lambda ps: build(torch.optim.Adam, ps, foreach=False), torch.float32)  # fmt: skip


def test_none_grads_are_skipped():
    ps = [torch.randn(5, requires_grad=True) for _ in range(3)]
    before = ps[1].detach().clone()
    opt = fusedopt.Adam(ps, lr=0.1)
    ps[0].grad, ps[2].grad = torch.ones(5), torch.ones(5)
    opt.step()
    assert torch.equal(ps[1].detach(), before)
    assert ps[1] not in opt.state
    assert float(opt.state[ps[0]]["step"]) == 1.0


# --- bad input -------------------------------------------------------------------------------------------------
def test_sparse_grad_raises():
    p = torch.randn(4, 3, requires_grad=True)
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fusedopt.Adam([p]).step()


def test_differentiable_raises():
    with pytest.raises(NotImplementedError, match="differentiable"):
        fusedopt.Adam([torch.randn(2, requires_grad=True)], differentiable=True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(eps=-1.0), "Invalid epsilon"),
        (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay"),
        (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    ],
)
@pytest.mark.parametrize("cls", [fusedopt.Adam, fusedopt.AdamW])
def test_torch_value_errors_kept(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.randn(2, requires_grad=True)], **kwargs)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend"):
        fusedopt.Adam([torch.randn(2, requires_grad=True)], backend="tpu")


def test_missing_backend_says_why_and_how():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run adam on cpu tensors.*To get it"):
        fusedopt.Adam([p], backend="cuda").step()


def test_complex_params_rejected():
    p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    p.grad = torch.ones(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        fusedopt.Adam([p]).step()
