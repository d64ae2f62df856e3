"""Plain-PyTorch optimizer steps: the "torch" backend of every spec-driven optimizer (fusedopt/optim/_spec.py) and
the formulas the tests compare the kernels against. One tensor at a time, in opmath (float32 for 16-bit dtypes,
float64 for float64); no host syncs: GradScaler's found_inf, tensor learning rates and the stochastic-rounding
counter stay on the device. Every function takes the engines' arguments:

    <op>_step(params, grads, states, scalars, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round=None)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt import _checks
from fusedopt._dtypes import opmath_dtype


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


def _mix32(x: Tensor) -> Tensor:
    """csrc/common/stochastic_round.h's mix32 on int64 tensors holding uint32 values."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def stochastic_round_bf16(x: Tensor, state: Tensor, tensor_index: int) -> Tensor:
    """float32 x rounded to bfloat16 stochastically, the bits of csrc/common/stochastic_round.h (state: int64
    [seed, counter] on x's device). No host sync."""
    m = 0xFFFFFFFF
    seed, counter = state[0], state[1]
    seed_mix = (seed & m) ^ _mix32((seed >> 32) & m)
    key = _mix32(seed_mix ^ _mix32((counter + 0x9E3779B9 * (tensor_index + 1)) & m))
    bits = x.contiguous().view(torch.int32).to(torch.int64) & m
    index = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    r = _mix32(key ^ (index & m) ^ _mix32(index >> 32))
    rounded = ((bits + (r & 0xFFFF)) >> 16) & 0xFFFF
    rounded = torch.where(x.isnan(), ((bits >> 16) | 0x40) & 0xFFFF, rounded)
    return (rounded - ((rounded >> 15) << 16)).to(torch.int16).view(torch.bfloat16)  # as a signed 16-bit pattern


def _commit_param(param: Tensor, new: Tensor, keep: Tensor | None, stochastic_round: Tensor | None, i: int) -> None:
    """_commit for a param: stored by stochastic rounding when asked (bf16 params)."""
    if stochastic_round is not None:  # checked by _engine_step_begin
        new = stochastic_round_bf16(new.float(), stochastic_round, i)
    _commit(param, new, keep)


def _lr_value(lr, device):
    return lr.to(device, torch.float64) if isinstance(lr, Tensor) else lr


def _fma(a: Tensor, b, c: Tensor) -> Tensor:
    """a * b + c rounded once: torch's x.add(y, alpha=a) and addcmul(x, y, z) round so on the CPU, and the kernels
    do too (vfma)."""
    return torch.addcmul(c, a, b) if isinstance(b, Tensor) else torch.add(c, a, alpha=b)


def _engine_step_begin(op: str, params, grads, states, state_names, scalars, found_inf, used=None,
                       scalar_name="steps", stochastic_round=None):  # fmt: skip
    """The boundary checks (an unused state list is not checked), and found_inf as a device bool (or None)."""
    used = used if used is not None else (True,) * len(states)
    lists = {"grads": grads, **{name: s for name, s, on in zip(state_names, states, used) if on}}
    _checks.check_step(f"fusedopt {op}_step (torch)", params, lists, {scalar_name: scalars} if scalars else None)
    if stochastic_round is not None:
        _checks.check_stochastic_round(f"fusedopt {op}_step (torch)", params, stochastic_round)
    return None if found_inf is None else found_inf.reshape(()) != 0


def adagrad_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                 write_back_grads, stochastic_round=None):  # fmt: skip
    """torch.optim.Adagrad's update (single-tensor form): clr = lr / (1 + (step - 1) * lr_decay),
    sum += g^2, p -= clr * g / (sqrt(sum) + eps)."""
    (sums,) = states
    skip = _engine_step_begin("adagrad", params, grads, states, ["state_sums"], steps, found_inf,
                              stochastic_round=stochastic_round)  # fmt: skip
    lr = lr_tensor if lr_tensor is not None else lr
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        steps[i].add_(1.0 if skip is None else (~skip).to(steps[i].dtype))
        clr = (_lr_value(lr, param.device) / (1 + (steps[i].to(torch.float64) - 1) * hyper["lr_decay"])).to(ot)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if hyper["weight_decay"] != 0:
            g = _fma(p, hyper["weight_decay"], g)
        s = _fma(g, g, sums[i].to(ot))
        _commit_param(param, p + (-clr * g) / (s.sqrt() + hyper["eps"]), skip, stochastic_round, i)
        _commit(sums[i], s, skip)


