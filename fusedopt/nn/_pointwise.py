"""Shared plumbing of the pointwise losses (MSE, BCE, BCE with logits): reductions, flat periodic weights, and the
backward that scales the gradient the forward already wrote.

A weight that broadcasts to the loss shape is handed to the kernels flat, as w[i % period] over the flat index i:
a weight whose shape (leading 1s dropped) is a suffix of the loss shape (per class, per position, a scalar) is used
as is with period = its numel; any other broadcast is materialised once (period = numel of the loss).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import _reduction as _Reduction

from fusedopt import reference
from fusedopt.nn import _torch_args

FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTION_ENUM = {"none": reference.REDUCTION_NONE, "mean": reference.REDUCTION_MEAN, "sum": reference.REDUCTION_SUM}


def reduction_string(size_average, reduce, reduction: str) -> str:
    """torch's legacy size_average/reduce conversion (with its deprecation warning), then torch's validation."""
    if size_average is not None or reduce is not None:
        return _Reduction.legacy_get_string(size_average, reduce)
    return reduction


def reduction_enum(reduction: str) -> int:
    """torch's reading ("elementwise_mean" is "mean" with its warning), as the kernels' enum."""
    return REDUCTION_ENUM[_torch_args.reduction_name(reduction)]


def autocast_on(t: Tensor) -> bool:
    return torch.is_autocast_enabled(t.device.type)


def autocast_fp32(*tensors: Tensor | None) -> tuple:
    """What autocast does before torch's float32-listed losses (mse_loss, binary_cross_entropy_with_logits): 16-bit
    floating tensors are cast up to float32 (differentiably)."""
    return tuple(t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


def same_device(*tensors: Tensor | None) -> bool:
    devices = {t.device for t in tensors if t is not None}
    return len(devices) <= 1


def broadcasts_in_place(shape: torch.Size, *others: Tensor | None) -> bool:
    """True when every tensor broadcasts to `shape` without enlarging it (what torch's in-place ops require)."""
    for t in others:
        if t is None:
            continue
        try:
            if torch.broadcast_shapes(shape, t.shape) != shape:
                return False
        except RuntimeError:
            return False
    return True


def periodic_weight(w: Tensor | None, shape: torch.Size, dtype: torch.dtype) -> tuple[Tensor | None, int]:
    """(flat contiguous weight in dtype, period) such that the weight of flat element i is flat[i % period]."""
    numel = math.prod(shape)
    if w is None or numel == 0:  # an empty loss reads no weight
        return None, 1
    dims = list(w.shape)
    while dims and dims[0] == 1:
        dims.pop(0)
    if not dims:
        return w.detach().reshape(1).to(dtype), 1
    if tuple(dims) == tuple(shape[len(shape) - len(dims) :]):
        return w.detach().to(dtype).contiguous().reshape(-1), max(1, w.numel())
    return w.detach().to(dtype).expand(shape).contiguous().reshape(-1), max(1, numel)


def mean_scale(reduction: int, numel: int) -> float:
    """The mean's 1/numel (NaN for an empty input, as torch's mean of nothing), else 1."""
    if reduction != reference.REDUCTION_MEAN:
        return 1.0
    return 1.0 / numel if numel else math.nan


def _is_cpu_one(grad_output: Tensor, reduction: int) -> bool:
    """A reduced loss's grad_output that is exactly 1 on the CPU, where reading it costs no device sync."""
    if reduction == reference.REDUCTION_NONE or grad_output.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return grad_output.numel() == 1 and float(grad_output) == 1.0


def scale_saved_grad(ctx, grad_output: Tensor) -> Tensor:
    """The backward of every pointwise loss: the forward saved d loss / d input (mean factor folded in); multiply it
    in place by grad_output, a scalar for reduced losses, elementwise for reduction="none"."""
    if torch.is_grad_enabled():  # create_graph=True: the saved gradient has no graph of its own
        raise RuntimeError(
            f"fusedopt {ctx.op_name}: double backward (create_graph=True) is not supported; the fused forward saves "
            "the gradient, not a differentiable formula. Use torch.nn.functional for higher-order gradients."
        )
    if ctx.consumed:
        raise RuntimeError(
            f"fusedopt {ctx.op_name}: backward ran twice through the same graph (retain_graph=True); the gradient "
            "saved by the forward is scaled in place by the first backward. Use torch.nn.functional for that."
        )
    ctx.consumed = True
    (grad,) = ctx.saved_tensors
    if _is_cpu_one(grad_output, ctx.reduction):
        return grad  # loss.backward() on the CPU: skip a pass that would multiply by 1
    if ctx.reduction == reference.REDUCTION_NONE:
        grad.mul_(grad_output.reshape(grad.shape))
    else:
        grad.mul_(grad_output)
    return grad
