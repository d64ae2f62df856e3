"""fusedopt::bce_loss_fwd and fusedopt::bce_with_logits_fwd: one pass over flat input/target that yields the
(reduced) loss and, when asked, the input gradient (d loss / d input, already multiplied by `scale`).

Same conventions as fusedopt/ops/mse_loss.py: flat contiguous input/target of one floating dtype T, weights flat in T
applied as weight[i % period], reduction 0 none / 1 mean / 2 sum, reduced loss = sum * scale as a 0-d out_dtype
tensor. bce_loss_fwd also returns int32 flags (1,): bit 0 an input outside [0, 1] (NaN included), bit 1 a target
outside [0, 1]; the caller turns them into torch's error without a host sync (torch._assert_async).
"""

from __future__ import annotations

import torch

from fusedopt import _backend
from fusedopt.ops._library import custom_op

BCE_SCHEMA = (
    "bce_loss_fwd(Tensor input, Tensor target, Tensor? weight, int weight_period, float scale, int reduction, "
    "bool need_grad, ScalarType out_dtype, str backend) -> (Tensor, Tensor, Tensor)"
)
BCE_LOGITS_SCHEMA = (
    "bce_with_logits_fwd(Tensor input, Tensor target, Tensor? weight, int weight_period, Tensor? pos_weight, "
    "int pos_weight_period, float scale, int reduction, bool need_grad, ScalarType out_dtype, str backend) "
    "-> (Tensor, Tensor)"
)


def _kernels(backend: str):
    """The module holding this backend's bce_loss kernels."""
    return _backend.kernels(backend, "bce_loss")


def _bce_impl(input, target, weight, weight_period, scale, reduction, need_grad, out_dtype, backend):
    return _kernels(backend).bce_loss_fwd(input, target, weight, weight_period, scale, reduction, need_grad, out_dtype)


def _bce_logits_impl(input, target, weight, weight_period, pos_weight, pos_weight_period, scale, reduction, need_grad,
                     out_dtype, backend):  # fmt: skip
    return _kernels(backend).bce_with_logits_fwd(input, target, weight, weight_period, pos_weight, pos_weight_period,
                                                 scale, reduction, need_grad, out_dtype)  # fmt: skip


def _outputs_like(input, reduction, need_grad, out_dtype):
    n = input.numel()
    loss = input.new_empty(n) if reduction == 0 else input.new_empty((), dtype=out_dtype)
    return loss, input.new_empty(n if need_grad else 0)


def _bce_fake(input, target, weight, weight_period, scale, reduction, need_grad, out_dtype, backend):
    return (*_outputs_like(input, reduction, need_grad, out_dtype), input.new_empty(1, dtype=torch.int32))


def _bce_logits_fake(input, target, weight, weight_period, pos_weight, pos_weight_period, scale, reduction, need_grad,
                     out_dtype, backend):  # fmt: skip
    return _outputs_like(input, reduction, need_grad, out_dtype)


_call_bce_loss_fwd = custom_op(BCE_SCHEMA, _bce_fake)(_bce_impl)
bce_loss_fwd_op = _call_bce_loss_fwd.op
_call_bce_with_logits_fwd = custom_op(BCE_LOGITS_SCHEMA, _bce_logits_fake)(_bce_logits_impl)
bce_with_logits_fwd_op = _call_bce_with_logits_fwd.op


def _resolve(backend, device, op):
    return _backend.resolve(backend, device, op) if backend == "auto" else backend


def bce_loss_fwd(input, target, weight=None, weight_period=1, *, scale=1.0, reduction=1, need_grad=False,
                 out_dtype=None, backend="auto"):  # fmt: skip
    """Returns (loss, grad, flags); see the module docstring."""
    args = (input, target, weight, int(weight_period), float(scale), int(reduction), bool(need_grad),
            out_dtype or input.dtype, _resolve(backend, input.device, "binary_cross_entropy"))  # fmt: skip
    return _call_bce_loss_fwd(*args)


def bce_with_logits_fwd(input, target, weight=None, weight_period=1, pos_weight=None, pos_weight_period=1, *,
                        scale=1.0, reduction=1, need_grad=False, out_dtype=None, backend="auto"):  # fmt: skip
    """Returns (loss, grad); see the module docstring."""
    args = (input, target, weight, int(weight_period), pos_weight, int(pos_weight_period), float(scale),
            int(reduction), bool(need_grad), out_dtype or input.dtype,
            _resolve(backend, input.device, "binary_cross_entropy_with_logits"))  # fmt: skip
    return _call_bce_with_logits_fwd(*args)
