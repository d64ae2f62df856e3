"""SGD (momentum, dampening, Nesterov) in Triton through the optimizer engine (optim_engine.py); the math of
csrc/common/sgd_math.h. The engine clears the first-step flags after the update."""

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

HYPER = ("momentum", "dampening", "weight_decay", "nesterov")  # hp_ptr[1:], after lr; the spec's order
ROW_MOMENTUM_BUF, ROW_FIRST_FLAG = ROW_FIRST_STATE, ROW_FIRST_STATE + 1
N_STATES = 1


@triton.jit
def sgd_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr, MOMENTUM: tl.constexpr,
    HAS_FLAGS: tl.constexpr, NESTEROV: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, QUANT: tl.constexpr = False,
    MASTER: tl.constexpr = 0,
    STATE_DTYPE: tl.constexpr = None,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    param = load_param(addrs_ptr, n_tensors, t, offs, mask, N_STATES, DTYPE, OPMATH, MASTER, QUANT)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- SGD's update ---
    if HAS_WEIGHT_DECAY:
        grad = grad + param * tl.load(hp_ptr + 3).to(OPMATH)
    if MOMENTUM:
        momentum = tl.load(hp_ptr + 1).to(OPMATH)
        buf = load_state(addrs_ptr, n_tensors, t, offs, mask, ROW_MOMENTUM_BUF, N_STATES, STATE_DTYPE, OPMATH, QUANT)
        buf = buf * momentum + grad * (1.0 - tl.load(hp_ptr + 2)).to(OPMATH)
        if HAS_FLAGS:  # torch's first step: the buffer starts as a copy of the grad
            buf = tl.where(tl.load(list_ptr(addrs_ptr, ROW_FIRST_FLAG, n_tensors, t, tl.float32)) != 0, grad, buf)
        store_state(addrs_ptr, n_tensors, t, offs, mask, ROW_MOMENTUM_BUF, N_STATES, buf, STATE_DTYPE, BLOCK, QUANT)
        if NESTEROV:
            grad = grad + buf * momentum
        else:
            grad = buf
    param = param - tl.load(hp_ptr).to(OPMATH) * grad
    commit_param(addrs_ptr, n_tensors, t, offs, mask, param, sr_ptr, N_STATES, DTYPE, STOCHASTIC_ROUND, MASTER, QUANT)


def sgd_step(params, grads, states, first_flags, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
             write_back_grads, stochastic_round=None, masters=(), q8=None):  # fmt: skip
    momentum = hyper["momentum"] != 0
    launch(sgd_kernel, ("sgd", ("momentum_buffers",), HYPER, "first_flag"), params, grads, states,
           first_flags if momentum else [], lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
           write_back_grads, stochastic_round=stochastic_round, masters=masters, used=(momentum,), MOMENTUM=momentum,
           HAS_FLAGS=momentum and bool(first_flags), NESTEROV=bool(hyper["nesterov"]),
           HAS_WEIGHT_DECAY=hyper["weight_decay"] != 0, q8=q8)  # fmt: skip


def sgd_step_q8(params, grads, codes, absmax, maps, state_dtype, first_flags, *args):
    """int8 / int4 / fp8 states (docs/LOW_BIT_STATES.md): codes, absmax and maps one per state."""
    sgd_step(params, grads, codes, first_flags, *args, q8=(absmax, maps, state_dtype))
