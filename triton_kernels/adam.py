"""Adam / AdamW in Triton: one launch per (device, dtype) group through the multi-tensor table."""

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
    pow_by_squaring,
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
    WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
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
    bias_correction1 = 1.0 - pow_by_squaring(beta1, step)
    bias_correction2 = 1.0 - pow_by_squaring(beta2, step)
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
    if WRITE_BACK_GRADS:  # GradScaler: .grad holds the unscaled grad afterwards, as torch's fused optimizers leave it
        tl.store(g_ptr + offs, grad.to(DTYPE), mask=mask)
    if MAXIMIZE:
        grad = -grad
    if HAS_WEIGHT_DECAY:
        if DECOUPLED:
            param = param * (1.0 - lr * weight_decay).to(OPMATH)
        else:
            grad = grad + weight_decay.to(OPMATH) * param
    exp_avg = lerp(exp_avg, grad, (1.0 - beta1).to(OPMATH))
    exp_avg_sq = exp_avg_sq * beta2.to(OPMATH) + (1.0 - beta2).to(OPMATH) * grad * grad
    second_moment = exp_avg_sq
    if AMSGRAD:
        x_ptr = tl.load(addrs_ptr + ROW_MAX_EXP_AVG_SQ * n_tensors + t).to(tl.pointer_type(DTYPE))
        max_exp_avg_sq = tl.maximum(  # NaN stays NaN, as with torch.maximum
            tl.load(x_ptr + offs, mask=mask).to(OPMATH), exp_avg_sq, propagate_nan=tl.PropagateNan.ALL
        )
        tl.store(x_ptr + offs, max_exp_avg_sq.to(DTYPE), mask=mask)
        second_moment = max_exp_avg_sq
    denom = tl.sqrt(second_moment) / bias_correction2_sqrt + eps.to(OPMATH)
    param = param - step_size * exp_avg / denom

    tl.store(p_ptr + offs, param.to(DTYPE), mask=mask)
    tl.store(m_ptr + offs, exp_avg.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, exp_avg_sq.to(DTYPE), mask=mask)


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, lr_tensor, beta1, beta2, eps,
              weight_decay, amsgrad, maximize, decoupled_weight_decay, grad_divisor, found_inf,
              write_back_grads=False):  # fmt: skip
    if not params:
        return
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    _checks.check_step("fusedopt adam_step (triton)", params, lists, {"steps": steps})
    dtype = params[0].dtype
    device = params[0].device
    write_back_grads = write_back_grads and grad_divisor is not None
    copies = ContiguousCopies()
    params, exp_avgs, exp_avg_sqs = copies.write(params), copies.write(exp_avgs), copies.write(exp_avg_sqs)
    max_exp_avg_sqs = copies.write(max_exp_avg_sqs) if amsgrad else []
    grads = copies.write(grads) if write_back_grads else copies.read(grads)
    table = TensorTable([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps], BLOCK)
    increment_steps(table, ROW_STEP, found_inf)
    if table.blocks == 0:  # only empty tensors
        return
    hp = scalars_tensor([lr, beta1, beta2, eps, weight_decay], device, lr_tensor)
    dummy = hp
    adam_kernel[(table.blocks,)](
        table.addrs, table.numel, table.block_tensor, table.block_start, table.n, hp,
        grad_divisor.float() if grad_divisor is not None else dummy,
        found_inf.float() if found_inf is not None else dummy,
        DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), AMSGRAD=amsgrad, MAXIMIZE=maximize,
        DECOUPLED=decoupled_weight_decay, HAS_WEIGHT_DECAY=weight_decay != 0, HAS_DIVISOR=grad_divisor is not None,
        HAS_FOUND_INF=found_inf is not None, WRITE_BACK_GRADS=write_back_grads, BLOCK=BLOCK,
    )  # fmt: skip
    copies.finish()
