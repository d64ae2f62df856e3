"""Fused binary cross-entropy: fusedopt.nn.BCELoss / BCEWithLogitsLoss and the functions behind
fusedopt.nn.functional.binary_cross_entropy / binary_cross_entropy_with_logits.

One kernel pass reads input and target once and writes the loss (or its sum) and, when a gradient is needed, the
input gradient; the backward only scales it by grad_output. BCE clamps both logs at -100 and divides its gradient
by max(x (1 - x), 1e-12), as torch does. An input or target outside [0, 1] (NaN included) raises torch's error: on
the CPU at once, on CUDA through a device-side assert (torch._assert_async), as torch's own CUDA kernel asserts;
no host sync either way. A target that requires grad (torch differentiates it) runs torch's own function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as torch_F
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from fusedopt import _backend, reference
from fusedopt.nn import _pointwise as pw
from fusedopt.ops import bce_loss as bce_ops

__all__ = [
    "BCELoss",
    "BCELossFunction",
    "BCEWithLogitsLoss",
    "BCEWithLogitsLossFunction",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
]

_BAD_INPUT = "all elements of input should be between 0 and 1"
_BAD_TARGET = "all elements of target should be between 0 and 1"


def _raise_on_flags(flags: Tensor) -> None:
    # A CPU tensor: reading it is no device sync. Under torch.compile a read would be a data-dependent branch
    # (fullgraph fails): there the check is a graph op too.
    if flags.device.type == "cpu" and not torch.compiler.is_compiling():
        bits = int(flags[0])
        if bits & 1:
            raise RuntimeError(_BAD_INPUT)
        if bits & 2:
            raise RuntimeError(_BAD_TARGET)
    else:
        torch._assert_async(flags[0] == 0, f"{_BAD_INPUT}; {_BAD_TARGET}")


class BCELossFunction(torch.autograd.Function):
    """Flat contiguous input/target of one dtype -> the loss as fusedopt::bce_loss_fwd returns it."""

    @staticmethod
    def forward(ctx, x, t, weight, period, scale, reduction, need_grad, backend):
        loss, grad, flags = bce_ops.bce_loss_fwd(x, t, weight, period, scale=scale, reduction=reduction,
                                                 need_grad=need_grad, backend=backend)  # fmt: skip
        _raise_on_flags(flags)
        ctx.op_name = "binary_cross_entropy"
        ctx.reduction = reduction
        ctx.consumed = False
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return pw.scale_saved_grad(ctx, grad_output), *(None,) * 7


class BCEWithLogitsLossFunction(torch.autograd.Function):
    """Flat contiguous logits/target of one dtype -> the loss as fusedopt::bce_with_logits_fwd returns it."""

    @staticmethod
    def forward(ctx, x, t, weight, period, pos_weight, pos_period, scale, reduction, need_grad, out_dtype, backend):
        loss, grad = bce_ops.bce_with_logits_fwd(
            x, t, weight, period, pos_weight, pos_period, scale=scale, reduction=reduction, need_grad=need_grad,
            out_dtype=out_dtype, backend=backend,
        )  # fmt: skip
        ctx.op_name = "binary_cross_entropy_with_logits"
        ctx.reduction = reduction
        ctx.consumed = False
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        return pw.scale_saved_grad(ctx, grad_output), *(None,) * 10


def _fused_ok(input: Tensor, target: Tensor, *weights: Tensor | None, with_logits: bool = False) -> bool:
    """Whether the kernels can take these arguments; otherwise torch's own function runs (and raises torch's error
    where there is one): tensor subclasses, other dtypes, mixed devices, weights that would enlarge the loss shape,
    a target or weight that requires grad."""
    if has_torch_function_variadic(input, target, *weights):
        return False
    if pw.autocast_on(input) and not with_logits:
        return False  # autocast: torch runs BCE in float32 on the CPU and refuses it on CUDA; keep torch's behaviour
    if input.dtype not in pw.FUSED_DTYPES or target.dtype not in pw.FUSED_DTYPES:
        return False
    if not pw.same_device(input, target, *weights) or not pw.broadcasts_in_place(input.shape, *weights):
        return False
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (target, *weights))
    return not grads


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Tensor | None = None, size_average: bool | None = None,
                         reduce: bool | None = None, reduction: str = "mean", *,
                         backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.binary_cross_entropy, fused; `backend` as everywhere in fusedopt."""
    _backend.requested_backend(backend)  # an unknown name raises even where torch's function runs
    reduction = pw.reduction_string(size_average, reduce, reduction)
    red = pw.reduction_enum(reduction)
    if target.size() != input.size() and not has_torch_function_variadic(input, target, weight):
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}) is "
            "deprecated. Please ensure they have the same size."
        )
    if input.dtype != target.dtype or not _fused_ok(input, target, weight) or (
        weight is not None and not weight.dtype.is_floating_point
    ):  # fmt: skip
        return torch_F.binary_cross_entropy(input, target, weight, reduction=reduction)
    resolved = _backend.resolve(backend, input.device, "binary_cross_entropy")
    w, period = pw.periodic_weight(weight, input.shape, input.dtype)
    need_grad = torch.is_grad_enabled() and input.requires_grad
    loss = BCELossFunction.apply(input.contiguous().reshape(-1), target.contiguous().reshape(-1), w, period,
                                 pw.mean_scale(red, input.numel()), red, need_grad, resolved)  # fmt: skip
    return loss.view(input.shape) if red == reference.REDUCTION_NONE else loss


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Tensor | None = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean", pos_weight: Tensor | None = None, *,
                                     backend: str | None = "auto") -> Tensor:  # fmt: skip
    """torch.nn.functional.binary_cross_entropy_with_logits, fused; `backend` as everywhere in fusedopt.

    The result has the target's dtype (as torch's); the math runs in the promoted dtype of input and target."""
    _backend.requested_backend(backend)  # an unknown name raises even where torch's function runs
    reduction = pw.reduction_string(size_average, reduce, reduction)
    red = pw.reduction_enum(reduction)
    if target.size() != input.size() and not has_torch_function_variadic(input, target, weight, pos_weight):
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    weights_ok = all(w is None or w.dtype.is_floating_point for w in (weight, pos_weight))
    if not weights_ok or not _fused_ok(input, target, weight, pos_weight, with_logits=True):
        return torch_F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction,
                                                        pos_weight=pos_weight)  # fmt: skip
    if pw.autocast_on(input):  # autocast runs this loss in float32
        input, target, weight, pos_weight = pw.autocast_fp32(input, target, weight, pos_weight)
    dtype = torch.promote_types(input.dtype, target.dtype)
    resolved = _backend.resolve(backend, input.device, "binary_cross_entropy_with_logits")
    w, period = pw.periodic_weight(weight, input.shape, dtype)
    pos_w, pos_period = pw.periodic_weight(pos_weight, input.shape, dtype)
    x, t = input.to(dtype), target.to(dtype)
    need_grad = torch.is_grad_enabled() and input.requires_grad
    loss = BCEWithLogitsLossFunction.apply(
        x.contiguous().reshape(-1), t.contiguous().reshape(-1), w, period, pos_w, pos_period,
        pw.mean_scale(red, input.numel()), red, need_grad, target.dtype, resolved,
    )  # fmt: skip
    if red == reference.REDUCTION_NONE:
        return loss.view(input.shape).to(target.dtype)
    return loss


class BCELoss(torch.nn.BCELoss):
    """torch.nn.BCELoss (a subclass: same arguments, `weight` buffer, isinstance, state_dict), fused; keyword-only
    `backend`."""

    def __init__(self, weight: Tensor | None = None, size_average=None, reduce=None, reduction: str = "mean", *,
                 backend: str | None = "auto") -> None:  # fmt: skip
        super().__init__(weight, size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """torch.nn.BCEWithLogitsLoss (a subclass: same arguments, `weight`/`pos_weight` buffers, isinstance,
    state_dict), fused; keyword-only `backend`."""

    def __init__(self, weight: Tensor | None = None, size_average=None, reduce=None, reduction: str = "mean",
                 pos_weight: Tensor | None = None, *, backend: str | None = "auto") -> None:  # fmt: skip
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                pos_weight=self.pos_weight, backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, backend={self.backend!r}"
