"""RMSprop in Triton through the optimizer engine (optim_engine.py); the math of csrc/common/rmsprop_math.h."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import lerp, program_block
from fusedopt.triton_kernels.optim_engine import (
    ROW_FIRST_STATE,
    commit_param,
    launch,
    load_grad,
    load_param,
    load_state,
    store_state,
)

HYPER = ("alpha", "eps", "weight_decay", "momentum", "centered")  # hp_ptr[1:], after lr; the spec's order
ROW_SQUARE_AVG, ROW_GRAD_AVG, ROW_MOMENTUM_BUF = (ROW_FIRST_STATE + k for k in range(3))
N_STATES = 3


@triton.jit
def rmsprop_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr, CENTERED: tl.constexpr,
    MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, QUANT: tl.constexpr = False, MASTER: tl.constexpr = 0,
    STATE_DTYPE: tl.constexpr = None,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    param = load_param(addrs_ptr, n_tensors, t, offs, mask, N_STATES, DTYPE, OPMATH, MASTER, QUANT)
    square_avg = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_SQUARE_AVG, N_STATES, STATE_DTYPE, OPMATH, QUANT)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- RMSprop's update ---
    lr = tl.load(hp_ptr).to(OPMATH)
    one_minus_alpha = (1.0 - tl.load(hp_ptr + 1)).to(OPMATH)
    eps = tl.load(hp_ptr + 2).to(OPMATH)
    # torch's roundings (csrc/common/rmsprop_math.h): add(alpha=) and addcmul one fma each, addcdiv x + (v * t1) / t2
    # (the interpreter's tl.fma rounds twice; a GPU's once)
    if HAS_WEIGHT_DECAY:
        grad = tl.fma(param, tl.load(hp_ptr + 3).to(OPMATH), grad)
    square_avg = tl.fma(grad * one_minus_alpha, grad, square_avg * tl.load(hp_ptr + 1).to(OPMATH))
    if CENTERED:
        grad_avg = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_GRAD_AVG, N_STATES, STATE_DTYPE, OPMATH, QUANT)
        grad_avg = lerp(grad_avg, grad, one_minus_alpha)
        store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_GRAD_AVG, N_STATES, grad_avg, STATE_DTYPE, BLOCK, QUANT)
        variance = tl.fma(-grad_avg, grad_avg, square_avg)  # one rounding, as torch's addcmul
        if QUANT:  # low-bit states, quantized apart: clamped at 0, NaN stays NaN (full precision: torch's, unclamped)
            variance = tl.maximum(variance, 0.0, propagate_nan=tl.PropagateNan.ALL)
        avg = tl.sqrt(variance) + eps
    else:
        avg = tl.sqrt(square_avg) + eps
    if MOMENTUM:
        buf = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_MOMENTUM_BUF, N_STATES, STATE_DTYPE, OPMATH, QUANT)
        buf = buf * tl.load(hp_ptr + 4).to(OPMATH) + grad / avg
        store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_MOMENTUM_BUF, N_STATES, buf, STATE_DTYPE, BLOCK, QUANT)
        param = tl.fma(buf, -lr, param)
    else:
        param = param + (-lr * grad) / avg

    commit_param(addrs_ptr, n_tensors, t, offs, mask, param, sr_ptr, N_STATES, DTYPE, STOCHASTIC_ROUND, MASTER, QUANT)
    store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_SQUARE_AVG, N_STATES, square_avg, STATE_DTYPE, BLOCK, QUANT)


def rmsprop_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                 write_back_grads, stochastic_round=None, masters=(), q8=None):  # fmt: skip
    centered, momentum = bool(hyper["centered"]), hyper["momentum"] > 0
    launch(rmsprop_kernel, ("rmsprop", ("square_avgs", "grad_avgs", "momentum_buffers"), HYPER, "step"), params,
           grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads,
           stochastic_round=stochastic_round, masters=masters,
           used=(True, centered, momentum), CENTERED=centered, MOMENTUM=momentum,
           HAS_WEIGHT_DECAY=hyper["weight_decay"] != 0, q8=q8)  # fmt: skip

def rmsprop_step_q8(params, grads, codes, absmax, maps, state_dtype, steps, *args):
    """int8 / int4 / fp8 states (docs/LOW_BIT_STATES.md): codes, absmax and maps one per state."""
    rmsprop_step(params, grads, codes, steps, *args, q8=(absmax, maps, state_dtype))
