"""Lion in Triton through the optimizer engine (optim_engine.py); the math of csrc/common/lion_math.h."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import program_block
from fusedopt.triton_kernels.optim_engine import (
    ROW_FIRST_STATE,
    commit_param,
    launch,
    load_grad,
    load_param,
    load_state,
    sign,
    store_state,
)

HYPER = ("beta1", "beta2", "weight_decay")  # hp_ptr[1:], after lr; the spec's order
ROW_EXP_AVG = ROW_FIRST_STATE
N_STATES = 1


@triton.jit
def lion_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr, QUANT: tl.constexpr = False, MASTER: tl.constexpr = 0,
    STATE_DTYPE: tl.constexpr = None,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    param = load_param(addrs_ptr, n_tensors, t, offs, mask, N_STATES, DTYPE, OPMATH, MASTER, QUANT)
    exp_avg = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_EXP_AVG, N_STATES, STATE_DTYPE, OPMATH, QUANT)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- Lion's update (Chen et al. 2023, Algorithm 2) ---
    lr = tl.load(hp_ptr)
    decay = (1.0 - lr * tl.load(hp_ptr + 3)).to(OPMATH)
    beta1, beta2 = tl.load(hp_ptr + 1), tl.load(hp_ptr + 2)
    direction = sign(exp_avg * beta1.to(OPMATH) + grad * (1.0 - beta1).to(OPMATH))  # the paper's form, not lerp
    param = param * decay - lr.to(OPMATH) * direction
    exp_avg = exp_avg * beta2.to(OPMATH) + grad * (1.0 - beta2).to(OPMATH)

    commit_param(addrs_ptr, n_tensors, t, offs, mask, param, sr_ptr, N_STATES, DTYPE, STOCHASTIC_ROUND, MASTER, QUANT)
    store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_EXP_AVG, N_STATES, exp_avg, STATE_DTYPE, BLOCK, QUANT)


def lion_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round=None, masters=(), q8=None):  # fmt: skip
    launch(lion_kernel, ("lion", ("exp_avgs",), HYPER, None), params, grads, states, steps, lr, lr_tensor, hyper,
           maximize, grad_divisor, found_inf, write_back_grads, stochastic_round=stochastic_round,
           masters=masters, q8=q8)  # fmt: skip


def lion_step_q8(params, grads, codes, absmax, maps, state_dtype, steps, *args):
    """int8 / int4 / fp8 states (docs/LOW_BIT_STATES.md): codes, absmax and maps one per state."""
    lion_step(params, grads, codes, steps, *args, q8=(absmax, maps, state_dtype))
