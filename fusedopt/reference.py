"""Plain-PyTorch references: the "torch" backend, and the formulas the tests compare the kernels against.

Written for clarity, one tensor at a time, in opmath (float32 for 16-bit dtypes, float64 for float64). No host
syncs: GradScaler's found_inf and tensor learning rates stay on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt import _checks


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _effective_grad(grad: Tensor, dtype: torch.dtype, grad_divisor: Tensor | None, maximize: bool,
                    write_back: bool = False, skip: Tensor | None = None) -> Tensor:  # fmt: skip
    g = grad.to(dtype)
    if grad_divisor is not None:
        g = g / grad_divisor.to(dtype)
        if write_back:  # GradScaler: .grad holds the unscaled grad afterwards, as torch's fused optimizers leave it
            _commit(grad, g, skip)
    return -g if maximize else g


def _commit(dst: Tensor, new: Tensor, keep: Tensor | None) -> None:
    """dst <- new, or dst unchanged where keep (found_inf) is set. No host sync."""
    if keep is not None:
        new = torch.where(keep, dst.to(new.dtype), new)
    dst.copy_(new)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
               amsgrad, maximize, decoupled_weight_decay, grad_divisor=None, found_inf=None,
               write_back_grads=False):  # fmt: skip
    """torch.optim.Adam/AdamW's update (single-tensor form), with GradScaler's unscale and inf-skip folded in."""
    if not params:
        return
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    _checks.check_step("fusedopt adam_step (torch)", params, lists, {"steps": steps})
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        step = steps[i]
        step.add_(1.0 if skip is None else (~skip).to(step.dtype))
        t = step.to(torch.float64)
        lr_t = lr.to(param.device, torch.float64) if isinstance(lr, Tensor) else lr
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
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


def _lr_value(lr, device):
    return lr.to(device, torch.float64) if isinstance(lr, Tensor) else lr


def rmsprop_step_(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, *, lr, alpha, eps, weight_decay,
                  momentum, centered, maximize, grad_divisor=None, found_inf=None,
                  write_back_grads=False):  # fmt: skip
    """torch.optim.RMSprop's update (single-tensor form), with GradScaler's unscale and inf-skip folded in."""
    if not params:
        return
    lists = {"grads": grads, "square_avgs": square_avgs}
    if centered:
        lists["grad_avgs"] = grad_avgs
    if momentum > 0:
        lists["momentum_buffers"] = momentum_buffers
    _checks.check_step("fusedopt rmsprop_step (torch)", params, lists, {"steps": steps})
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        steps[i].add_(1.0 if skip is None else (~skip).to(steps[i].dtype))
        lr_t = _lr_value(lr, param.device)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if weight_decay != 0:
            g = g + weight_decay * p
        sq = square_avgs[i].to(ot) * alpha + (1 - alpha) * g * g
        if centered:
            ga = grad_avgs[i].to(ot).lerp(g, 1 - alpha)
            avg = sq.addcmul(ga, ga, value=-1).sqrt() + eps  # torch's form: one rounding (fma)
            _commit(grad_avgs[i], ga, skip)
        else:
            avg = sq.sqrt() + eps
        if momentum > 0:
            buf = momentum_buffers[i].to(ot) * momentum + g / avg
            _commit(momentum_buffers[i], buf, skip)
            new_p = p - lr_t * buf
        else:
            new_p = p - lr_t * (g / avg)
        _commit(param, new_p, skip)
        _commit(square_avgs[i], sq, skip)


def sgd_step_(params, grads, momentum_buffers, first_flags, *, lr, momentum, dampening, weight_decay, nesterov,
              maximize, grad_divisor=None, found_inf=None, write_back_grads=False):  # fmt: skip
    """torch.optim.SGD's update (single-tensor form). A nonzero first_flags[i] makes momentum_buffers[i] a copy of
    the grad (torch's first step); the flags are cleared unless found_inf skips the step."""
    if not params:
        return
    lists = {"grads": grads, "momentum_buffers": momentum_buffers} if momentum != 0 else {"grads": grads}
    flags = {"first_flags": first_flags} if momentum != 0 and first_flags else {}
    _checks.check_step("fusedopt sgd_step (torch)", params, lists, flags)
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        lr_t = _lr_value(lr, param.device)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if weight_decay != 0:
            g = g + weight_decay * p
        if momentum != 0:
            buf = momentum_buffers[i].to(ot) * momentum + (1 - dampening) * g
            if first_flags:
                buf = torch.where(first_flags[i].reshape(()) != 0, g, buf)
            _commit(momentum_buffers[i], buf, skip)
            g = g + momentum * buf if nesterov else buf
        _commit(param, p - lr_t * g, skip)
    if first_flags and momentum != 0:
        keep = torch.zeros((), device=first_flags[0].device) if skip is None else skip.to(first_flags[0].dtype)
        torch._foreach_mul_(first_flags, keep)


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


# ---- Optimizers through the shared engines: every backend's <op>_step takes these arguments (optim/_spec.py) ----
def _engine_step_begin(op: str, params, grads, states, state_names, steps, found_inf):
    """The boundary checks, and found_inf as a device bool (or None). No host sync."""
    lists = {"grads": grads, **dict(zip(state_names, states))}
    _checks.check_step(f"fusedopt {op}_step (torch)", params, lists, {"steps": steps} if steps else None)
    return None if found_inf is None else found_inf.reshape(()) != 0


def adagrad_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                 write_back_grads):  # fmt: skip
    """torch.optim.Adagrad's update (single-tensor form): clr = lr / (1 + (step - 1) * lr_decay),
    sum += g^2, p -= clr * g / (sqrt(sum) + eps)."""
    (sums,) = states
    skip = _engine_step_begin("adagrad", params, grads, states, ["state_sums"], steps, found_inf)
    lr = lr_tensor if lr_tensor is not None else lr
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        steps[i].add_(1.0 if skip is None else (~skip).to(steps[i].dtype))
        clr = (_lr_value(lr, param.device) / (1 + (steps[i].to(torch.float64) - 1) * hyper["lr_decay"])).to(ot)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if hyper["weight_decay"] != 0:
            g = g + hyper["weight_decay"] * p
        s = sums[i].to(ot) + g * g
        _commit(param, p - clr * (g / (s.sqrt() + hyper["eps"])), skip)
        _commit(sums[i], s, skip)