def lion_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round=None):  # fmt: skip
    """Lion (Chen et al. 2023, Algorithm 2): update = sign(beta1 m + (1 - beta1) g);
    p = p * (1 - lr * wd) - lr * update; m = beta2 m + (1 - beta2) g (the paper's form: torch's lerp would turn an
    infinite momentum into NaN).
    sign(0) = 0 and sign(NaN) = NaN (torch.sign gives 0 there: a NaN grad would freeze the element silently behind a
    NaN momentum; here it makes the param NaN, as in every other optimizer)."""
    (exp_avgs,) = states
    skip = _engine_step_begin("lion", params, grads, states, ["exp_avgs"], [], found_inf,
                              stochastic_round=stochastic_round)  # fmt: skip
    lr = lr_tensor if lr_tensor is not None else lr
    beta1, beta2, weight_decay = hyper["beta1"], hyper["beta2"], hyper["weight_decay"]
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        lr_t = _lr_value(lr, param.device)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        m = exp_avgs[i].to(ot)
        c = m * beta1 + g * (1 - beta1)
        update = torch.where(c.isnan(), c, c.sign())
        _commit_param(param, param.to(ot) * (1 - lr_t * weight_decay) - lr_t * update, skip, stochastic_round, i)
        _commit(exp_avgs[i], m * beta2 + g * (1 - beta2), skip)


def adam_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round=None):  # fmt: skip
    """torch.optim.Adam/AdamW's update (single-tensor form); max_exp_avg_sqs only with amsgrad."""
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = states
    amsgrad = bool(hyper["amsgrad"])
    skip = _engine_step_begin("adam", params, grads, states, ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"], steps,
                              found_inf, used=(True, True, amsgrad), stochastic_round=stochastic_round)  # fmt: skip
    lr = lr_tensor if lr_tensor is not None else lr
    beta1, beta2, eps, weight_decay = hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"]
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        steps[i].add_(1.0 if skip is None else (~skip).to(steps[i].dtype))
        t = steps[i].to(torch.float64)
        lr_t = _lr_value(lr, param.device)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if weight_decay != 0:
            if hyper["decoupled_weight_decay"]:
                p = p * (1 - lr_t * weight_decay)
            else:
                g = _fma(p, weight_decay, g)
        m = exp_avgs[i].to(ot).lerp(g, 1 - beta1)
        v = torch.addcmul(exp_avg_sqs[i].to(ot) * beta2, g, g, value=1 - beta2)
        second = v
        if amsgrad:
            second = torch.maximum(max_exp_avg_sqs[i].to(ot), v)
            _commit(max_exp_avg_sqs[i], second, skip)
        step_size = (lr_t / (1 - beta1**t)).to(ot)
        denom = second.sqrt() / (1 - beta2**t).sqrt().to(ot) + eps
        _commit_param(param, p - step_size * m / denom, skip, stochastic_round, i)
        _commit(exp_avgs[i], m, skip)
        _commit(exp_avg_sqs[i], v, skip)


def rmsprop_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                 write_back_grads, stochastic_round=None):  # fmt: skip
    """torch.optim.RMSprop's update (single-tensor form); grad_avgs only when centered, momentum_buffers only with
    momentum > 0. hyper["quantized_states"] (set by fusedopt.lowbit.step_q8, not a hyperparameter): the centered
    variance square_avg - grad_avg^2 is clamped at 0, as the two states are quantized apart (docs/LOW_BIT_STATES.md);
    without it, torch's math exactly (a negative variance reads NaN)."""
    square_avgs, grad_avgs, momentum_buffers = states
    alpha, eps, weight_decay, momentum = hyper["alpha"], hyper["eps"], hyper["weight_decay"], hyper["momentum"]
    centered = bool(hyper["centered"])
    skip = _engine_step_begin("rmsprop", params, grads, states, ["square_avgs", "grad_avgs", "momentum_buffers"],
                              steps, found_inf, used=(True, centered, momentum > 0),
                              stochastic_round=stochastic_round)  # fmt: skip
    lr = lr_tensor if lr_tensor is not None else lr
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        steps[i].add_(1.0 if skip is None else (~skip).to(steps[i].dtype))
        lr_t = _lr_value(lr, param.device)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if weight_decay != 0:
            g = _fma(p, weight_decay, g)
        sq = torch.addcmul(square_avgs[i].to(ot) * alpha, g, g, value=1 - alpha)
        if centered:
            ga = grad_avgs[i].to(ot).lerp(g, 1 - alpha)
            variance = sq.addcmul(ga, ga, value=-1)  # torch's form: one rounding (fma)
            if hyper.get("quantized_states"):  # low-bit states, quantized apart: clamped at 0 (NaN stays NaN)
                variance = variance.clamp_min(0)
            avg = variance.sqrt() + eps
            _commit(grad_avgs[i], ga, skip)
        else:
            avg = sq.sqrt() + eps
        if momentum > 0:
            buf = momentum_buffers[i].to(ot) * momentum + g / avg
            _commit(momentum_buffers[i], buf, skip)
            new_p = _fma(buf, -lr_t, p)
        else:
            new_p = p + (-lr_t * g) / avg
        _commit_param(param, new_p, skip, stochastic_round, i)
        _commit(square_avgs[i], sq, skip)


