"""fusedopt::adafactor_step: one Adafactor step over one (device, dtype) bucket. The first len(row_vars) params are
matrices (dim >= 2: torch's factored row_var and col_var), the rest have a full `variance`. Every backend's kernel
takes the same arguments: `_backend.kernels(backend, "adafactor").adafactor_step(params, grads, row_vars,
col_vars, variances, steps, lr, lr_tensor, hyper, maximize, grad_divisor, found_inf, write_back_grads)` with
hyper = {beta2_decay, eps1, eps2, d, weight_decay} (eps1 resolved: never None)."""

from __future__ import annotations

from fusedopt import _backend
from fusedopt.ops._library import custom_op, split_lr

HYPER = ("beta2_decay", "eps1", "eps2", "d", "weight_decay")

_SCHEMA = (
    "adafactor_step(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] row_vars, Tensor(d!)[] col_vars, "
    "Tensor(e!)[] variances, Tensor(f!)[] steps, float lr, Tensor? lr_tensor, float beta2_decay, float eps1, "
    "float eps2, float d, float weight_decay, bool maximize, Tensor? grad_divisor, Tensor? found_inf, "
    "bool write_back_grads, str backend) -> ()"
)


@custom_op(_SCHEMA)
def _adafactor_step(params, grads, row_vars, col_vars, variances, steps, lr, lr_tensor, beta2_decay, eps1, eps2, d,
                    weight_decay, maximize, grad_divisor, found_inf, write_back_grads, backend):  # fmt: skip
    if not params:
        return
    hyper = dict(zip(HYPER, (beta2_decay, eps1, eps2, d, weight_decay)))
    kernel = _backend.kernels(backend, "adafactor").adafactor_step
    kernel(params, grads, row_vars, col_vars, variances, steps, lr, lr_tensor, hyper, maximize, grad_divisor,
           found_inf, write_back_grads)  # fmt: skip


def adafactor_step(params, grads, row_vars, col_vars, variances, steps, *, lr, hyper, maximize, grad_divisor=None,
                   found_inf=None, write_back_grads=False, backend="auto"):  # fmt: skip
    """Updates params and state in place; `lr` a float or a one-element tensor; `hyper` {name: float}."""
    if not params:
        return
    backend = _backend.resolve(backend, params[0].device, "adafactor_step")
    lr_float, lr_tensor = split_lr(lr, params[0].device)
    _adafactor_step(params, grads, row_vars, col_vars, variances, steps, lr_float, lr_tensor,
                    *(float(hyper[name]) for name in HYPER), bool(maximize), grad_divisor, found_inf,
                    bool(write_back_grads), backend)  # fmt: skip
