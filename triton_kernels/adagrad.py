"""Adagrad in Triton through the optimizer engine (optim_engine.py); the math of csrc/common/adagrad_math.h."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import program_block
from fusedopt.triton_kernels.optim_engine import (
    ROW_FIRST_STATE,
    commit_param,
    launch,
    list_ptr,
    load_grad,
    load_param,
    load_state,
    store_state,
)

HYPER = ("lr_decay", "eps", "weight_decay")  # hp_ptr[1:], after lr; the spec's order
ROW_SUM, ROW_STEP = ROW_FIRST_STATE, ROW_FIRST_STATE + 1
N_STATES = 1


@triton.jit
def adagrad_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
    QUANT: tl.constexpr = False, MASTER: tl.constexpr = 0,
    STATE_DTYPE: tl.constexpr = None,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    param = load_param(addrs_ptr, n_tensors, t, offs, mask, N_STATES, DTYPE, OPMATH, MASTER, QUANT)
    state_sum = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_SUM, N_STATES, STATE_DTYPE, OPMATH, QUANT)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- Adagrad's update: clr = lr / (1 + (step - 1) * lr_decay) in float64, as torch ---
    step = tl.load(list_ptr(addrs_ptr, ROW_STEP, n_tensors, t, tl.float32)).to(tl.float64)
    neg_clr = (-tl.load(hp_ptr) / (1.0 + (step - 1.0) * tl.load(hp_ptr + 1))).to(OPMATH)
    eps = tl.load(hp_ptr + 2).to(OPMATH)
    if HAS_WEIGHT_DECAY:
        grad = grad + param * tl.load(hp_ptr + 3).to(OPMATH)
    state_sum = state_sum + grad * grad
    param = param + neg_clr * (grad / (tl.sqrt(state_sum) + eps))

    commit_param(addrs_ptr, n_tensors, t, offs, mask, param, sr_ptr, N_STATES, DTYPE, STOCHASTIC_ROUND, MASTER, QUANT)
    store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_SUM, N_STATES, state_sum, STATE_DTYPE, BLOCK, QUANT)


def adagrad_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                 write_back_grads, stochastic_round=None, masters=(), q8=None):  # fmt: skip
    launch(adagrad_kernel, ("adagrad", ("state_sums",), HYPER, "step"), params, grads, states, steps, lr, lr_tensor,
           hyper, maximize, grad_divisor, found_inf, write_back_grads, stochastic_round=stochastic_round,
           masters=masters, HAS_WEIGHT_DECAY=hyper["weight_decay"] != 0, q8=q8)  # fmt: skip


def adagrad_step_q8(params, grads, codes, absmax, maps, state_dtype, steps, *args):
    """int8 / int4 / fp8 states (docs/LOW_BIT_STATES.md): codes, absmax and maps one per state."""
    adagrad_step(params, grads, codes, steps, *args, q8=(absmax, maps, state_dtype))
