"""Low-bit steps against torch.optim itself, where they must agree exactly: the first step. New quantized states
are exact constants and a step updates the params from the state values before they are requantized, so the first
step of every option equals torch.optim's. test_lowbit_states.py compares with fusedopt's own plain-torch definition
(the same state init on both sides), which cannot see a state that starts wrong (SGD's momentum buffer did)."""

from __future__ import annotations

import pytest
import torch
from gloo import same
from test_lowbit_states import CASES, FORMATS, IDS, Q8_BACKENDS, _grads, _params

import fusedopt
from fusedopt import lowbit, master_weights

MASTER_CASES, MASTER_IDS = zip(*[(c, i) for c, i in zip(CASES, IDS) if c[0].takes("master_weights")])


def _first_step(info, kw, dtype, **fused_kw):
    """One step of the fused optimizer on the params of test_lowbit_states (three quantized, one small) in `dtype`,
    and of torch.optim on the same values in float64, with the same grads: (fused params, fused optimizer, reference
    params)."""
    params = _params(dtype, info=info)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    fused = info.fused(params, **fused_kw, **kw)
    ref = info.reference(ref_params, **kw)
    for p, q, g in zip(params, ref_params, _grads(params, 0)):
        p.grad, q.grad = g, g.double()
    fused.step()
    ref.step()
    return params, fused, ref_params


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize(("info", "kw"), CASES, ids=IDS)
def test_first_step_equals_torch_optim(info, kw, backend, state_dtype):
    """Every option of every optimizer with low-bit states, float32 params, against torch.optim in float64 (Muon's
    update within its bfloat16 Newton-Schulz precision, optim_db.muon_update_noise, as its registry tests)."""
    params, _, ref_params = _first_step(info, kw, torch.float32, backend=backend, state_dtype=state_dtype)
    for p, q in zip(params, ref_params):
        noise = info.update_noise(kw, p.shape) if info.update_noise else 0
        torch.testing.assert_close(p.double(), q, rtol=2e-6, atol=2e-6 + noise)


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", [*Q8_BACKENDS, "torch"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_buffer_starts_from_the_grad(backend, state_dtype, nesterov):
    """torch.optim.SGD's first step sets the momentum buffer to the grad, undamped. A quantized buffer started at
    zero instead (first-step flags were set only for full-precision buffers), so with dampening the first update was
    (1 - dampening) times torch's. After the first step the params equal torch's, and the buffer is the grad
    quantized, bit for bit."""
    p = torch.randn(5000, generator=torch.Generator().manual_seed(0)).requires_grad_()
    q = p.detach().clone().requires_grad_()
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=False, weight_decay=0.01)
    if nesterov:
        kw.update(dampening=0.0, nesterov=True)  # torch: nesterov needs zero dampening
    fused = fusedopt.SGD([p], backend=backend, state_dtype=state_dtype, **kw)
    ref = torch.optim.SGD([q], **kw)
    p.grad = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    q.grad = p.grad.clone()
    fused.step()
    ref.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    codes, absmax = lowbit.quantize(ref.state[q]["momentum_buffer"], lowbit.qmap(True, "cpu", state_dtype), state_dtype)
    state = fused.state[p]
    assert same(state["momentum_buffer_codes"], codes) and same(state["momentum_buffer_absmax"], absmax)


@pytest.mark.parametrize("master", [True, "remainder"], ids=["fp32_master", "remainder"])
@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize(("info", "kw"), MASTER_CASES, ids=MASTER_IDS)
def test_first_step_with_master_weights_equals_torch_optim(info, kw, state_dtype, master):
    """bf16 params with low-bit states and an exact master (a float32 copy, or the int16 remainder joined with the
    param): after one step the master equals torch.optim's step of the same values in float64, and the bf16 param
    is the master rounded as its mode defines (float32 master: to nearest even; remainder: master_weights.split,
    ties away from zero)."""
    params, fused, ref_params = _first_step(info, kw, torch.bfloat16, backend="cpu", state_dtype=state_dtype,
                                            master_weights=master)  # fmt: skip
    for p, q in zip(params, ref_params):
        st = fused.state[p]
        exact = st["master_param"] if master is True else master_weights.join(p, st["param_remainder"])
        assert exact.dtype == torch.float32
        torch.testing.assert_close(exact.double(), q, rtol=2e-6, atol=2e-6)
        rounded = exact.to(torch.bfloat16) if master is True else master_weights.split(exact)[0]
        assert torch.equal(p, rounded)