def lion_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads):  # fmt: skip
    """Lion (Chen et al. 2023, Algorithm 2): update = sign(lerp(m, g, 1 - beta1)); p = p * (1 - lr * wd) - lr * update;
    m = lerp(m, g, 1 - beta2). sign(0) = 0 and sign(NaN) = NaN (torch.sign gives 0 there: a NaN grad would freeze
    the element silently behind a NaN momentum; here it makes the param NaN, as in every other optimizer)."""
    (exp_avgs,) = states
    skip = _engine_step_begin("lion", params, grads, states, ["exp_avgs"], [], found_inf)
    lr = lr_tensor if lr_tensor is not None else lr
    beta1, beta2, weight_decay = hyper["beta1"], hyper["beta2"], hyper["weight_decay"]
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        lr_t = _lr_value(lr, param.device)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        m = exp_avgs[i].to(ot)
        c = m.lerp(g, 1 - beta1)
        update = torch.where(c.isnan(), c, c.sign())
        _commit(param, param.to(ot) * (1 - lr_t * weight_decay) - lr_t * update, skip)
        _commit(exp_avgs[i], m.lerp(g, 1 - beta2), skip)


def lamb_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads):  # fmt: skip
    """LAMB (You et al. 2019) with apex FusedLAMB's options (csrc/common/lamb_math.h): Adam's moments (beta3 = 1 -
    beta1 with grad_averaging, L2 or decoupled weight decay), the direction u, and p -= lr * ratio * u with
    ratio = ||p|| / ||u|| (1 when either is 0; only with weight decay or use_nvlamb, as apex)."""
    exp_avgs, exp_avg_sqs = states
    skip = _engine_step_begin("lamb", params, grads, states, ["exp_avgs", "exp_avg_sqs"], steps, found_inf)
    lr = lr_tensor if lr_tensor is not None else lr
    beta1, beta2, eps, wd = hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"]
    decoupled, bias = hyper["adam_w_mode"] != 0, hyper["bias_correction"] != 0
    beta3 = 1.0 - beta1 if hyper["grad_averaging"] != 0 else 1.0
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        steps[i].add_(1.0 if skip is None else (~skip).to(steps[i].dtype))
        t = steps[i].to(torch.float64)
        bc1 = (1 - beta1**t if bias else torch.ones_like(t)).to(ot)
        bc2 = (1 - beta2**t if bias else torch.ones_like(t)).to(ot)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if not decoupled and wd != 0:
            g = g + wd * p
        m = exp_avgs[i].to(ot) * beta1 + beta3 * g
        v = exp_avg_sqs[i].to(ot) * beta2 + (1 - beta2) * g * g
        u = (m / bc1) / ((v / bc2).sqrt() + eps)
        if decoupled and wd != 0:
            u = u + wd * p
        step_size = _lr_value(lr, param.device)  # a float or a float64 device tensor: no host-to-device copy
        if wd != 0 or hyper["use_nvlamb"] != 0:
            p_norm, u_norm = p.double().square().sum().sqrt(), u.double().square().sum().sqrt()
            step_size = step_size * torch.where((p_norm != 0) & (u_norm != 0), p_norm / u_norm, 1.0)
        step_size = step_size.to(ot) if isinstance(step_size, Tensor) else step_size
        _commit(param, p - step_size * u, skip)
        _commit(exp_avgs[i], m, skip)
        _commit(exp_avg_sqs[i], v, skip)


