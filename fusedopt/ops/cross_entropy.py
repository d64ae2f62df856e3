"""fusedopt::cross_entropy_fwd: per-row cross-entropy over (M, C) logits, with the gradient w.r.t. the logits written
in the same pass over the logits.

The op sees rows only: fusedopt.nn.functional flattens torch's (C,), (N, C) and (N, C, d1, ...) layouts, checks the
arguments as torch does and reduces. The math (loss, lse, gradient) is spelled out in fusedopt/reference.py.
"""

from __future__ import annotations

import torch

from fusedopt import _backend, reference
from fusedopt.ops._library import define_op

SCHEMA = (
    "cross_entropy_fwd(Tensor logits, Tensor target, Tensor? weight, Tensor(a!)? grad_out, Tensor? grad_scale, "
    "bool need_grad, int ignore_index, float label_smoothing, float z_loss, float? softcap, bool prob_target, "
    "str backend) -> (Tensor, Tensor, Tensor)"
)
SCALE_SCHEMA = "cross_entropy_scale_grad_(Tensor(a!) grad, Tensor scale, str backend) -> ()"


_GRAD_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_grad_out(logits: torch.Tensor, grad_out: torch.Tensor | None) -> None:
    """Every backend's check of a caller's gradient buffer, with a message that names it."""
    if grad_out is not None and (grad_out.dtype != logits.dtype or grad_out.shape != logits.shape):
        raise RuntimeError(f"fusedopt cross_entropy: grad_out must be shaped and typed like the logits ({logits.dtype} "
                           f"{tuple(logits.shape)}), got {grad_out.dtype} {tuple(grad_out.shape)}")  # fmt: skip


def _check_scale(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """The backward's checks, on every backend: the saved gradient and the loss's grad_output (scale) by name."""
    if grad.dtype not in _GRAD_DTYPES:
        raise RuntimeError(f"fusedopt cross_entropy backward: grad must be float32, float64, bfloat16 or float16, "
                           f"got {grad.dtype}")  # fmt: skip
    opmath = reference.opmath_dtype(grad.dtype)
    if scale.dtype != opmath:
        raise RuntimeError(f"fusedopt cross_entropy backward: grad_output (scale) must be {opmath} for a {grad.dtype} "
                           f"grad, got {scale.dtype}")  # fmt: skip


def _kernels(backend: str):
    """The module holding this backend's cross_entropy kernels."""
    return _backend.kernels(backend, "cross_entropy")


def _impl(logits, target, weight, grad_out, grad_scale, need_grad, ignore_index, label_smoothing, z_loss, softcap,
          prob_target, backend):  # fmt: skip
    kernels = _kernels(backend)
    _check_grad_out(logits, grad_out if need_grad else None)
    new_grad = logits.new_empty(0)
    if need_grad and grad_out is None:
        # The CPU extension's buffers skip the page faults of a fresh large allocation (csrc/cpu/grad_buffer.cpp).
        new_grad = kernels.empty_grad_buffer(logits) if backend == "cpu" else torch.empty_like(logits)
        grad_out = new_grad
    loss, lse = kernels.cross_entropy_fwd(
        logits, target, weight, grad_out if need_grad else None, grad_scale, ignore_index, label_smoothing, z_loss,
        softcap, prob_target,
    )  # fmt: skip
    return loss, lse, new_grad


def _scale_impl(grad, scale, backend):
    _check_scale(grad, scale)
    _kernels(backend).cross_entropy_scale_grad(grad, scale)


def _fake(logits, target, weight, grad_out, grad_scale, need_grad, ignore_index, label_smoothing, z_loss, softcap,
          prob_target, backend):  # fmt: skip
    _check_grad_out(logits, grad_out if need_grad else None)
    rows = logits.shape[0]
    ot = reference.opmath_dtype(logits.dtype)
    new_grad = torch.empty_like(logits) if need_grad and grad_out is None else logits.new_empty(0)
    return logits.new_empty((rows,), dtype=ot), logits.new_empty((rows,), dtype=ot), new_grad


def _scale_fake(grad, scale, backend):
    _check_scale(grad, scale)


cross_entropy_fwd_op = define_op(SCHEMA, _impl, _fake)
cross_entropy_scale_grad_op = define_op(SCALE_SCHEMA, _scale_impl, _scale_fake)


def cross_entropy_fwd(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, *, need_grad: bool,
                      grad_out: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None, ignore_index: int,
                      label_smoothing: float, z_loss: float, softcap: float | None, prob_target: bool,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Per-row (loss, lse) in opmath (float32, float64 for float64 logits), and the gradient when need_grad: the
    gradient of each row's loss times grad_scale (one opmath value on the logits' device, e.g. the mean's
    1/denominator; None: 1). It goes into grad_out when given (which may be `logits` itself: the in-place mode),
    else into a new tensor. Returns (loss, lse, grad or None).

    logits (M, C) contiguous; target (M,) int64 class indices, or (M, C) probabilities in the logits' dtype;
    weight (C,) in opmath or None; backend already resolved (see fusedopt._backend.resolve)."""
    loss, lse, new_grad = cross_entropy_fwd_op(
        logits, target, weight, grad_out, grad_scale, need_grad, ignore_index, label_smoothing, z_loss, softcap,
        prob_target, backend,
    )  # fmt: skip
    grad = (grad_out if grad_out is not None else new_grad) if need_grad else None
    return loss, lse, grad


def cross_entropy_scale_grad_(grad: torch.Tensor, scale: torch.Tensor, *, backend: str) -> None:
    """grad (M, C) *= scale: one opmath value per row (M,), or one for all (1,). The backward of a fused
    cross-entropy; rows whose factor is exactly 1 (loss.backward()) are not touched where the backend can tell."""
    cross_entropy_scale_grad_op(grad, scale, backend)
