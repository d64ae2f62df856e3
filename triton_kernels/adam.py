"""Adam / AdamW in Triton through the optimizer engine (optim_engine.py); the math of csrc/common/adam_math.h."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import lerp, pow_by_squaring, program_block
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

HYPER = ("beta1", "beta2", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")  # hp_ptr[1:], after lr
ROW_EXP_AVG, ROW_EXP_AVG_SQ, ROW_MAX_EXP_AVG_SQ, ROW_STEP = (ROW_FIRST_STATE + k for k in range(4))
N_STATES = 3


@triton.jit
def adam_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr, AMSGRAD: tl.constexpr,
    DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, QUANT: tl.constexpr = False, MASTER: tl.constexpr = 0,
    STATE_DTYPE: tl.constexpr = None,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    param = load_param(addrs_ptr, n_tensors, t, offs, mask, N_STATES, DTYPE, OPMATH, MASTER, QUANT)
    exp_avg = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_EXP_AVG, N_STATES, STATE_DTYPE, OPMATH, QUANT)
    exp_avg_sq = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_EXP_AVG_SQ, N_STATES, STATE_DTYPE, OPMATH, QUANT)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- Adam's update; the bias corrections in float64 from this tensor's step, as torch ---
    lr = tl.load(hp_ptr)
    beta1, beta2 = tl.load(hp_ptr + 1), tl.load(hp_ptr + 2)
    weight_decay = tl.load(hp_ptr + 4)
    step = tl.load(list_ptr(addrs_ptr, ROW_STEP, n_tensors, t, tl.float32)).to(tl.float64)
    step_size = (lr / (1.0 - pow_by_squaring(beta1, step))).to(OPMATH)
    bias_correction2_sqrt = tl.sqrt(1.0 - pow_by_squaring(beta2, step)).to(OPMATH)
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            param = param * (1.0 - lr * weight_decay).to(OPMATH)
        else:
            grad = grad + param * weight_decay.to(OPMATH)
    exp_avg = lerp(exp_avg, grad, (1.0 - beta1).to(OPMATH))
    exp_avg_sq = exp_avg_sq * beta2.to(OPMATH) + grad * grad * (1.0 - beta2).to(OPMATH)
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = tl.maximum(  # NaN stays NaN, as with torch.maximum
            load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_MAX_EXP_AVG_SQ, N_STATES, STATE_DTYPE, OPMATH, QUANT),
            exp_avg_sq,
            propagate_nan=tl.PropagateNan.ALL,
        )
        store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_MAX_EXP_AVG_SQ, N_STATES, max_exp_avg_sq, STATE_DTYPE,
                    BLOCK, QUANT)  # fmt: skip
        second_moment = max_exp_avg_sq
    denom = tl.sqrt(second_moment) / bias_correction2_sqrt + tl.load(hp_ptr + 3).to(OPMATH)
    param = param - step_size * exp_avg / denom

    commit_param(addrs_ptr, n_tensors, t, offs, mask, param, sr_ptr, N_STATES, DTYPE, STOCHASTIC_ROUND, MASTER, QUANT)
    store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_EXP_AVG, N_STATES, exp_avg, STATE_DTYPE, BLOCK, QUANT)
    store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_EXP_AVG_SQ, N_STATES, exp_avg_sq, STATE_DTYPE, BLOCK, QUANT)


def adam_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round=None, masters=(), q8=None):  # fmt: skip
    amsgrad = bool(hyper["amsgrad"])
    launch(adam_kernel, ("adam", ("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"), HYPER, "step"), params, grads,
           states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads,
           stochastic_round=stochastic_round, masters=masters,
           used=(True, True, amsgrad), AMSGRAD=amsgrad, DECOUPLED=bool(hyper["decoupled_weight_decay"]),
           HAS_WEIGHT_DECAY=hyper["weight_decay"] != 0, q8=q8)  # fmt: skip


def adam_step_q8(params, grads, codes, absmax, maps, state_dtype, steps, *args):
    """int8 / int4 / fp8 states (docs/LOW_BIT_STATES.md): codes, absmax and maps one per state."""
    adam_step(params, grads, codes, steps, *args, q8=(absmax, maps, state_dtype))
