"""Plain-PyTorch references: the "torch" backend, and the formulas the tests compare the kernels against.

Written for clarity, one tensor at a time, in opmath (float32 for 16-bit dtypes, float64 for float64). No host
syncs: GradScaler's found_inf and tensor learning rates stay on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt._dtypes import opmath_dtype


def grad_norm_power_sum(tensors, norm_type: float) -> Tensor:
    """sum |x|^p over all tensors (max |x| for p = inf), accumulated in float64 for float64 tensors, else float32."""
    acc = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if not tensors:
        return torch.zeros((), dtype=acc)
    parts = []
    for t in tensors:
        a = t.detach().to(acc).abs().reshape(-1)
        if norm_type == float("inf"):
            parts.append(a.amax() if a.numel() else a.new_zeros(()))
        else:
            parts.append(a.pow(norm_type).sum())
    stacked = torch.stack([x.to(tensors[0].device) for x in parts])
    return stacked.amax() if norm_type == float("inf") else stacked.sum()


def scale_(tensors, coef: Tensor) -> None:
    """x *= coef in opmath, coef a one-element tensor on the tensors' device."""
    torch._foreach_mul_(list(tensors), coef)


# --- Pointwise losses (MSE, BCE, BCE with logits): the "torch" backend of fusedopt::*_loss_fwd -------------------
# Inputs are flat and contiguous; a weight broadcast along the flat index is `w[i % period]` (see fusedopt/nn/
# _pointwise.py). Each returns (loss, grad): loss unreduced (numel,) in the input dtype for reduction 0 ("none"),
# else the 0-d sum * scale in out_dtype; grad = d loss_i / d input_i * scale, or an empty tensor.

REDUCTION_NONE, REDUCTION_MEAN, REDUCTION_SUM = 0, 1, 2
BCE_LOG_CLAMP = -100.0  # torch clamps both logs of binary_cross_entropy at -100
BCE_GRAD_EPS = 9.999999960041972e-13  # and divides its gradient by max(x (1 - x), 1e-12), 1e-12 as a float32


