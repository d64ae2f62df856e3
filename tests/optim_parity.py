"""Shared optimizer parity machinery: run a fusedopt optimizer and the torch.optim reference in float64 side by side
for >= 20 steps with fresh random grads (some None), comparing params and every state tensor after every step.

fp32/fp64: the whole trajectory is compared. bf16/fp16: before each step the float64 reference is reset to the fused
optimizer's (rounded) params and state, so each comparison is one step from identical inputs, about one rounding.
"""

from __future__ import annotations

import torch
from conftest import assert_close

SHAPES = [(), (0,), (1,), (7,), (1023,), (4099,), (33, 65)]
SMALL_SHAPES = [(), (0,), (1,), (7,), (1100,)]  # Triton's interpreter is slow: few blocks
LOW_PRECISION = (torch.bfloat16, torch.float16)


def random_grads(shapes, step: int, gen: torch.Generator) -> list:
    """Fresh float64 grads; param k has no grad on steps where (step + k) % 7 == 3."""
    return [None if (step + k) % 7 == 3 else torch.randn(s, dtype=torch.float64, generator=gen) for k, s in
            enumerate(shapes)]  # fmt: skip


def _sync_reference(fused, ref, fused_params, ref_params) -> None:
    with torch.no_grad():
        for p, q in zip(fused_params, ref_params):
            q.copy_(p.double())
            for key, value in fused.state.get(p, {}).items():
                if key in ref.state.get(q, {}) and isinstance(value, torch.Tensor):
                    ref.state[q][key].copy_(value.double())


def compare_state(fused, ref, fused_params, ref_params, dtype, where: str) -> None:
    for i, (p, q) in enumerate(zip(fused_params, ref_params)):
        assert_close(p.detach(), q.detach(), dtype, f"{where}: param {i}")
        fs, rs = fused.state.get(p, {}), ref.state.get(q, {})
        assert set(fs) == set(rs), f"{where}: param {i} state keys {sorted(fs)} != torch's {sorted(rs)}"
        for key, rv in rs.items():
            fv = fs[key]
            if rv is None or not isinstance(rv, torch.Tensor):
                assert fv == rv, f"{where}: param {i} state {key}"
                continue
            if key == "step":
                assert float(fv) == float(rv), f"{where}: param {i} step {float(fv)} != {float(rv)}"
            else:
                assert fv.dtype == p.dtype, f"{where}: state {key} dtype {fv.dtype}, param {p.dtype}"
                assert_close(fv, rv, dtype, f"{where}: param {i} state {key}")


def run_parity(make_fused, make_ref, dtype, shapes=SHAPES, steps: int = 20, seed: int = 0) -> None:
    """make_fused(params) / make_ref(params) build the optimizers; the reference runs on float64 copies."""
    gen = torch.Generator().manual_seed(seed)
    fused_params = [torch.randn(s, dtype=torch.float64, generator=gen).to(dtype).requires_grad_() for s in shapes]
    ref_params = [p.detach().double().clone().requires_grad_() for p in fused_params]  # never aliased
    fused, ref = make_fused(fused_params), make_ref(ref_params)
    for step in range(steps):
        for p, q, g in zip(fused_params, ref_params, random_grads(shapes, step, gen)):
            p.grad = None if g is None else g.to(dtype)
            # The reference sees exactly the fused optimizer's grads.
            q.grad = None if g is None else p.grad.double().clone()
        if dtype in LOW_PRECISION:
            _sync_reference(fused, ref, fused_params, ref_params)
        fused.step()
        ref.step()
        compare_state(fused, ref, fused_params, ref_params, dtype, f"step {step + 1}")
