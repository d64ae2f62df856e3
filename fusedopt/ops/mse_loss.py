"""fusedopt::mse_loss_fwd: one pass over flat input/target that yields the (reduced) loss and, when asked, the
input gradient (d loss / d input, already multiplied by `scale`).

Arguments: input and target flat, contiguous, same floating dtype T. `weight` (or None) is flat in T and applies as
weight[i % weight_period]. reduction: 0 none, 1 mean, 2 sum (torch's enum). The reduced loss is
sum(loss_i) * scale (* scale_tensor) as a 0-d tensor of out_dtype; the gradient is multiplied by the same factor, so
the mean's 1/N (or 1/sum(weight)) is folded in on the device. For reduction none, loss is (numel,) in T.
"""

from __future__ import annotations

from fusedopt import _backend
from fusedopt.ops._library import custom_op

SCHEMA = (
    "mse_loss_fwd(Tensor input, Tensor target, Tensor? weight, int weight_period, float scale, Tensor? scale_tensor, "
    "int reduction, bool need_grad, ScalarType out_dtype, str backend) -> (Tensor, Tensor)"
)


def _impl(input, target, weight, weight_period, scale, scale_tensor, reduction, need_grad, out_dtype, backend):
    args = (input, target, weight, weight_period, scale, scale_tensor, reduction, need_grad, out_dtype)
    return _backend.kernels(backend, "mse_loss").mse_loss_fwd(*args)


def _fake(input, target, weight, weight_period, scale, scale_tensor, reduction, need_grad, out_dtype, backend):
    n = input.numel()
    loss = input.new_empty(n) if reduction == 0 else input.new_empty((), dtype=out_dtype)
    return loss, input.new_empty(n if need_grad else 0)


_call_mse_loss_fwd = custom_op(SCHEMA, _fake)(_impl)
mse_loss_fwd_op = _call_mse_loss_fwd.op


def mse_loss_fwd(input, target, weight=None, weight_period=1, *, scale=1.0, scale_tensor=None, reduction=1,
                 need_grad=False, out_dtype=None, backend="auto"):  # fmt: skip
    """Returns (loss, grad); see the module docstring. `backend` must be resolved or "auto"."""
    backend = _backend.resolve(backend, input.device, "mse_loss") if backend == "auto" else backend
    args = (input, target, weight, int(weight_period), float(scale), scale_tensor, int(reduction), bool(need_grad),
            out_dtype or input.dtype, backend)  # fmt: skip
    return _call_mse_loss_fwd(*args)