def sgd_step(params, grads, states, first_flags, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
             write_back_grads, stochastic_round=None):  # fmt: skip
    """torch.optim.SGD's update (single-tensor form). A nonzero first_flags[i] makes momentum_buffers[i] a copy of
    the grad (torch's first step); the flags are cleared unless found_inf skips the step."""
    (momentum_buffers,) = states
    momentum, dampening, weight_decay = hyper["momentum"], hyper["dampening"], hyper["weight_decay"]
    first_flags = first_flags if momentum != 0 else []
    skip = _engine_step_begin("sgd", params, grads, states, ["momentum_buffers"], first_flags, found_inf,
                              used=(momentum != 0,), scalar_name="first_flags",
                              stochastic_round=stochastic_round)  # fmt: skip
    lr = lr_tensor if lr_tensor is not None else lr
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        lr_t = _lr_value(lr, param.device)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot)
        if weight_decay != 0:
            g = _fma(p, weight_decay, g)
        if momentum != 0:
            buf = _fma(g, 1 - dampening, momentum_buffers[i].to(ot) * momentum)
            if first_flags:
                buf = torch.where(first_flags[i].reshape(()) != 0, g, buf)
            _commit(momentum_buffers[i], buf, skip)
            g = _fma(buf, momentum, g) if hyper["nesterov"] else buf
        _commit_param(param, _fma(g, -lr_t, p), skip, stochastic_round, i)
    if first_flags:
        keep = torch.zeros((), device=first_flags[0].device) if skip is None else skip.to(first_flags[0].dtype)
        torch._foreach_mul_(first_flags, keep)


def muon_momentum_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                       write_back_grads, stochastic_round=None):  # fmt: skip
    """torch.optim.Muon's momentum: buf = lerp(buf, g, 1 - momentum); out = lerp(g, buf, momentum) under nesterov,
    else buf. `params` are the outputs (the matrices the Newton-Schulz iteration orthogonalizes next), so
    stochastic rounding (a param store) does not apply."""
    (bufs,) = states
    skip = _engine_step_begin("muon_momentum", params, grads, states, ["momentum_buffers"], [], found_inf)
    momentum, nesterov = hyper["momentum"], hyper["nesterov"] != 0
    for i, out in enumerate(params):
        ot = opmath_dtype(out.dtype)
        g = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        buf = bufs[i].to(ot).lerp(g, 1 - momentum)
        _commit(out, g.lerp(buf, momentum) if nesterov else buf, skip)
        _commit(bufs[i], buf, skip)


def muon_update_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
                     write_back_grads, stochastic_round=None):  # fmt: skip
    """torch.optim.Muon's param update: p = p * (1 - lr * weight_decay) - lr * lr_ratio * O, with O (the
    orthogonalized momentum) in `grads`."""
    skip = _engine_step_begin("muon_update", params, grads, states, [], [], found_inf,
                              stochastic_round=stochastic_round)  # fmt: skip
    lr = lr_tensor if lr_tensor is not None else lr
    for i, param in enumerate(params):
        ot = opmath_dtype(param.dtype)
        lr_t = _lr_value(lr, param.device)
        o = _effective_grad(grads[i], ot, grad_divisor, maximize, write_back_grads, skip)
        p = param.to(ot) * (1 - lr_t * hyper["weight_decay"])
        _commit_param(param, _fma(o, -(lr_t * hyper["lr_ratio"]), p), skip, stochastic_round, i)


def lamb_step(params, grads, states, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf,
              write_back_grads, stochastic_round=None):  # fmt: skip
    """LAMB (You et al. 2019) with apex FusedLAMB's options (csrc/common/lamb_math.h): Adam's moments (beta3 = 1 -
    beta1 with grad_averaging, L2 or decoupled weight decay), the direction u, and p -= lr * ratio * u with
    ratio = ||p|| / ||u|| (1 when either is 0; only with weight decay or use_nvlamb, as apex)."""
    exp_avgs, exp_avg_sqs = states
    skip = _engine_step_begin("lamb", params, grads, states, ["exp_avgs", "exp_avg_sqs"], steps, found_inf,
                              stochastic_round=stochastic_round)  # fmt: skip
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
        _commit_param(param, p - step_size * u, skip, stochastic_round, i)
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