def _check_factor(t, shape, p, name: str, op: str) -> None:
    if t is None or t.layout != torch.strided:
        raise RuntimeError(f"{op}: {name} is undefined or not a dense (strided) tensor")
    if t.device != p.device or t.dtype != p.dtype or t.shape != shape:
        raise RuntimeError(f"{op}: {name} must be a {p.dtype} tensor of shape {list(shape)} on {p.device} for its "
                           f"param of shape {list(p.shape)}, got {t.dtype} {list(t.shape)} on {t.device}")  # fmt: skip


def check_adafactor(op: str, params, grads, row_vars, col_vars, variances, steps) -> None:
    """The boundary checks of an Adafactor bucket (csrc/bindings_cpu_adafactor.cpp has the same messages): the first
    len(row_vars) params are matrices (dim >= 2) with torch's row_var (..., R, 1) and col_var (..., 1, C); the
    others (dim <= 1) have a `variance` of their own shape."""
    n_f = len(row_vars)
    _checks.check_step(op, params, {"grads": grads}, {"steps": steps})
    if len(col_vars) != n_f or len(variances) != len(params) - n_f:
        raise RuntimeError(
            f"{op}: {n_f} row_vars, {len(col_vars)} col_vars and {len(variances)} variances for {len(params)} params "
            "(a row_var and a col_var per matrix, a variance per other param)"
        )
    for i, p in enumerate(params):
        if (i < n_f) != (p.dim() >= 2):
            raise RuntimeError(
                f"{op}: params[{i}] has {p.dim()} dims: the matrices (dim >= 2) come first, then the rest"
            )
        if p.numel() == 0:
            raise ZeroDivisionError(f"{op}: params[{i}] is empty: Adafactor divides by its size (torch.optim.Adafactor "
                                    "raises ZeroDivisionError too)")  # fmt: skip
        if i < n_f:
            _check_factor(row_vars[i], (*p.shape[:-1], 1), p, f"row_vars[{i}]", op)
            _check_factor(col_vars[i], (*p.shape[:-2], 1, p.shape[-1]), p, f"col_vars[{i}]", op)
        else:
            _check_factor(variances[i - n_f], p.shape, p, f"variances[{i - n_f}]", op)


def adafactor_step(params, grads, row_vars, col_vars, variances, steps, lr, lr_tensor, hyper, maximize, grad_divisor,
                   found_inf, write_back_grads):  # fmt: skip
    """torch.optim.Adafactor's update (single-tensor form), eps1 resolved by the caller: matrices (the first
    len(row_vars) params) keep row and column means of g^2, others a full variance; the update
    g / sqrt(max(estimate, eps1^2)) is scaled by alpha = max(eps2, rms(p)) * min(lr, 1 / sqrt(step)) and divided by
    max(1, rms(update) / d); weight decay multiplies p by 1 - lr * wd first."""
    if not params:
        return
    check_adafactor("fusedopt adafactor_step (torch)", params, grads, row_vars, col_vars, variances, steps)
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    lr = lr_tensor if lr_tensor is not None else lr
    eps1, eps2, d, wd = hyper["eps1"], hyper["eps2"], hyper["d"], hyper["weight_decay"]
    n_f = len(row_vars)
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        steps[i].add_(1.0 if skip is None else (~skip).to(steps[i].dtype))
        t = steps[i].to(torch.float64)
        w = (t ** hyper["beta2_decay"]).to(ot)
        lr_t = _lr_value(lr, param.device)  # a float or a float64 device tensor: no host-to-device copy
        rho = torch.minimum(1.0 / t.sqrt(), lr_t) if isinstance(lr_t, Tensor) else (1.0 / t.sqrt()).clamp(max=lr_t)
        p = param.to(ot)
        root_n = param.numel() ** 0.5
        rms = torch.linalg.vector_norm(p).double() / root_n  # torch's norm in opmath: float32 overflows as torch's
        alpha = torch.where(rms > eps2, rms, eps2) * rho  # Python's max(eps2, rms), as torch: a NaN rms gives eps2
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        if i < n_f:
            row = row_vars[i].to(ot).lerp(g.square().sum(-1, keepdim=True) / g.shape[-1], w)
            col = col_vars[i].to(ot).lerp(g.square().sum(-2, keepdim=True) / g.shape[-2], w)
            _commit(row_vars[i], row, skip)
            _commit(col_vars[i], col, skip)
            row, col = row_vars[i].to(ot), col_vars[i].to(ot)  # the stored factors, as torch reads them
            estimate = (row * col) / row.mean(-2, keepdim=True).clamp(min=eps1)
        else:
            k = i - n_f
            _commit(variances[k], variances[k].to(ot).lerp(g * g, w), skip)
            estimate = variances[k].to(ot)
        update = g / estimate.clamp(min=eps1 * eps1).sqrt()
        ratio = torch.linalg.vector_norm(update).double() / (root_n * d)
        denom = torch.where(ratio > 1.0, ratio, 1.0)  # Python's max(1.0, ratio), as torch: NaN gives 1
        _commit(param, p * (1 - lr_t * wd) - (alpha / denom).to(ot) * update, skip)
