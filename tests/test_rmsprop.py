"""fusedopt.optim.RMSprop beyond the registry (tests/optim_db.py runs its option grid, state_dict, GradScaler and
the boundary checks on every backend): torch's errors, and buffers switched on after the state was made."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends

import fusedopt

BACKENDS = cpu_backends()
FAST = [b for b in BACKENDS if b != "triton"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "Invalid learning rate"),
        ({"eps": -1.0}, "Invalid epsilon"),
        ({"momentum": -0.1}, "Invalid momentum"),
        ({"weight_decay": -0.1}, "Invalid weight_decay"),
        ({"alpha": -0.1}, "Invalid alpha"),
        ({"lr": torch.tensor([0.1, 0.2])}, "1-element"),
        ({"backend": "nope"}, "unknown backend"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fusedopt.RMSprop([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_sparse_grad_rejected():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fusedopt.RMSprop([p], backend="cpu").step()


def test_unusable_backend_error_says_why():
    if torch.cuda.is_available():
        pytest.skip("checks the message for CUDA kernels asked for on CPU tensors")
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(RuntimeError, match="cannot run rmsprop on cpu"):
        fusedopt.RMSprop([p], backend="cuda").step()


@pytest.mark.parametrize("backend", FAST)
def test_momentum_switched_on_later(backend):
    """momentum/centered turned on after the state exists: the missing buffers start at zero (torch would KeyError)."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = fusedopt.RMSprop([p], backend=backend, lr=0.1)
    p.grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    opt.param_groups[0]["centered"] = True
    opt.step()
    assert set(opt.state[p]) == {"step", "square_avg", "momentum_buffer", "grad_avg"}
    assert float(opt.state[p]["step"]) == 2.0
