"""RMSprop in Triton through the optimizer engine (optim_engine.py); the math of csrc/common/rmsprop_math.h."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import lerp, program_block
from fusedopt.triton_kernels.optim_engine import ROW_FIRST_STATE, ROW_PARAM, launch, list_ptr, load_grad

HYPER = ("alpha", "eps", "weight_decay", "momentum", "centered")  # hp_ptr[1:], after lr; the spec's order
ROW_SQUARE_AVG, ROW_GRAD_AVG, ROW_MOMENTUM_BUF = (ROW_FIRST_STATE + k for k in range(3))


@triton.jit
def rmsprop_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr, CENTERED: tl.constexpr,
    MOMENTUM: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    p_ptr = list_ptr(addrs_ptr, ROW_PARAM, n_tensors, t, DTYPE)
    s_ptr = list_ptr(addrs_ptr, ROW_SQUARE_AVG, n_tensors, t, DTYPE)
    param = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    square_avg = tl.load(s_ptr + offs, mask=mask).to(OPMATH)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip

    # --- RMSprop's update ---
    lr = tl.load(hp_ptr).to(OPMATH)
    one_minus_alpha = (1.0 - tl.load(hp_ptr + 1)).to(OPMATH)
    eps = tl.load(hp_ptr + 2).to(OPMATH)
    if HAS_WEIGHT_DECAY:
        grad = grad + param * tl.load(hp_ptr + 3).to(OPMATH)
    square_avg = square_avg * tl.load(hp_ptr + 1).to(OPMATH) + grad * grad * one_minus_alpha
    if CENTERED:
        a_ptr = list_ptr(addrs_ptr, ROW_GRAD_AVG, n_tensors, t, DTYPE)
        grad_avg = lerp(tl.load(a_ptr + offs, mask=mask).to(OPMATH), grad, one_minus_alpha)
        tl.store(a_ptr + offs, grad_avg.to(DTYPE), mask=mask)
        avg = tl.sqrt(tl.fma(-grad_avg, grad_avg, square_avg)) + eps  # one rounding, as torch's addcmul
    else:
        avg = tl.sqrt(square_avg) + eps
    if MOMENTUM:
        b_ptr = list_ptr(addrs_ptr, ROW_MOMENTUM_BUF, n_tensors, t, DTYPE)
        buf = tl.load(b_ptr + offs, mask=mask).to(OPMATH) * tl.load(hp_ptr + 4).to(OPMATH) + grad / avg
        tl.store(b_ptr + offs, buf.to(DTYPE), mask=mask)
        param = param - lr * buf
    else:
        param = param - lr * (grad / avg)

    tl.store(p_ptr + offs, param.to(DTYPE), mask=mask)
    tl.store(s_ptr + offs, square_avg.to(DTYPE), mask=mask)


def rmsprop_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                 write_back_grads):  # fmt: skip
    centered, momentum = bool(hyper["centered"]), hyper["momentum"] > 0
    launch(rmsprop_kernel, ("rmsprop", ("square_avgs", "grad_avgs", "momentum_buffers"), HYPER, "step"), params,
           grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads,
           used=(True, centered, momentum), CENTERED=centered, MOMENTUM=momentum,
           HAS_WEIGHT_DECAY=hyper["weight_decay"] != 0)  # fmt: skip
