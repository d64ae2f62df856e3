"""Clipping folded into the optimizers' step (max_grad_norm=): equal to clip_grad_norm_ followed by step(), on
the unscaled grads under GradScaler, with the norm kept on the device as last_grad_norm."""

from __future__ import annotations

import optim_db
import pytest
import torch
from conftest import ALL_DTYPES, assert_close

import fusedopt
from fusedopt.nn.utils import clip_grad_norm_

# --- clipping folded into the step -----------------------------------------------------------------------------

# Every optimizer of the registry (tests/optim_db.py), its first case.
OPTIMIZERS = [(cls, kwargs) for cls, _, kwargs in optim_db.first_cases("max_grad_norm")]


def _opt_id(x):
    return x.__name__ if isinstance(x, type) else ""


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=_opt_id)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_folded_clip_equals_clip_then_step(cls, kwargs, dtype, backend):
    """opt(max_grad_norm=m).step() == clip_grad_norm_(params, m); opt.step(), and last_grad_norm is that norm.

    The clip coefficient is carried in float32 inside the kernels (with GradScaler's scale), so float64 params are
    held to float32's tolerance here. 16-bit runs compare one step without weight decay: there the plain path rounds
    the clipped grad to 16 bits before the step and the folded one does not, and where grad + wd * param cancels
    that rounding can flip the sign of Adam's first update (a legitimate +-lr difference, not a fold error)."""
    if dtype in (torch.bfloat16, torch.float16):
        reason = optim_db.info_of(cls).not_applicable.get("max_grad_norm_16bit")
        if reason:
            pytest.skip(f"{cls.__name__}: {reason}")
        kwargs = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    gen = torch.Generator().manual_seed(11)
    base = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in ((5,), (40, 3), (900,))]
    folded = [torch.nn.Parameter(b.clone()) for b in base]
    plain = [torch.nn.Parameter(b.clone()) for b in base]
    opt_a = cls(folded, backend=backend, max_grad_norm=1.5, **kwargs)
    opt_b = cls(plain, backend=backend, max_grad_norm=None, **kwargs)  # LAMB clips by default
    check = torch.float32 if dtype == torch.float64 else dtype
    for s in range(20 if dtype in (torch.float32, torch.float64) else 1):
        for i, (a, b) in enumerate(zip(folded, plain)):
            g = (torch.randn(a.shape, generator=gen, dtype=torch.float64) * (0.1 if s % 3 == 0 else 2.0)).to(dtype)
            a.grad, b.grad = (None, None) if (s + i) % 5 == 4 else (g.clone(), g.clone())
        norm = clip_grad_norm_(plain, 1.5)
        opt_b.step()
        opt_a.step()
        assert_close(opt_a.last_grad_norm, norm, check, f"step {s} norm", reduction=True)
        for i, (a, b) in enumerate(zip(folded, plain)):
            assert_close(a, b, check, f"step {s} param {i}")
            for k, v in opt_b.state[b].items():
                assert_close(opt_a.state[a][k], v, check, f"step {s} param {i} {k}")


@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=_opt_id)
def test_folded_clip_with_grad_scaler(cls, kwargs):
    """With GradScaler the folded norm is the norm of the UNSCALED grads; inf steps are skipped."""
    gen = torch.Generator().manual_seed(12)
    base = [torch.randn(s, generator=gen) for s in ((6,), (50,))]
    folded = [torch.nn.Parameter(b.clone()) for b in base]
    plain = [torch.nn.Parameter(b.clone()) for b in base]
    opt_a = cls(folded, backend="cpu", max_grad_norm=0.8, **kwargs)
    opt_b = cls(plain, backend="cpu", max_grad_norm=None, **kwargs)
    sc_a, sc_b = (torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in range(2))
    for s in range(12):
        scale = sc_a.get_scale()
        for a, b in zip(folded, plain):
            g = torch.randn(a.shape, generator=gen) * scale
            a.grad, b.grad = g.clone(), g.clone()
        if s == 3:
            folded[1].grad[0] = plain[1].grad[0] = float("inf")
        for sc in (sc_a, sc_b):
            sc.scale(torch.ones(()))
        sc_b.unscale_(opt_b)
        norm = clip_grad_norm_(plain, 0.8)
        sc_b.step(opt_b)
        sc_a.step(opt_a)
        sc_a.update()
        sc_b.update()
        if s != 3:
            assert_close(opt_a.last_grad_norm, norm, torch.float32, f"step {s} norm", reduction=True)
        for a, b in zip(folded, plain):
            assert_close(a, b, torch.float32, f"step {s} param")


def test_last_grad_norm_none_until_step_and_no_sync_shape():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fusedopt.SGD([p], lr=0.1, max_grad_norm=1.0)
    assert opt.last_grad_norm is None
    p.grad = torch.full((3,), 4.0)
    opt.step()
    assert isinstance(opt.last_grad_norm, torch.Tensor) and opt.last_grad_norm.shape == ()
    torch.testing.assert_close(opt.last_grad_norm, torch.tensor(48.0).sqrt())


@pytest.mark.gpu
@pytest.mark.parametrize(("cls", "kwargs"), OPTIMIZERS, ids=_opt_id)
def test_clip_and_folded_clip_gpu(cls, kwargs):
    """clip_grad_norm_ (no host sync) and max_grad_norm on CUDA match torch's clip + step."""
    gen = torch.Generator().manual_seed(13)
    base = [torch.randn(s, generator=gen).cuda() for s in ((5,), (70001,), (3, 65537))]
    folded = [torch.nn.Parameter(b.clone()) for b in base]
    plain = [torch.nn.Parameter(b.clone()) for b in base]
    ours = [torch.nn.Parameter(b.clone()) for b in base]
    opt_a = cls(folded, max_grad_norm=1.5, **kwargs)
    opt_b = cls(plain, max_grad_norm=None, **kwargs)
    for s in range(10):
        for a, b, c in zip(folded, plain, ours):
            g = torch.randn(a.shape, generator=gen).cuda() * (0.01 if s % 3 == 0 else 2.0)
            a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(plain, 1.5)
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours_norm = clip_grad_norm_(ours, 1.5)
            opt_a.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt_b.step()
        assert_close(ours_norm, norm, torch.float32, "clip norm", reduction=True)
        assert_close(opt_a.last_grad_norm, norm, torch.float32, "folded norm", reduction=True)
        for a, b, c in zip(folded, plain, ours):
            assert_close(c.grad, b.grad, torch.float32, "clipped grads")
            assert_close(a, b, torch.float32, f"step {s} param")
