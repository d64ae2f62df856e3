"""LAMB in Triton: the two-pass form of csrc/cpu/norm_engine.h and csrc/cuda/norm_engine.cuh, with the math of
csrc/common/lamb_math.h (Triton cannot share the C++; the order of operations is the same). Two launches per
bucket besides the step prologue: stage 1 reads p, g and the moments and writes each program's partial sums of p^2
and u^2 (nothing else); stage 2 adds the partials of its tensor's programs (consecutive in the table's block map) in
a fixed order, forms lr * trust ratio in float64, computes the moments and u again from the same inputs and stores
the moments and p -= step * u (bf16 by stochastic rounding when asked: store_param; and the unscaled grad under
GradScaler)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedopt import _checks
from fusedopt.triton_kernels.multi_tensor import (
    TRITON_DTYPES,
    ContiguousCopies,
    TensorTable,
    opmath,
    pow_by_squaring,
    program_block,
    scalars_tensor,
    update_scalars,
)
from fusedopt.triton_kernels.optim_engine import BLOCK, ROW_FIRST_STATE, ROW_PARAM, list_ptr, load_grad, store_param

HYPER = ("beta1", "beta2", "eps", "weight_decay", "bias_correction", "grad_averaging", "adam_w_mode", "use_nvlamb")
ROW_EXP_AVG, ROW_EXP_AVG_SQ, ROW_STEP = ROW_FIRST_STATE, ROW_FIRST_STATE + 1, ROW_FIRST_STATE + 2


@triton.jit
def _coefs(addrs_ptr, n_tensors, t, hp_ptr, OPMATH: tl.constexpr):
    """beta1, beta3, beta2, 1 - beta2, bc1, bc2, eps, weight decay (opmath) and adam_w_mode, as lamb_math.h."""
    step = tl.load(tl.load(addrs_ptr + ROW_STEP * n_tensors + t).to(tl.pointer_type(tl.float32))).to(tl.float64)
    beta1, beta2 = tl.load(hp_ptr + 1), tl.load(hp_ptr + 2)
    bias = tl.load(hp_ptr + 5) != 0
    bc1 = tl.where(bias, 1.0 - pow_by_squaring(beta1, step), 1.0)
    bc2 = tl.where(bias, 1.0 - pow_by_squaring(beta2, step), 1.0)
    beta3 = tl.where(tl.load(hp_ptr + 6) != 0, 1.0 - beta1, 1.0)
    return (beta1.to(OPMATH), beta3.to(OPMATH), beta2.to(OPMATH), (1.0 - beta2).to(OPMATH), bc1.to(OPMATH),
            bc2.to(OPMATH), tl.load(hp_ptr + 3).to(OPMATH), tl.load(hp_ptr + 4).to(OPMATH),
            tl.load(hp_ptr + 7) != 0)  # fmt: skip


@triton.jit
def _moments(param, grad, m, v, beta1, beta3, beta2, one_minus_beta2, bc1, bc2, eps, wd, decoupled):
    """The new moments and the direction u (lamb_math.h's moments): both stages compute them from the same inputs."""
    grad = tl.where((decoupled == 0) & (wd != 0), grad + wd * param, grad)
    m = m * beta1 + beta3 * grad
    v = v * beta2 + one_minus_beta2 * grad * grad
    u = (m / bc1) / (tl.sqrt(v / bc2) + eps)
    return m, v, tl.where(decoupled & (wd != 0), u + wd * param, u)


@triton.jit
def lamb_stage1_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    partials_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    p_ptr = list_ptr(addrs_ptr, ROW_PARAM, n_tensors, t, DTYPE)
    m_ptr = list_ptr(addrs_ptr, ROW_EXP_AVG, n_tensors, t, DTYPE)
    v_ptr = list_ptr(addrs_ptr, ROW_EXP_AVG_SQ, n_tensors, t, DTYPE)
    param = tl.load(p_ptr + offs, mask=mask, other=0).to(OPMATH)
    m = tl.load(m_ptr + offs, mask=mask, other=0).to(OPMATH)
    v = tl.load(v_ptr + offs, mask=mask, other=0).to(OPMATH)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR, False,
                     MAXIMIZE)  # fmt: skip
    b1, b3, b2, omb2, bc1, bc2, eps, wd, decoupled = _coefs(addrs_ptr, n_tensors, t, hp_ptr, OPMATH)
    _, _, u = _moments(param, grad, m, v, b1, b3, b2, omb2, bc1, bc2, eps, wd, decoupled)  # nothing stored
    pid = tl.program_id(0)
    tl.store(partials_ptr + 2 * pid, tl.sum(tl.where(mask, param * param, 0.0)).to(tl.float64))
    tl.store(partials_ptr + 2 * pid + 1, tl.sum(tl.where(mask, u * u, 0.0)).to(tl.float64))


