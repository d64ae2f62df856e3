"""Fused mean squared error: fusedopt.nn.MSELoss and the function behind fusedopt.nn.functional.mse_loss.

One kernel pass reads input and target once and writes the loss (or its sum) and, when a gradient is needed, the
input gradient; the backward only scales that gradient by grad_output. The target gradient is its negative.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as torch_F
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from fusedopt import _backend, reference
from fusedopt.nn import _pointwise as pw
from fusedopt.ops import mse_loss as mse_ops

__all__ = ["MSELoss", "MSELossFunction", "mse_loss"]


class MSELossFunction(torch.autograd.Function):
    """Flat contiguous input/target of one dtype -> the loss as fusedopt::mse_loss_fwd returns it."""

    @staticmethod
    def forward(ctx, x, t, weight, period, scale, scale_tensor, reduction, need_grad, backend):
        loss, grad = mse_ops.mse_loss_fwd(x, t, weight, period, scale=scale, scale_tensor=scale_tensor,
                                          reduction=reduction, need_grad=need_grad, backend=backend)  # fmt: skip
        ctx.op_name = "mse_loss"
        ctx.reduction = reduction
        ctx.consumed = False
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad = pw.scale_saved_grad(ctx, grad_output)
        need_x, need_t = ctx.needs_input_grad[:2]
        grad_t = (grad.neg() if need_x else grad.neg_()) if need_t else None
        return (grad if need_x else None), grad_t, *(None,) * 7


def mse_loss(input: Tensor, target: Tensor, size_average: bool | None = None, reduce: bool | None = None,
             reduction: str = "mean", weight: Tensor | None = None, *,
             backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.mse_loss, fused; `backend` as everywhere in fusedopt."""
    _backend.requested_backend(backend)  # an unknown name raises even where torch's function runs
    fallback = has_torch_function_variadic(input, target, weight)
    if not fallback and target.size() != input.size():
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,  # the caller of fusedopt.nn.functional.mse_loss
        )
    reduction = pw.reduction_string(size_average, reduce, reduction)
    if not fallback and pw.autocast_on(input):
        if weight is not None:
            fallback = True  # torch's weighted MSE is a composite: autocast treats each of its ops per device
        else:
            input, target = pw.autocast_fp32(input, target)  # autocast runs mse_loss in float32
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
        fallback = fallback or weight.requires_grad  # torch differentiates the weight of its weighted formula
    fallback = fallback or dtype not in pw.FUSED_DTYPES or not pw.same_device(input, target, weight)
    if fallback:
        # Outside the kernels' domain (subclass tensors, integer or complex dtypes, mixed devices, a weight that needs
        # a gradient): torch's own function, so results and errors are torch's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the size warning was given above
            return torch_F.mse_loss(input, target, reduction=reduction, weight=weight)
    x, t = input.to(dtype), target.to(dtype)
    if x.shape != t.shape:
        x, t = torch.broadcast_tensors(x, t)  # torch's error for incompatible shapes; grads sum back through expand
    shape = x.shape
    if weight is not None:
        if weight.size() != input.size():
            raise ValueError("Weights and input must have the same size.")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"Invalid reduction mode: {reduction}. Expected one of 'none', 'mean', 'sum'.")
    red = pw.reduction_enum(reduction)
    resolved = _backend.resolve(backend, x.device, "mse_loss")
    w, period = pw.periodic_weight(weight, shape, dtype)
    scale, scale_tensor = pw.mean_scale(red, x.numel()), None
    if weight is not None and red == reference.REDUCTION_MEAN:
        # torch's weighted mean divides by sum(weight) (over the weight's own shape), on the device
        scale, scale_tensor = 1.0, weight.detach().sum(dtype=torch.float64).reciprocal().reshape(1)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or t.requires_grad)
    loss = MSELossFunction.apply(x.contiguous().reshape(-1), t.contiguous().reshape(-1), w, period, scale,
                                 scale_tensor, red, need_grad, resolved)  # fmt: skip
    return loss.view(shape) if red == reference.REDUCTION_NONE else loss


class MSELoss(torch.nn.MSELoss):
    """torch.nn.MSELoss (a subclass: same arguments, isinstance and state_dict), fused; keyword-only `backend`."""

    def __init__(self, size_average=None, reduce=None, reduction: str = "mean", *, backend: str | None = "auto"):
        super().__init__(size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return mse_loss(input, target, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
