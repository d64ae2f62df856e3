"""Adam / AdamW in Triton: one launch per (device, dtype) group through the multi-tensor table."""

from __future__ import annotations

import triton
import triton.language as tl

from fusedopt.triton_kernels.multi_tensor import (
    TRITON_DTYPES,
    TensorTable,
    increment_steps,
    opmath,
    program_block,
    scalars_tensor,
)

BLOCK = 1024
ROW_PARAM, ROW_GRAD, ROW_EXP_AVG, ROW_EXP_AVG_SQ, ROW_MAX_EXP_AVG_SQ, ROW_STEP = range(6)


@triton.jit
def adam_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, OPMATH: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    DECOUPLED: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_DIVISOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)

    # Hyperparameters in float64 (hp_ptr), bias corrections from this tensor's step, then opmath.
    lr = tl.load(hp_ptr + 0)
    beta1 = tl.load(hp_ptr + 1)
    beta2 = tl.load(hp_ptr + 2)
    eps = tl.load(hp_ptr + 3)
    weight_decay = tl.load(hp_ptr + 4)
    step_ptr = tl.load(addrs_ptr + ROW_STEP * n_tensors + t).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
    bias_correction2 = 1.0 - tl.exp(step * tl.log(beta2))
    step_size = (lr / bias_correction1).to(OPMATH)
    bias_correction2_sqrt = tl.sqrt(bias_correction2).to(OPMATH)

    p_ptr = tl.load(addrs_ptr + ROW_PARAM * n_tensors + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(addrs_ptr + ROW_GRAD * n_tensors + t).to(tl.pointer_type(DTYPE))
    m_ptr = tl.load(addrs_ptr + ROW_EXP_AVG * n_tensors + t).to(tl.pointer_type(DTYPE))
    v_ptr = tl.load(addrs_ptr + ROW_EXP_AVG_SQ * n_tensors + t).to(tl.pointer_type(DTYPE))
    param = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    grad = tl.load(g_ptr + offs, mask=mask).to(OPMATH)
    exp_avg = tl.load(m_ptr + offs, mask=mask).to(OPMATH)
    exp_avg_sq = tl.load(v_ptr + offs, mask=mask).to(OPMATH)

    # --- the Adam update, written once ---
    if HAS_DIVISOR:
        grad = grad * (1.0 / tl.load(grad_divisor_ptr).to(tl.float64)).to(OPMATH)
    if MAXIMIZE:
        grad = -grad
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            param = param * (1.0 - lr * weight_decay).to(OPMATH)
        else:
            grad = grad + weight_decay.to(OPMATH) * param
    exp_avg = exp_avg + (grad - exp_avg) * (1.0 - beta1).to(OPMATH)
    exp_avg_sq = exp_avg_sq * beta2.to(OPMATH) + (1.0 - beta2).to(OPMATH) * grad * grad
    second_moment = exp_avg_sq
    if AMSGRAD:
        x_ptr = tl.load(addrs_ptr + ROW_MAX_EXP_AVG_SQ * n_tensors + t).to(tl.pointer_type(DTYPE))
        max_exp_avg_sq = tl.maximum(tl.load(x_ptr + offs, mask=mask).to(OPMATH), exp_avg_sq)
        tl.store(x_ptr + offs, max_exp_avg_sq.to(DTYPE), mask=mask)
        second_moment = max_exp_avg_sq
    denom = tl.sqrt(second_moment) / bias_correction2_sqrt + eps.to(OPMATH)
    param = param - step_size * exp_avg / denom

    tl.store(p_ptr + offs, param.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, exp_avg.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, exp_avg_sq.to(DTYPE), mask=mask)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
              weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf):  # fmt: skip
    if not params:
        return
    dtype = params[0].dtype
    device = params[0].device
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    for name, lst in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if any(not t.is_contiguous() for t in lst):
            raise RuntimeError(f"fusedopt adam_step (triton): {name} must be contiguous")
    table = TensorTable([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], steps], BLOCK)
    increment_steps(table, ROW_STEP, found_inf)
    hp = scalars_tensor([lr, beta1, beta2, eps, weight_decay], device, lr_tensor)
    dummy = hp
    adam_kernel[(table.blocks,)](
        table.addrs, table.numel, table.block_tensor, table.block_start, table.n, hp,
        grad_divisor.float() if grad_divisor is not None else dummy,
        found_inf.float() if found_inf is not None else dummy,
        DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), AMSGRAD=amsgrad, MAXIMIZE=maximize,
        DECOUPLED=decoupled_weight_decay, HAS_WEIGHT_DECAY=weight_decay != 0, HAS_DIVISOR=grad_divisor is not None,
        HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK,
    )  # fmt: skip
