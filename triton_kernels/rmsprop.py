"""RMSprop in Triton: one launch per (device, dtype) group through the multi-tensor table."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt import _checks
from fusedopt.triton_kernels.multi_tensor import (
    TRITON_DTYPES,
    ContiguousCopies,
    TensorTable,
    increment_steps,
    lerp,
    opmath,
    program_block,
    scalars_tensor,
)

BLOCK = 1024
ROW_PARAM, ROW_GRAD, ROW_SQUARE_AVG, ROW_GRAD_AVG, ROW_MOMENTUM_BUF, ROW_STEP = range(6)


@triton.jit
def rmsprop_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, CENTERED: tl.constexpr, MOMENTUM: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_DIVISOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)

    lr = tl.load(hp_ptr + 0).to(OPMATH)
    alpha = tl.load(hp_ptr + 1)
    eps = tl.load(hp_ptr + 2).to(OPMATH)
    weight_decay = tl.load(hp_ptr + 3).to(OPMATH)
    momentum = tl.load(hp_ptr + 4).to(OPMATH)
    one_minus_alpha = (1.0 - alpha).to(OPMATH)

    p_ptr = tl.load(addrs_ptr + ROW_PARAM * n_tensors + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(addrs_ptr + ROW_GRAD * n_tensors + t).to(tl.pointer_type(DTYPE))
    s_ptr = tl.load(addrs_ptr + ROW_SQUARE_AVG * n_tensors + t).to(tl.pointer_type(DTYPE))
    param = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    grad = tl.load(g_ptr + offs, mask=mask).to(OPMATH)
    square_avg = tl.load(s_ptr + offs, mask=mask).to(OPMATH)

    # --- the RMSprop update, written once ---
    if HAS_DIVISOR:
        grad = grad * (1.0 / tl.load(grad_divisor_ptr).to(tl.float64)).to(OPMATH)
    if WRITE_BACK_GRADS:  # GradScaler: .grad holds the unscaled grad afterwards
        tl.store(g_ptr + offs, grad.to(DTYPE), mask=mask)
    if MAXIMIZE:
        grad = -grad
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    square_avg = square_avg * alpha.to(OPMATH) + one_minus_alpha * grad * grad
    if CENTERED:
        a_ptr = tl.load(addrs_ptr + ROW_GRAD_AVG * n_tensors + t).to(tl.pointer_type(DTYPE))
        grad_avg = tl.load(a_ptr + offs, mask=mask).to(OPMATH)
        grad_avg = lerp(grad_avg, grad, one_minus_alpha)
        tl.store(a_ptr + offs, grad_avg.to(DTYPE), mask=mask)
        avg = tl.sqrt(tl.fma(-grad_avg, grad_avg, square_avg)) + eps  # one rounding, as torch's addcmul
    else:
        avg = tl.sqrt(square_avg) + eps
    if MOMENTUM:
        b_ptr = tl.load(addrs_ptr + ROW_MOMENTUM_BUF * n_tensors + t).to(tl.pointer_type(DTYPE))
        buf = tl.load(b_ptr + offs, mask=mask).to(OPMATH) * momentum + grad / avg
        tl.store(b_ptr + offs, buf.to(DTYPE), mask=mask)
        param = param - lr * buf
    else:
        param = param - lr * (grad / avg)

    tl.store(p_ptr + offs, param.to(DTYPE), mask=mask)
    tl.store(s_ptr + offs, square_avg.to(DTYPE), mask=mask)


def rmsprop_step(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, lr, lr_tensor, alpha, eps,
                 weight_decay, momentum, centered, maximize, grad_divisor, found_inf,
                 write_back_grads=False):  # fmt: skip
    if not params:
        return
    use_buf = momentum > 0
    lists = {"grads": grads, "square_avgs": square_avgs}
    if centered:
        lists["grad_avgs"] = grad_avgs
    if use_buf:
        lists["momentum_buffers"] = momentum_buffers
    _checks.check_step("fusedopt rmsprop_step (triton)", params, lists, {"steps": steps})
    dtype, device = params[0].dtype, params[0].device
    write_back_grads = write_back_grads and grad_divisor is not None
    copies = ContiguousCopies()
    params, square_avgs = copies.write(params), copies.write(square_avgs)
    grad_avgs = copies.write(grad_avgs) if centered else []
    momentum_buffers = copies.write(momentum_buffers) if use_buf else []
    grads = copies.write(grads) if write_back_grads else copies.read(grads)
    table = TensorTable([params, grads, square_avgs, grad_avgs, momentum_buffers, steps], BLOCK)
    increment_steps(table, ROW_STEP, found_inf)
    if table.blocks == 0:
        return
    hp = scalars_tensor([lr, alpha, eps, weight_decay, momentum], device, lr_tensor)
    rmsprop_kernel[(table.blocks,)](
        table.addrs, table.numel, table.block_tensor, table.block_start, table.n, hp,
        grad_divisor.float() if grad_divisor is not None else hp,
        found_inf.float() if found_inf is not None else hp,
        DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), CENTERED=centered, MOMENTUM=use_buf, MAXIMIZE=maximize,
        HAS_WEIGHT_DECAY=weight_decay != 0, HAS_DIVISOR=grad_divisor is not None,
        HAS_FOUND_INF=found_inf is not None, WRITE_BACK_GRADS=write_back_grads, BLOCK=BLOCK,
    )  # fmt: skip
    copies.finish()
