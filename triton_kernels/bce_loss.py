"""Binary cross-entropy (on probabilities and on logits) in Triton: stage 1 (loss or partial sums + the gradient
in one pass); stage 2 in pointwise_loss.py. Same contracts as fusedopt/ops/bce_loss.py; torch's formulas."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.pointwise_loss import BLOCK, LossPlan, finish, wrap


@triton.jit
def _log1p(y):
    """log(1 + y) to a few ulps (Goldberg's correction of the rounding in 1 + y); libdevice.log1p has no
    interpreter implementation."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def bce_loss_kernel(x_ptr, t_ptr, w_ptr, w_period, loss_ptr, grad_ptr, partial_ptr, flags_ptr, scale_ptr, n,
                    HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr, NEED_GRAD: tl.constexpr, DTYPE: tl.constexpr,
                    OPMATH: tl.constexpr, INDEX32: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.5).to(OPMATH)
    t = tl.load(t_ptr + offs, mask=mask, other=0.5).to(OPMATH)
    # torch raises for input or target outside [0, 1] (NaN included): flag it, the caller raises.
    bad_x = tl.max(tl.where(mask & ~((x >= 0.0) & (x <= 1.0)), 1, 0), axis=0)
    bad_t = tl.max(tl.where(mask & ~((t >= 0.0) & (t <= 1.0)), 1, 0), axis=0)
    tl.store(flags_ptr + pid, bad_x | (bad_t * 2))
    # Both logs clamped at -100, as torch does.
    log_x = tl.maximum(tl.log(x), -100.0)
    log_1mx = tl.maximum(_log1p(-x), -100.0)
    loss = (t - 1.0) * log_1mx - t * log_x
    dloss = (x - t) / tl.maximum((1.0 - x) * x, 9.999999960041972e-13)  # torch's eps: 1e-12 as a float32
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


@triton.jit
def bce_with_logits_kernel(x_ptr, t_ptr, w_ptr, w_period, p_ptr, p_period, loss_ptr, grad_ptr, partial_ptr,
                           scale_ptr, n, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
                           REDUCE: tl.constexpr, NEED_GRAD: tl.constexpr, DTYPE: tl.constexpr, OPMATH: tl.constexpr,
                           INDEX32: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(OPMATH)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(OPMATH)
    # exp(-|x|) never overflows: log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)); sigmoid from the same exp.
    e = tl.exp(-tl.abs(x))
    log_sigmoid = tl.minimum(x, 0.0) - _log1p(e)
    r = 1.0 / (1.0 + e)
    sigmoid = tl.where(x >= 0.0, r, e * r)
    if HAS_POS_WEIGHT:
        p = tl.load(p_ptr + wrap(offs, p_period, INDEX32), mask=mask, other=0.0).to(OPMATH)
        loss = (1.0 - t) * x - ((p - 1.0) * t + 1.0) * log_sigmoid
        dloss = (p * t + 1.0 - t) * sigmoid - p * t
    else:
        loss = (1.0 - t) * x - log_sigmoid
        dloss = sigmoid - t
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


def bce_loss_fwd(input, target, weight, weight_period, scale, reduction, need_grad, out_dtype):
    x, t = input.contiguous(), target.contiguous()
    plan = LossPlan(x, reduction, need_grad, scale, None, flags=True)
    if plan.programs:
        bce_loss_kernel[(plan.programs,)](
            x, t, weight if weight is not None else x, weight_period, plan.loss if plan.loss is not None else x,
            plan.grad if need_grad else x, plan.partial, plan.block_flags, plan.scale, plan.n,
            HAS_WEIGHT=weight is not None, REDUCE=plan.reduce, NEED_GRAD=need_grad, DTYPE=plan.dtype,
            OPMATH=plan.opmath, INDEX32=plan.index32, BLOCK=BLOCK,
        )  # fmt: skip
    return finish(plan, out_dtype)


def bce_with_logits_fwd(input, target, weight, weight_period, pos_weight, pos_weight_period, scale, reduction,
                        need_grad, out_dtype):  # fmt: skip
    x, t = input.contiguous(), target.contiguous()
    plan = LossPlan(x, reduction, need_grad, scale, None, flags=False)
    if plan.programs:
        bce_with_logits_kernel[(plan.programs,)](
            x, t, weight if weight is not None else x, weight_period, pos_weight if pos_weight is not None else x,
            pos_weight_period, plan.loss if plan.loss is not None else x, plan.grad if need_grad else x,
            plan.partial, plan.scale, plan.n, HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
            REDUCE=plan.reduce, NEED_GRAD=need_grad, DTYPE=plan.dtype, OPMATH=plan.opmath, INDEX32=plan.index32,
            BLOCK=BLOCK,
        )  # fmt: skip
    return finish(plan, out_dtype)
