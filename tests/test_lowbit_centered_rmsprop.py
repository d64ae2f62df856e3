"""Centered RMSprop with low-bit states (docs/LOW_BIT_STATES.md, "Centered RMSprop"): square_avg and grad_avg are
quantized apart, so square_avg - grad_avg^2 can go below 0. The quantized step clamps it at 0 on every backend;
full precision keeps torch.optim.RMSprop's math, NaN included.

The case is built so every backend's float32 arithmetic is exact up to the same roundings (alpha = 0.5, grad_avg and
the grad one short-mantissa constant per block, so grad_avg^2 is exact and fma or not makes no difference): the
backends must then agree bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_backends

import fusedopt
from fusedopt import lowbit

SHAPE = (32, 256)  # 8192 elements: quantized (>= MIN_QUANT_NUMEL), 32 int8 blocks, 64 int4 blocks
LR, ALPHA, EPS = 1e-3, 0.5, 1e-8
FORMATS = ["int8", "int4"]
BACKENDS = cpu_backends()


def _case(state_dtype):
    """(param, grad, square_avg, grad_avg) as float32 values: grad_avg and the grad are one constant c per 256
    elements (a multiple of 2^-4: c^2 exact), so they quantize to code value 1 times absmax c exactly; square_avg is
    1.2 c^2 on most elements and 0.9 c^2 on every third, which quantizes to about 0.75 * 1.2 c^2 < c^2. With grad ==
    grad_avg the new variance is alpha * (square_avg - grad_avg^2): negative on those elements."""
    n = SHAPE[0] * SHAPE[1]
    c = (torch.arange(n) // 256 % 13 + 4).float() / 16  # 0.25 .. 1, one value per int8 block (two int4 blocks)
    factor = torch.where(torch.arange(n) % 3 == 0, 0.9, 1.2)
    signed, unsigned = (lowbit.qmap(s, "cpu", state_dtype) for s in (True, False))
    ga = lowbit.dequantize(*lowbit.quantize(c, signed, state_dtype), signed, state_dtype=state_dtype, shape=(n,))
    assert torch.equal(ga, c)
    sq = lowbit.dequantize(*lowbit.quantize(c * c * factor, unsigned, state_dtype), unsigned,
                           state_dtype=state_dtype, shape=(n,))  # fmt: skip
    param = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    return param, ga.view(SHAPE).clone(), sq.view(SHAPE), ga.view(SHAPE)


def _set_q8_state(opt, p, key, signed, value, state_dtype):
    codes, absmax = lowbit.quantize(value, lowbit.qmap(signed, "cpu", state_dtype), state_dtype)
    opt.state[p][lowbit.codes_key(key)].copy_(codes)  # in place: the step's lists hold these tensors
    opt.state[p][lowbit.absmax_key(key)].copy_(absmax)


def _quantized_step(backend, state_dtype, momentum):
    param, grad, sq, ga = _case(state_dtype)
    p = param.clone().requires_grad_()
    opt = fusedopt.RMSprop([p], lr=LR, alpha=ALPHA, eps=EPS, momentum=momentum, centered=True, backend=backend,
                           state_dtype=state_dtype)  # fmt: skip
    p.grad = torch.zeros_like(p)
    opt.step()  # makes the states (all zero; the param does not move)
    assert torch.equal(p, param)
    _set_q8_state(opt, p, "square_avg", False, sq, state_dtype)
    _set_q8_state(opt, p, "grad_avg", True, ga, state_dtype)
    p.grad = grad.clone()
    opt.step()
    return p.detach(), {k: v for k, v in opt.state[p].items() if k != "step"}


def _full_precision_step(make, momentum):
    """The same step with full-precision states holding the dequantized values (int8's)."""
    param, grad, sq, ga = _case("int8")
    p = param.clone().requires_grad_()
    opt = make([p], lr=LR, alpha=ALPHA, eps=EPS, momentum=momentum, centered=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    opt.state[p]["square_avg"].copy_(sq)
    opt.state[p]["grad_avg"].copy_(ga)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def _negative(state_dtype):
    """Where alpha * square_avg + (1 - alpha) * grad^2 - grad_avg^2 < 0 (float64: no rounding decides it here)."""
    _, grad, sq, ga = _case(state_dtype)
    variance = ALPHA * sq.double() + (1 - ALPHA) * grad.double() ** 2 - ga.double() ** 2
    return variance < 0


@pytest.mark.parametrize("state_dtype", FORMATS)
def test_case_has_negative_variances(state_dtype):
    neg = _negative(state_dtype)
    assert 0.2 < neg.float().mean() < 0.5  # every third element, and not the others


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_full_precision_keeps_torch_nan(backend, momentum):
    """Full precision is torch.optim.RMSprop's math: a negative variance reads NaN there, on the same elements and
    only there. The other values to float32's default tolerance: the backends compute lr * (g / avg) where torch
    has an addcdiv, a last-bit difference on a few values (as tests/test_rmsprop.py allows)."""
    expect = _full_precision_step(lambda *a, **kw: torch.optim.RMSprop(*a, foreach=False, **kw), momentum)
    got = _full_precision_step(lambda *a, **kw: fusedopt.RMSprop(*a, backend=backend, **kw), momentum)
    assert torch.equal(expect.isnan(), _negative("int8"))
    assert torch.equal(got.isnan(), expect.isnan())
    torch.testing.assert_close(got, expect, equal_nan=True)


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_step_clamps_the_variance(backend, momentum, state_dtype):
    """The quantized step is finite, equals the torch backend's definition bit for bit (param, codes, absmax), and
    where the variance was negative it is sqrt(0) + eps: the update is lr * grad / eps."""
    p, state = _quantized_step(backend, state_dtype, momentum)
    assert p.isfinite().all()
    for v in state.values():
        assert v.float().isfinite().all()
    ref_p, ref_state = _quantized_step("torch", state_dtype, momentum)
    # With momentum the param update is one fma (torch's add_ with alpha): Triton's interpreter rounds tl.fma twice (a
    # GPU once), the product first, so there a param may be off by half an ulp of lr * buf (1e-9 covers these values)
    same_param = (lambda a, b: torch.testing.assert_close(a, b, rtol=2**-22, atol=1e-9) or True) if (
        backend == "triton" and momentum) else torch.equal  # fmt: skip
    assert same_param(p, ref_p)
    assert state.keys() == ref_state.keys()
    for k in state:
        assert torch.equal(state[k], ref_state[k]), k
    param, grad, _, _ = _case(state_dtype)
    neg = _negative(state_dtype)
    eps = torch.full_like(grad, EPS)  # the momentum buffer starts at 0: with momentum it is grad / eps too
    # torch.optim.RMSprop's roundings: param.add_(buf, alpha=-lr) with momentum, else param.addcdiv_(grad, avg, -lr)
    want = param.add(grad / eps, alpha=-LR) if momentum else param.addcdiv(grad, eps, value=-LR)
    assert same_param(p[neg], want[neg])
