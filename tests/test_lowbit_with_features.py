"""Low-bit states (docs/LOW_BIT_STATES.md) combined with the features the other suites test in full precision only:
torch.compile (the step traced, the fast path off: the list path's op in the graph) and GradScaler (the kernel's
unscale and inf-skip). Each against the same low-bit optimizer without the feature, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_steps, cpu_backends
from test_lowbit_fast_path import _params

import fusedopt

FORMATS = ["int8", "int4", "fp8"]
BACKENDS = [b for b in cpu_backends() if b != "triton"]  # interpreted Triton: minutes for a compiled trajectory


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for k, p in enumerate(params):
        grad = torch.randn(p.shape, generator=g)
        p.grad = None if (step + k) % 4 == 3 else grad  # some missing: the bucket set changes, a recompile


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_is_the_eager_step(backend, state_dtype, fresh_dynamo):
    compiled_params, eager_params = _params(), _params()
    compiled = fusedopt.AdamW(compiled_params, backend=backend, state_dtype=state_dtype, amsgrad=True)
    eager = fusedopt.AdamW(eager_params, backend=backend, state_dtype=state_dtype, amsgrad=True)
    step = torch.compile(compiled.step, backend="aot_eager")
    for s in range(6):
        _set_grads(compiled_params, s)
        _set_grads(eager_params, s)
        step()
        eager.step()
        assert_same_steps(compiled, compiled_params, eager, eager_params, f"step {s}")
    assert any(k.endswith("_codes") for k in compiled.state[compiled_params[0]]), "the states are not quantized"


@pytest.mark.parametrize("state_dtype", FORMATS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_unscales_in_the_kernel_as_unscale_does(backend, state_dtype):
    """scaler.step(opt) hands the scale and found_inf to the low-bit kernel; the twin calls scaler.unscale_(opt)
    first, so torch unscales the grads. Power-of-two scales make both exact: the same bits, inf/NaN steps skipped
    alike (codes untouched), the same scale updates."""
    runs = []
    for unscale_first in (False, True):
        params = _params()
        opt = fusedopt.AdamW(params, backend=backend, state_dtype=state_dtype)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        history = []
        for s in range(8):
            _set_grads(params, s)
            scaler.scale(torch.ones(()))  # a loss scaled: the scaler's per-iteration setup
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scaler.get_scale())  # as scaler.scale(loss).backward() leaves them
            if s in (2, 5):
                params[0].grad[17] = float("inf") if s == 2 else float("nan")
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            history.append(scaler.get_scale())
        runs.append((opt, params, history))
    (opt_a, params_a, scales_a), (opt_b, params_b, scales_b) = runs
    assert scales_a == scales_b and scales_a[2] < 2.0**10, "the poisoned steps lowered the scale alike"
    assert_same_steps(opt_a, params_a, opt_b, params_b, "after 8 steps")
