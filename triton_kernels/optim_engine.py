"""The Triton optimizer engine for the spec-driven optimizers (fusedopt/optim/_spec.py): the checks, contiguous
copies, the table [params, grads, states..., scalars], the step prologue or the first-step flags' epilogue, the
hyperparameter tensor (lr first, then the op module's HYPER names, filled by name; a bool as 0/1) and the launch.
In the kernel, `load_grad` does the engine's part of the grad (divisor, write-back, maximize); the op's kernel holds
only its loads, math and stores. An op module turns its bool options into constexprs and tells the engine which
state lists they use (Adam's max_exp_avg_sqs only with AMSGRAD).

Every op kernel takes the ENGINE arguments first, in this order: addrs_ptr, numel_ptr, block_tensor_ptr,
block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr, and the constexprs DTYPE, OPMATH, MAXIMIZE,
HAS_DIVISOR, HAS_FOUND_INF, WRITE_BACK_GRADS, BLOCK, then its own constexprs."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt import _checks
from fusedopt.triton_kernels.multi_tensor import (
    TRITON_DTYPES,
    ContiguousCopies,
    TensorTable,
    increment_steps,
    opmath,
    scalars_tensor,
)

BLOCK = 1024
ROW_PARAM, ROW_GRAD, ROW_FIRST_STATE = 0, 1, 2
SCALAR_LISTS = {"step": "steps", "first_flag": "first_flags"}  # as fusedopt/optim/_spec.py


@triton.jit
def list_ptr(addrs_ptr, row, n_tensors, t, DTYPE: tl.constexpr):
    """Tensor t's address in list `row` of the table, as a typed pointer."""
    return tl.load(addrs_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))


@triton.jit
def load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
              HAS_DIVISOR: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, MAXIMIZE: tl.constexpr):  # fmt: skip
    """The grad in opmath: divided by the grad divisor (GradScaler / folded clip), stored back when GradScaler asks
    for the unscaled grad, negated under maximize."""
    g_ptr = list_ptr(addrs_ptr, ROW_GRAD, n_tensors, t, DTYPE)
    grad = tl.load(g_ptr + offs, mask=mask).to(OPMATH)
    if HAS_DIVISOR:
        grad = grad * (1.0 / tl.load(grad_divisor_ptr).to(tl.float64)).to(OPMATH)
    if WRITE_BACK_GRADS:
        tl.store(g_ptr + offs, grad.to(DTYPE), mask=mask)
    if MAXIMIZE:
        grad = -grad
    return grad


@triton.jit
def clear_flags_kernel(addrs_ptr, n, flag_row, found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """After the update: tensor program_id(0)'s first step is done, unless GradScaler skipped the step."""
    t = tl.program_id(0).to(tl.int64)
    flag_ptr = tl.load(addrs_ptr + flag_row * n + t).to(tl.pointer_type(tl.float32))
    keep = 0.0
    if HAS_FOUND_INF:
        keep = tl.where(tl.load(found_inf_ptr) == 0, 0.0, 1.0)
    tl.store(flag_ptr, tl.load(flag_ptr) * keep)


@triton.jit
def sign(x):
    """-1, 0 or 1; NaN stays NaN (see csrc/common/value_ops.h)."""
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))


def launch(kernel, spec_names: tuple, params, grads, states, scalars, lr, lr_tensor, hyper: dict, maximize,
           grad_divisor, found_inf, write_back_grads, used: tuple | None = None, **constexprs) -> None:  # fmt: skip
    """spec_names = (op, state list names, HYPER names, scalar: "step", "first_flag" or None) of the op module.
    `used`: which state lists the kernel reads (default all; the op module derives it from the constexprs it
    passes); an unused list is not checked, and its table row holds null addresses."""
    op, state_names, hyper_names, scalar = spec_names
    if not params:
        return
    used = used if used is not None else (True,) * len(states)
    has_scalars = scalar == "step" or (scalar == "first_flag" and bool(scalars))  # flags: none may be set
    lists = {"grads": grads, **{name: s for name, s, on in zip(state_names, states, used) if on}}
    _checks.check_step(f"fusedopt {op}_step (triton)", params, lists,
                       {SCALAR_LISTS[scalar]: scalars} if has_scalars else None)  # fmt: skip
    dtype, device = params[0].dtype, params[0].device
    write_back_grads = write_back_grads and grad_divisor is not None
    copies = ContiguousCopies()
    params = copies.write(params)
    states = [copies.write(s) if on else [] for s, on in zip(states, used)]
    grads = copies.write(grads) if write_back_grads else copies.read(grads)
    table = TensorTable([params, grads, *states, scalars if has_scalars else []], BLOCK)
    scalar_row = ROW_FIRST_STATE + len(states)
    if scalar == "step":
        increment_steps(table, scalar_row, found_inf)
    if table.blocks == 0:
        return
    hp = scalars_tensor([lr, *(float(hyper[name]) for name in hyper_names)], device, lr_tensor)
    found = found_inf.float() if found_inf is not None else hp
    kernel[(table.blocks,)](
        table.addrs, table.numel, table.block_tensor, table.block_start, table.n, hp,
        grad_divisor.float() if grad_divisor is not None else hp, found,
        DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), MAXIMIZE=maximize, HAS_DIVISOR=grad_divisor is not None,
        HAS_FOUND_INF=found_inf is not None, WRITE_BACK_GRADS=write_back_grads, BLOCK=BLOCK, **constexprs,
    )  # fmt: skip
    copies.finish()
    if scalar == "first_flag" and has_scalars:
        clear_flags_kernel[(table.n,)](table.addrs, table.n, scalar_row, found, HAS_FOUND_INF=found_inf is not None)
