"""Plain-PyTorch references: the "torch" backend, and the formulas the tests compare the kernels against.

Written for clarity, one tensor at a time, in opmath (float32 for 16-bit dtypes, float64 for float64). No host
syncs: GradScaler's found_inf and tensor learning rates stay on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _effective_grad(grad: Tensor, dtype: torch.dtype, grad_divisor: Tensor | None, maximize: bool) -> Tensor:
    g = grad.to(dtype)
    if grad_divisor is not None:
        g = g / grad_divisor.to(dtype)
    return -g if maximize else g


def _commit(dst: Tensor, new: Tensor, keep: Tensor | None) -> None:
    """dst <- new, or dst unchanged where keep (found_inf) is set. No host sync."""
    if keep is not None:
        new = torch.where(keep, dst.to(new.dtype), new)
    dst.copy_(new)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
               amsgrad, maximize, decoupled_weight_decay, grad_divisor=None, found_inf=None):  # fmt: skip
    """torch.optim.Adam/AdamW's update (single-tensor form), with GradScaler's unscale and inf-skip folded in."""
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        step = steps[i]
        step.add_(1.0 if skip is None else (~skip).to(step.dtype))
        t = step.to(torch.float64)
        lr_t = lr.to(param.device, torch.float64) if isinstance(lr, Tensor) else lr
        g = _effective_grad(grads[i], ot, grad_divisor, maximize)
        p = param.to(ot)
        if weight_decay != 0:
            if decoupled_weight_decay:
                p = p * (1 - lr_t * weight_decay)
            else:
                g = g + weight_decay * p
        m = exp_avgs[i].to(ot).lerp(g, 1 - beta1)
        v = exp_avg_sqs[i].to(ot) * beta2 + (1 - beta2) * g * g
        second = v
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[i].to(ot), v)
            _commit(max_exp_avg_sqs[i], vmax, skip)
            second = vmax
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t).sqrt()
        step_size = (lr_t / bias_correction1).to(ot)
        denom = second.sqrt() / bias_correction2_sqrt.to(ot) + eps
        _commit(param, p - step_size * m / denom, skip)
        _commit(exp_avgs[i], m, skip)
        _commit(exp_avg_sqs[i], v, skip)
