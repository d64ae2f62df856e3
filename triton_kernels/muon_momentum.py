"""Muon's momentum in Triton through the optimizer engine (optim_engine.py); the math of
csrc/common/muon_momentum_math.h. The engine's param row is the output (the matrix to orthogonalize). The buffer
may be int8 / int4 / fp8 codes (`muon_momentum_step_q8`, docs/LOW_BIT_STATES.md)."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt import _checks
from fusedopt.triton_kernels.multi_tensor import lerp, program_block
from fusedopt.triton_kernels.optim_engine import (
    ROW_FIRST_STATE,
    ROW_PARAM,
    launch,
    list_ptr,
    load_grad,
    load_state,
    store_state,
)

HYPER = ("momentum", "nesterov")  # hp_ptr[1:], after lr; the spec's order
ROW_BUF = ROW_FIRST_STATE
N_STATES = 1


@triton.jit
def muon_momentum_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr, QUANT: tl.constexpr = False, MASTER: tl.constexpr = 0,
    STATE_DTYPE: tl.constexpr = None,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    out_ptr = list_ptr(addrs_ptr, ROW_PARAM, n_tensors, t, DTYPE)
    buf = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_BUF, N_STATES, STATE_DTYPE, OPMATH, QUANT)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- torch.optim.Muon's momentum ---
    momentum = tl.load(hp_ptr + 1)
    buf = lerp(buf, grad, (1.0 - momentum).to(OPMATH))
    out = buf
    if tl.load(hp_ptr + 2) != 0:
        out = lerp(grad, buf, momentum.to(OPMATH))

    tl.store(out_ptr + offs, out.to(DTYPE), mask=mask)
    store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_BUF, N_STATES, buf, STATE_DTYPE, BLOCK, QUANT)


def muon_momentum_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                       write_back_grads, stochastic_round=None, masters=(), q8=None):  # fmt: skip
    name = f"fusedopt muon_momentum_step{'' if q8 is None else '_q8'} (triton)"
    _checks.refuse_masters(name, masters)  # its "params" are the momentum outputs
    launch(muon_momentum_kernel, ("muon_momentum", ("momentum_buffers",), HYPER, None), params, grads, states, steps,
           lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads,
           stochastic_round=stochastic_round, q8=q8)  # fmt: skip


def muon_momentum_step_q8(params, grads, codes, absmax, maps, state_dtype, steps, *args):
    """int8 / int4 / fp8 buffers (docs/LOW_BIT_STATES.md): codes, absmax and maps one per state."""
    muon_momentum_step(params, grads, codes, steps, *args, q8=(absmax, maps, state_dtype))
