"""SGD (momentum, dampening, Nesterov) in Triton: one launch per (device, dtype) group through the multi-tensor
table, plus a per-tensor pass that clears the first-step flags after the update."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt import _checks
from fusedopt.triton_kernels.multi_tensor import (
    TRITON_DTYPES,
    ContiguousCopies,
    TensorTable,
    opmath,
    program_block,
    scalars_tensor,
)

BLOCK = 1024
ROW_PARAM, ROW_GRAD, ROW_MOMENTUM_BUF, ROW_FIRST_FLAG = range(4)


@triton.jit
def sgd_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, MOMENTUM: tl.constexpr, HAS_FLAGS: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)

    lr = tl.load(hp_ptr + 0).to(OPMATH)
    momentum = tl.load(hp_ptr + 1).to(OPMATH)
    one_minus_dampening = (1.0 - tl.load(hp_ptr + 2)).to(OPMATH)
    weight_decay = tl.load(hp_ptr + 3).to(OPMATH)

    p_ptr = tl.load(addrs_ptr + ROW_PARAM * n_tensors + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(addrs_ptr + ROW_GRAD * n_tensors + t).to(tl.pointer_type(DTYPE))
    param = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    grad = tl.load(g_ptr + offs, mask=mask).to(OPMATH)

    # --- the SGD update, written once ---
    if HAS_DIVISOR:
        grad = grad * (1.0 / tl.load(grad_divisor_ptr).to(tl.float64)).to(OPMATH)
    if WRITE_BACK_GRADS:  # GradScaler: .grad holds the unscaled grad afterwards
        tl.store(g_ptr + offs, grad.to(DTYPE), mask=mask)
    if MAXIMIZE:
        grad = -grad
    if HAS_WEIGHT_DECAY:
        grad = grad + weight_decay * param
    if MOMENTUM:
        b_ptr = tl.load(addrs_ptr + ROW_MOMENTUM_BUF * n_tensors + t).to(tl.pointer_type(DTYPE))
        buf = tl.load(b_ptr + offs, mask=mask).to(OPMATH) * momentum + one_minus_dampening * grad
        if HAS_FLAGS:  # torch's first step: the buffer starts as a copy of the grad
            flag_ptr = tl.load(addrs_ptr + ROW_FIRST_FLAG * n_tensors + t).to(tl.pointer_type(tl.float32))
            buf = tl.where(tl.load(flag_ptr) != 0, grad, buf)
        tl.store(b_ptr + offs, buf.to(DTYPE), mask=mask)
        if NESTEROV:
            grad = grad + momentum * buf
        else:
            grad = buf
    tl.store(p_ptr + offs, (param - lr * grad).to(DTYPE), mask=mask)


@triton.jit
def clear_flags_kernel(addrs_ptr, n, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """After the update: tensor program_id(0)'s buffer has started, unless GradScaler skipped the step."""
    t = tl.program_id(0).to(tl.int64)
    flag_ptr = tl.load(addrs_ptr + ROW_FIRST_FLAG * n + t).to(tl.pointer_type(tl.float32))
    keep = 0.0
    if HAS_FOUND_INF:
        keep = tl.where(tl.load(found_inf_ptr) == 0, 0.0, 1.0)
    tl.store(flag_ptr, tl.load(flag_ptr) * keep)


def sgd_step(params, grads, momentum_buffers, first_flags, lr, lr_tensor, momentum, dampening, weight_decay,
             nesterov, maximize, grad_divisor, found_inf, write_back_grads=False):  # fmt: skip
    if not params:
        return
    use_buf = momentum != 0
    has_flags = use_buf and bool(first_flags)
    lists = {"grads": grads, "momentum_buffers": momentum_buffers} if use_buf else {"grads": grads}
    _checks.check_step("fusedopt sgd_step (triton)", params, lists, {"first_flags": first_flags} if has_flags else {})
    dtype, device = params[0].dtype, params[0].device
    write_back_grads = write_back_grads and grad_divisor is not None
    copies = ContiguousCopies()
    params = copies.write(params)
    momentum_buffers = copies.write(momentum_buffers) if use_buf else []
    grads = copies.write(grads) if write_back_grads else copies.read(grads)
    table = TensorTable([params, grads, momentum_buffers, first_flags if has_flags else []], BLOCK)
    hp = scalars_tensor([lr, momentum, dampening, weight_decay], device, lr_tensor)
    found = found_inf.float() if found_inf is not None else hp
    if table.blocks:
        sgd_kernel[(table.blocks,)](
            table.addrs, table.numel, table.block_tensor, table.block_start, table.n, hp,
            grad_divisor.float() if grad_divisor is not None else hp, found,
            DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), MOMENTUM=use_buf, HAS_FLAGS=has_flags,
            NESTEROV=nesterov, MAXIMIZE=maximize, HAS_WEIGHT_DECAY=weight_decay != 0,
            HAS_DIVISOR=grad_divisor is not None, HAS_FOUND_INF=found_inf is not None,
            WRITE_BACK_GRADS=write_back_grads, BLOCK=BLOCK,
        )  # fmt: skip
    copies.finish()
    if has_flags:
        clear_flags_kernel[(table.n,)](table.addrs, table.n, found, HAS_FOUND_INF=found_inf is not None)