def periodic(w: Tensor | None, period: int, numel: int, dtype: torch.dtype) -> Tensor | None:
    """The flat weight w[i % period] for i < numel, in dtype."""
    if w is None:
        return None
    w = w.to(dtype)
    return w if period == numel else w.repeat(-(-numel // period))[:numel]


def _finish(loss: Tensor, grad: Tensor | None, x: Tensor, scale: float, scale_tensor: Tensor | None, reduction: int,
            need_grad: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:  # fmt: skip
    if scale_tensor is not None:
        scale_t = scale_tensor.reshape(()).to(loss.dtype) * scale
    else:
        scale_t = scale
    if reduction == REDUCTION_NONE:
        out = loss.to(x.dtype)
    else:
        acc = torch.float64  # accumulate the sum in double, like the kernels' second stage
        out = (loss.to(acc).sum() * (scale_t.to(acc) if isinstance(scale_t, Tensor) else scale_t)).to(out_dtype)
    g = (grad * scale_t).to(x.dtype) if need_grad else x.new_empty(0)
    return out, g


def mse_loss_fwd(x, t, weight, weight_period, scale, scale_tensor, reduction, need_grad, out_dtype):
    ot = opmath_dtype(x.dtype)
    xo, to = x.to(ot), t.to(ot)
    w = periodic(weight, weight_period, x.numel(), ot)
    diff = xo - to
    loss, grad = diff * diff, 2.0 * diff
    if w is not None:
        loss, grad = loss * w, grad * w
    return _finish(loss, grad, x, scale, scale_tensor, reduction, need_grad, out_dtype)


def bce_range_flags(x: Tensor, t: Tensor) -> Tensor:
    """int32 (1,): bit 0 set when an input is outside [0, 1] (or NaN), bit 1 likewise for the target."""
    bad_x = ~((x >= 0) & (x <= 1))
    bad_t = ~((t >= 0) & (t <= 1))
    return (bad_x.any().to(torch.int32) + 2 * bad_t.any().to(torch.int32)).reshape(1)


def bce_loss_fwd(x, t, weight, weight_period, scale, reduction, need_grad, out_dtype):
    ot = opmath_dtype(x.dtype)
    xo, to = x.to(ot), t.to(ot)
    w = periodic(weight, weight_period, x.numel(), ot)
    log_x = torch.log(xo).clamp_min(BCE_LOG_CLAMP)
    log_1mx = torch.log1p(-xo).clamp_min(BCE_LOG_CLAMP)
    loss = (to - 1) * log_1mx - to * log_x
    grad = (xo - to) / (xo * (1 - xo)).clamp_min(BCE_GRAD_EPS)
    if w is not None:
        loss, grad = loss * w, grad * w
    out, g = _finish(loss, grad, x, scale, None, reduction, need_grad, out_dtype)
    return out, g, bce_range_flags(xo, to)


def bce_with_logits_fwd(x, t, weight, weight_period, pos_weight, pos_weight_period, scale, reduction, need_grad,
                        out_dtype):  # fmt: skip
    ot = opmath_dtype(x.dtype)
    xo, to = x.to(ot), t.to(ot)
    w = periodic(weight, weight_period, x.numel(), ot)
    pw = periodic(pos_weight, pos_weight_period, x.numel(), ot)
    sig = torch.sigmoid(xo)
    if pw is None:
        loss = (1 - to) * xo - torch.nn.functional.logsigmoid(xo)
        grad = sig - to
    else:
        loss = (1 - to) * xo - ((pw - 1) * to + 1) * torch.nn.functional.logsigmoid(xo)
        grad = (pw * to + 1 - to) * sig - pw * to
    if w is not None:
        loss, grad = loss * w, grad * w
    return _finish(loss, grad, x, scale, None, reduction, need_grad, out_dtype)
# ---------------------------------------------------------------------------------------------------------------------
# Cross-entropy. Per row with logits z (after the optional softcap), lse = logsumexp(z) and per-class target weights q:
#   class index t: q_c = (1 - ls) * w_t * [c == t] + ls / C * w_c     (w = 1 without a weight)
#   probabilities y: q_c = w_c * ((1 - ls) * y_c + ls / C)
#   loss = sum_c q_c * (lse - z_c) + z_loss * lse^2,   dloss/dz_c = (Q + 2 * z_loss * lse) * softmax(z)_c - q_c
# with Q = sum_c q_c. Ignored rows give 0. This is torch's loss, label smoothing and weights included.


def softcap_logits(x: Tensor, softcap: float | None) -> Tensor:
    """Gemma-2's logit soft-capping: cap * tanh(x / cap)."""
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def logsumexp(z: Tensor, dim: int) -> Tensor:
    """torch.logsumexp's value, with the gradient exp(z - max) / sum: torch's backward forms exp(z - lse), which
    rounds against a large max (a relative error of 1e-4 at logits near 1e12 in float64)."""
    m = z.detach().amax(dim, keepdim=True)
    m = torch.where(m == float("-inf"), 0.0, m)  # a row of only -inf: exp(-inf - 0) = 0
    return (m + torch.log(torch.exp(z - m).sum(dim, keepdim=True))).squeeze(dim)


def cross_entropy_formula(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                          z_loss=0.0, softcap=None):  # fmt: skip
    """The loss fusedopt computes, as differentiable plain PyTorch: F.cross_entropy on soft-capped logits, plus PaLM's
    z_loss * logsumexp^2 on every non-ignored row; a mean divides everything by torch's own denominator."""
    import torch.nn.functional as F

    z = softcap_logits(input, softcap)
    loss = F.cross_entropy(z, target, weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)  # fmt: skip
    class_dim = 0 if input.dim() == 1 else 1
    prob = input.shape == target.shape
    valid = torch.ones_like(loss, dtype=torch.bool) if prob else target != ignore_index
    if z_loss:
        loss = loss + torch.where(valid, z_loss * logsumexp(z, class_dim) ** 2, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if prob:
        return loss.sum() / loss.numel()
    denom = valid.sum() if weight is None else torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()
    return loss.sum() / denom


def check_targets(target: Tensor, ignore_index: int, num_classes: int) -> Tensor:
    """Class-index targets that are neither ignored nor in [0, C) raise torch's IndexError: on the host for CPU
    tensors (no device to sync with), as a device-side assert elsewhere (torch's CUDA kernel asserts too).
    Returns the mask of such targets."""
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if target.device.type == "cpu":
        if bad.any():
            raise IndexError(f"Target {int(target[bad][0])} is out of bounds.")
    else:
        torch._assert_async(~bad.any(), "fusedopt cross_entropy: target out of bounds")
    return bad


def cross_entropy_fwd(logits: Tensor, target: Tensor, weight: Tensor | None, grad_out: Tensor | None,
                      grad_scale: Tensor | None, ignore_index: int, label_smoothing: float, z_loss: float,
                      softcap: float | None, prob_target: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The "torch" backend of fusedopt::cross_entropy_fwd: logits (M, C); target (M,) int64 or (M, C) probabilities.
    Returns the per-row loss and lse in opmath; writes the gradient w.r.t. logits, times grad_scale (one value or
    None), into grad_out when given.

    Everything is taken relative to the row max: lse - z_c = log(sum) - (z_c - max) and softmax = exp(z - max) / sum.
    Forming lse = max + log(sum) first would round log(sum) away against a large max (1e30, or 1e4 in float32)."""
    ot = opmath_dtype(logits.dtype)
    x = logits.to(ot)
    rows, num_classes = x.shape
    ls = label_smoothing
    ls_over_c = ls / num_classes if num_classes else 0.0
    bad = None if prob_target else check_targets(target, ignore_index, num_classes)
    if num_classes == 0:  # every row is ignored (else it was out of bounds) or has an empty probability target
        lse = x.new_full((rows,), float("-inf")) if prob_target else x.new_zeros(rows)
        return x.new_zeros(rows), lse
    z = softcap_logits(x, softcap)
    row_max = z.amax(-1, keepdim=True)
    shift = torch.where(row_max == float("-inf"), 0.0, row_max)  # a row of only -inf: exp(-inf - 0) = 0
    zs = z - shift
    exp_zs = torch.exp(zs)
    sum_exp = exp_zs.sum(-1)
    log_sum = torch.log(sum_exp)
    lse = shift.squeeze(-1) + log_sum
    w = None if weight is None else weight.to(ot)
    if prob_target:
        y = target.to(ot)
        if ls != 0:
            y = y * (1 - ls) + ls_over_c
        q = y if w is None else y * w
        big_q = q.sum(-1)
        loss = big_q * log_sum - (q * zs).sum(-1)
        valid = None
    else:
        valid = (target != ignore_index) & ~bad
        t = torch.where(valid, target, 0).unsqueeze(-1)
        w_t = torch.ones_like(lse) if w is None else w[t.squeeze(-1)]
        zs_t = zs.gather(-1, t).squeeze(-1)
        w_sum = num_classes if w is None else w.sum()
        big_q = (1 - ls) * w_t + ls_over_c * w_sum
        loss = (1 - ls) * w_t * (log_sum - zs_t)
        if ls != 0:  # the smoothing term only when asked: 0 * (-inf logits) would be NaN
            wzs = zs.sum(-1) if w is None else (zs * w).sum(-1)
            loss = loss + ls_over_c * (w_sum * log_sum - wzs)
    loss = loss + z_loss * lse * lse
    if valid is not None:  # ignored rows give 0; out-of-bounds ones (past the device assert) NaN, as the kernels
        loss = torch.where(valid, loss, torch.where(bad, float("nan"), 0.0))
        lse = torch.where(valid, lse, torch.where(bad, float("nan"), 0.0))
    if grad_out is not None:
        g = (big_q + 2 * z_loss * lse).unsqueeze(-1) * (exp_zs / sum_exp.unsqueeze(-1))
        if prob_target:
            g = g - q
        else:
            smooth = ls_over_c * (torch.ones_like(lse).unsqueeze(-1) if w is None else w)
            g = (g - smooth).scatter_add(-1, t, -((1 - ls) * w_t).unsqueeze(-1))
        if softcap is not None:
            g = g * (1 - (z / softcap) ** 2)
        if grad_scale is not None:
            g = g * grad_scale.to(ot)
        if valid is not None:  # after the scale: an ignored row stays 0 when the scale is 1/0 (torch's NaN mean)
            g = torch.where(valid.unsqueeze(-1), g, torch.where(bad, float("nan"), 0.0).unsqueeze(-1))
        grad_out.copy_(g)
    return loss, lse


def cross_entropy_scale_grad(grad: Tensor, scale: Tensor) -> None:
    """grad (M, C) *= scale, one value per row (M,) or one for all (1,): the fused cross-entropy's backward."""
    grad.mul_(scale.reshape(-1, 1))


# The torch backend's optimizer kernels live in reference_optim.py; `_backend.kernels("torch", op)` finds them here.
from fusedopt.reference_optim import (  # noqa: E402
    adafactor_step,
    adagrad_step,
    adam_step,
    check_adafactor,
    lamb_step,
    lion_step,
    muon_momentum_step,
    muon_update_step,
    rmsprop_step,
    sgd_step,
    stochastic_round_bf16,
)

__all__ = ["adafactor_step", "adagrad_step", "adam_step", "check_adafactor", "lamb_step", "lion_step",
           "muon_momentum_step", "muon_update_step", "opmath_dtype",
           "rmsprop_step", "sgd_step", "stochastic_round_bf16"]  # fmt: skip