@triton.jit
def lamb_stage2_kernel(
    addrs_ptr, numel_ptr, block_tensor_ptr, block_start_ptr, n_tensors, hp_ptr, grad_divisor_ptr, found_inf_ptr,
    sr_ptr, partials_ptr, DTYPE: tl.constexpr, OPMATH: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_DIVISOR: tl.constexpr, HAS_FOUND_INF: tl.constexpr, WRITE_BACK_GRADS: tl.constexpr, BLOCK: tl.constexpr,
    STOCHASTIC_ROUND: tl.constexpr,
):  # fmt: skip
    t, offs, mask = program_block(numel_ptr, block_tensor_ptr, block_start_ptr, found_inf_ptr, HAS_FOUND_INF, BLOCK)
    # This tensor's programs: (this program - its block index within the tensor), one per BLOCK elements.
    first = tl.program_id(0).to(tl.int64) - tl.load(block_start_ptr + tl.program_id(0)) // BLOCK
    count = tl.cdiv(tl.load(numel_ptr + t), BLOCK)
    acc_p = tl.zeros([BLOCK], dtype=tl.float64)
    acc_u = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, count, BLOCK):
        idx = j + tl.arange(0, BLOCK)
        valid = idx < count
        acc_p += tl.load(partials_ptr + 2 * (first + idx), mask=valid, other=0.0)
        acc_u += tl.load(partials_ptr + 2 * (first + idx) + 1, mask=valid, other=0.0)
    lr = tl.load(hp_ptr)
    p_norm, u_norm = tl.sqrt(tl.sum(acc_p)), tl.sqrt(tl.sum(acc_u))
    adaptive = (tl.load(hp_ptr + 4) != 0) | (tl.load(hp_ptr + 8) != 0)
    ratio = tl.where(adaptive & (p_norm != 0) & (u_norm != 0), p_norm / u_norm, 1.0)
    step = (lr * ratio).to(OPMATH)

    p_ptr = list_ptr(addrs_ptr, ROW_PARAM, n_tensors, t, DTYPE)
    m_ptr = list_ptr(addrs_ptr, ROW_EXP_AVG, n_tensors, t, DTYPE)
    v_ptr = list_ptr(addrs_ptr, ROW_EXP_AVG_SQ, n_tensors, t, DTYPE)
    param = tl.load(p_ptr + offs, mask=mask).to(OPMATH)
    m = tl.load(m_ptr + offs, mask=mask).to(OPMATH)
    v = tl.load(v_ptr + offs, mask=mask).to(OPMATH)
    grad = load_grad(addrs_ptr, n_tensors, t, offs, mask, grad_divisor_ptr, DTYPE, OPMATH, HAS_DIVISOR,
                     WRITE_BACK_GRADS, MAXIMIZE)  # fmt: skip
    b1, b3, b2, omb2, bc1, bc2, eps, wd, decoupled = _coefs(addrs_ptr, n_tensors, t, hp_ptr, OPMATH)
    m, v, u = _moments(param, grad, m, v, b1, b3, b2, omb2, bc1, bc2, eps, wd, decoupled)
    store_param(p_ptr, offs, mask, param - step * u, t, sr_ptr, DTYPE, STOCHASTIC_ROUND)
    tl.store(m_ptr + offs, m.to(DTYPE), mask=mask)
    tl.store(v_ptr + offs, v.to(DTYPE), mask=mask)


def lamb_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round=None, masters=()):  # fmt: skip
    if not params:
        return
    _checks.refuse_masters("fusedopt lamb_step (triton)", masters)
    _checks.check_step("fusedopt lamb_step (triton)", params, {"grads": grads, "exp_avgs": states[0],
                       "exp_avg_sqs": states[1]}, {"steps": steps})  # fmt: skip
    if stochastic_round is not None:
        _checks.check_stochastic_round("fusedopt lamb_step (triton)", params, stochastic_round)
    dtype, device = params[0].dtype, params[0].device
    write_back_grads = write_back_grads and grad_divisor is not None
    copies = ContiguousCopies()
    params = copies.write(params)
    states = [copies.write(s) for s in states]
    grads = copies.write(grads) if write_back_grads else copies.read(grads)
    table = TensorTable([params, grads, *states, steps], BLOCK)
    update_scalars(table, ROW_STEP, found_inf, 1.0, 1.0)  # step += 1 unless found_inf
    if table.blocks == 0:
        return
    hp = scalars_tensor([lr, *(float(hyper[name]) for name in HYPER)], device, lr_tensor)
    partials = torch.empty(2 * table.blocks, dtype=torch.float64, device=device)
    found = found_inf.float() if found_inf is not None else hp
    common = (table.addrs, table.numel, table.block_tensor, table.block_start, table.n, hp)
    flags = dict(DTYPE=TRITON_DTYPES[dtype], OPMATH=opmath(dtype), HAS_FOUND_INF=found_inf is not None, BLOCK=BLOCK)
    common = (*common, grad_divisor.float() if grad_divisor is not None else hp, found)
    flags.update(MAXIMIZE=maximize, HAS_DIVISOR=grad_divisor is not None)
    lamb_stage1_kernel[(table.blocks,)](*common, partials, **flags)
    sr = stochastic_round if stochastic_round is not None else table.numel  # any valid pointer when unused
    lamb_stage2_kernel[(table.blocks,)](*common, sr, partials, WRITE_BACK_GRADS=write_back_grads,
                                        STOCHASTIC_ROUND=stochastic_round is not None, **flags)  # fmt: skip
    copies.finish()
