"""Cross-entropy in Triton: one program per row, one read of the logits for the loss (online max and logsumexp over
BLOCK-wide chunks), then, when a gradient is asked for, a second sweep of the same row (from L2 on a GPU) that writes
it. The math is fusedopt/reference.py's; the launchers take what fusedopt::cross_entropy_fwd passes.

Runs on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _tanh_portable(u, acc_dtype: tl.constexpr):
    """tanh from exp, mul and add (the interpreter has no tanh), within about 2 ulp: the Taylor series
    sum_n 2^2n (2^2n - 1) B_2n / (2n)! u^(2n-1) below |u| = 0.4, 1 - 2 / (exp(2|u|) + 1) above. The exp form alone
    has an absolute error of ~eps, which for small u is a large relative one (softcap * eps in the capped logits)."""
    a = tl.abs(u)
    u2 = u * u
    if acc_dtype == tl.float64:
        p = -6.451689215655431e-06
        p = p * u2 + 1.5918905069328964e-05
        p = p * u2 - 3.927832388331683e-05
        p = p * u2 + 9.691537956929451e-05
        p = p * u2 - 0.00023912911424355248
        p = p * u2 + 0.000590027440945586
        p = p * u2 - 0.0014558343870513183
        p = p * u2 + 0.003592128036572481
        p = p * u2 - 0.008863235529902197
    else:
        p = -0.008863235529902197
    p = p * u2 + 0.021869488536155203
    p = p * u2 - 0.05396825396825397
    p = p * u2 + 0.13333333333333333
    p = p * u2 - 0.3333333333333333
    small = u + u * (p * u2)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)  # exp -> inf gives 1 exactly
    return tl.where(a < 0.4, small, tl.where(u < 0, -big, big))


@triton.jit
def _softcap(x, cap, SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr, ACC: tl.constexpr):
    if SOFTCAP:
        if LIBDEVICE:  # compiled: the device's own tanh (CUDA's tanhf / tanh, what torch.tanh runs)
            x = cap * libdevice.tanh(x / cap)
        else:
            x = cap * _tanh_portable(x / cap, ACC)
    return x


@triton.jit
def _ce_fwd_kernel(X, T, Y, W, G, GS, LOSS, LSE, n_cols, stride_x, stride_y, stride_g, ignore_index, one_minus_ls,
                   ls_over_c, z_loss, cap, WSUM, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr,
                   SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr, HAS_GRAD: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr, LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols0 = tl.arange(0, BLOCK)
    zero = tl.sum(tl.zeros([BLOCK], dtype=ACC), axis=0)
    if PROB:
        valid = zero == 0.0
        bad = zero != 0.0
        t = row * 0
    else:
        t = tl.load(T + row)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= n_cols))
        tl.device_assert(bad == 0, "fusedopt cross_entropy: target out of range")
        t = tl.where(valid & ~bad, t, 0)

    # Pass 1: running max m and sum s of exp(z - m), NaN seen, target sums. Everything is kept relative to the row
    # max (lse - z = log(s) - (z - m)): forming lse = m + log(s) first would round log(s) away when m is large. So
    # the target sums are sums of q (z - m) too, shifted by W (m_new - m_old) when the max grows (W: q seen so far).
    m = zero - float("inf")
    m_safe = zero  # m, or 0 while m is -inf: exp(-inf - 0) = 0
    s = zero
    has_nan = zero != 0.0
    acc_w = zero
    acc_wz = zero
    acc_q = zero
    acc_qz = zero
    for off in range(0, n_cols, BLOCK):
        cols = off + cols0
        mask = cols < n_cols
        z = _softcap(tl.load(x_row + cols, mask=mask, other=0.0).to(ACC), cap, SOFTCAP, LIBDEVICE, ACC)
        z = tl.where(mask, z, 0.0)
        has_nan = has_nan | (tl.sum((z != z).to(tl.int32), axis=0) > 0)
        zm = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=0))
        m_safe_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe_new) + tl.sum(tl.exp(zm - m_safe_new), axis=0)
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        else:
            w = tl.where(mask, 1.0, 0.0).to(ACC)
        if PROB:
            y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(ACC)
            q = tl.where(mask, w * (y * one_minus_ls + ls_over_c), 0.0)
            acc_qz = acc_qz - acc_q * (m_safe_new - m_safe)
            acc_qz += tl.sum(tl.where(mask, q * (z - m_safe_new), 0.0), axis=0)
            acc_q += tl.sum(q, axis=0)
        elif SMOOTHING:
            acc_wz = acc_wz - acc_w * (m_safe_new - m_safe)
            acc_wz += tl.sum(tl.where(mask, w * (z - m_safe_new), 0.0), axis=0)
            acc_w += tl.sum(w, axis=0)
        m = m_new
        m_safe = m_safe_new
    log_s = tl.where(has_nan, float("nan"), tl.log(s))
    lse = m_safe + log_s  # what return_lse gives; the loss uses log_s

    if PROB:
        big_q = acc_q
        loss = big_q * log_s - acc_qz
        w_t = zero
        z_t = zero
    else:
        if HAS_WEIGHT:
            w_t = tl.load(W + t).to(ACC)
            w_sum = tl.load(WSUM).to(ACC)
        else:
            w_t = zero + 1.0
            w_sum = zero + n_cols
        z_t = _softcap(tl.load(x_row + t).to(ACC), cap, SOFTCAP, LIBDEVICE, ACC)
        big_q = one_minus_ls * w_t + ls_over_c * w_sum
        loss = one_minus_ls * w_t * (log_s - (z_t - m_safe))
        if SMOOTHING:
            loss += ls_over_c * (w_sum * log_s - acc_wz)
    loss += z_loss * lse * lse
    loss = tl.where(valid, loss, 0.0)
    loss = tl.where(bad, float("nan"), loss)
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, tl.where(valid, lse, 0.0))

    if HAS_GRAD:
        # Pass 2: g = scale * ((Q + 2 z_loss lse) softmax - q) * (1 - (z/cap)^2), softmax = exp(z - m) / s (never
        # exp(z - lse): lse rounds against a large max); 0 on ignored rows.
        if HAS_GRAD_SCALE:
            scale = tl.load(GS).to(ACC)
        else:
            scale = zero + 1.0
        coef = scale * (big_q + 2.0 * z_loss * lse) / s
        g_row = G + row * stride_g
        for off in range(0, n_cols, BLOCK):
            cols = off + cols0
            mask = cols < n_cols
            z = _softcap(tl.load(x_row + cols, mask=mask, other=0.0).to(ACC), cap, SOFTCAP, LIBDEVICE, ACC)
            if HAS_WEIGHT:
                w = tl.load(W + cols, mask=mask, other=0.0).to(ACC)
            else:
                w = zero + 1.0
            if PROB:
                y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(ACC)
                q = w * (y * one_minus_ls + ls_over_c)
            else:
                q = ls_over_c * w + tl.where(cols == t, one_minus_ls * w_t, 0.0)
            g = coef * tl.exp(z - m_safe) - scale * q
            if SOFTCAP:
                g = g * (1.0 - (z / cap) * (z / cap))
            g = tl.where(valid, g, 0.0)
            g = tl.where(bad | has_nan, float("nan"), g)
            tl.store(g_row + cols, g.to(G.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(G, S, n_cols, stride_g, ACC: tl.constexpr, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if PER_ROW:
        f = tl.load(S + row).to(ACC)
    else:
        f = tl.load(S).to(ACC)
    if f != 1.0:  # loss.backward(): the whole launch is a no-op
        g_row = G + row * stride_g
        for off in range(0, n_cols, BLOCK):
            cols = off + tl.arange(0, BLOCK)
            mask = cols < n_cols
            g = tl.load(g_row + cols, mask=mask, other=0.0).to(ACC)
            tl.store(g_row + cols, (g * f).to(G.dtype.element_ty), mask=mask)


# Triton's interpreter (TRITON_INTERPRET=1, how the tests run on CPU tensors) has no libdevice: it takes the portable
# tanh. Compiled kernels use the device's own.
_INTERPRETED = type(_ce_fwd_kernel).__name__ == "InterpretedFunction"


def _block(n_cols: int, on_gpu: bool) -> int:
    return min(triton.next_power_of_2(max(n_cols, 16)), 4096 if on_gpu else 1024)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def cross_entropy_fwd(logits, target, weight, grad_out, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                      prob_target):  # fmt: skip
    """Per-row (loss, lse) in opmath; the gradient (times grad_scale) into grad_out when given. Layouts as
    fusedopt::cross_entropy_fwd's."""
    rows, n_cols = logits.shape
    opmath = torch.float64 if logits.dtype == torch.float64 else torch.float32
    loss = torch.empty(rows, dtype=opmath, device=logits.device)
    lse = torch.empty(rows, dtype=opmath, device=logits.device)
    if rows == 0:
        return loss, lse
    if not prob_target and logits.device.type == "cpu":
        # The interpreter has no device to assert on; on a GPU the kernel asserts and writes NaN.
        bad = (target != ignore_index) & ((target < 0) | (target >= n_cols))
        if bad.any():
            raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
    dummy = loss
    w_sum = weight.sum().reshape(1) if weight is not None else dummy  # read by the kernel: no host sync
    _ce_fwd_kernel[(rows,)](
        logits, target if not prob_target else dummy, target if prob_target else logits,
        weight if weight is not None else dummy, grad_out if grad_out is not None else logits,
        grad_scale if grad_scale is not None else dummy, loss, lse, n_cols, logits.stride(0),
        target.stride(0) if prob_target else 0, grad_out.stride(0) if grad_out is not None else 0, ignore_index,
        1.0 - label_smoothing, label_smoothing / n_cols, z_loss, softcap if softcap is not None else 1.0, w_sum,
        ACC=_acc(logits.dtype), HAS_WEIGHT=weight is not None, PROB=prob_target, SMOOTHING=label_smoothing != 0.0,
        SOFTCAP=softcap is not None, HAS_GRAD=grad_out is not None, HAS_GRAD_SCALE=grad_scale is not None,
        LIBDEVICE=not _INTERPRETED, BLOCK=_block(n_cols, logits.is_cuda),
    )  # fmt: skip
    return loss, lse


def cross_entropy_scale_grad(grad, scale):
    """grad (M, C) *= scale (one value per row, or one for all); rows whose factor is 1 are left untouched."""
    rows, n_cols = grad.shape
    if rows == 0 or n_cols == 0:
        return
    _scale_rows_kernel[(rows,)](
        grad, scale, n_cols, grad.stride(0), ACC=_acc(grad.dtype), PER_ROW=scale.numel() != 1,
        BLOCK=_block(n_cols, grad.is_cuda),
    )  # fmt: skip
