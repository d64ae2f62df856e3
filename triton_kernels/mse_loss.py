"""Mean squared error in Triton: stage 1 (loss or partial sums + the gradient in one pass); stage 2 in
pointwise_loss.py. Same contract as fusedopt::mse_loss_fwd (fusedopt/ops/mse_loss.py)."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.pointwise_loss import BLOCK, LossPlan, finish, wrap


@triton.jit
def mse_loss_kernel(x_ptr, t_ptr, w_ptr, w_period, loss_ptr, grad_ptr, partial_ptr, scale_ptr, n,
                    HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr, NEED_GRAD: tl.constexpr, DTYPE: tl.constexpr,
                    OPMATH: tl.constexpr, INDEX32: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(OPMATH)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(OPMATH)
    diff = x - t
    loss = diff * diff
    dloss = diff + diff
    if HAS_WEIGHT:
        w = tl.load(w_ptr + wrap(offs, w_period, INDEX32), mask=mask, other=0.0).to(OPMATH)
        loss = loss * w
        dloss = dloss * w
    if REDUCE:
        tl.store(partial_ptr + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0).to(tl.float64))
    else:
        tl.store(loss_ptr + offs, loss.to(DTYPE), mask=mask)
    if NEED_GRAD:
        scale = tl.load(scale_ptr).to(OPMATH)
        tl.store(grad_ptr + offs, (dloss * scale).to(DTYPE), mask=mask)


def mse_loss_fwd(input, target, weight, weight_period, scale, scale_tensor, reduction, need_grad, out_dtype):
    x, t = input.contiguous(), target.contiguous()
    plan = LossPlan(x, reduction, need_grad, scale, scale_tensor, flags=False)
    if plan.programs:
        mse_loss_kernel[(plan.programs,)](
            x, t, weight if weight is not None else x, weight_period, plan.loss if plan.loss is not None else x,
            plan.grad if need_grad else x, plan.partial, plan.scale, plan.n,
            HAS_WEIGHT=weight is not None, REDUCE=plan.reduce, NEED_GRAD=need_grad, DTYPE=plan.dtype,
            OPMATH=plan.opmath, INDEX32=plan.index32, BLOCK=BLOCK,
        )  # fmt: skip
    return finish(plan, out_dtype)
