"""fusedopt::sgd_step: one fused SGD update (momentum, dampening, Nesterov) over a list of tensors of one
(device, dtype) group."""

from __future__ import annotations

from fusedopt import _backend, reference
from fusedopt.ops._library import custom_op, split_lr

# first_flags: [] or one float32 scalar per param; nonzero makes that momentum buffer a copy of the grad this step
# (torch's first step). The step clears them, unless found_inf skips it: the flag then waits for the next step.
SCHEMA = (
    "sgd_step(Tensor(a!)[] params, Tensor(d!)[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] first_flags, "
    "float lr, Tensor? lr_tensor, float momentum, float dampening, float weight_decay, bool nesterov, "
    "bool maximize, Tensor? grad_divisor, Tensor? found_inf, bool write_back_grads, str backend) -> ()"
)


def _impl(params, grads, momentum_buffers, first_flags, lr, lr_tensor, momentum, dampening, weight_decay, nesterov,
          maximize, grad_divisor, found_inf, write_back_grads, backend):  # fmt: skip
    if not params:
        return
    if backend == "cpu":
        if lr_tensor is not None:
            lr = float(lr_tensor)  # a CPU scalar: no device sync
        _backend.cpu_extension()[0].sgd_step(
            params, grads, momentum_buffers, first_flags, lr, momentum, dampening, weight_decay, nesterov, maximize,
            grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "cuda":
        _backend.cuda_extension()[0].sgd_step(
            params, grads, momentum_buffers, first_flags, lr, lr_tensor, momentum, dampening, weight_decay, nesterov,
            maximize, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "triton":
        from fusedopt.triton_kernels import sgd as triton_sgd

        triton_sgd.sgd_step(
            params, grads, momentum_buffers, first_flags, lr, lr_tensor, momentum, dampening, weight_decay, nesterov,
            maximize, grad_divisor, found_inf, write_back_grads,
        )  # fmt: skip
    elif backend == "torch":
        reference.sgd_step_(
            params, grads, momentum_buffers, first_flags, lr=lr_tensor if lr_tensor is not None else lr,
            momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
            grad_divisor=grad_divisor, found_inf=found_inf, write_back_grads=write_back_grads,
        )  # fmt: skip
    else:
        raise ValueError(f"fusedopt sgd_step: unknown backend {backend!r}")


def _fake(*args):
    return None


_call_sgd_step = custom_op(SCHEMA, _fake)(_impl)
sgd_step_op = _call_sgd_step.op


def sgd_step(params, grads, momentum_buffers, first_flags, *, lr, momentum, dampening, weight_decay, nesterov,
             maximize, grad_divisor=None, found_inf=None, write_back_grads=False, backend="auto"):  # fmt: skip
    """Updates params (and momentum buffers when momentum != 0) in place. `lr` may be a float or a tensor."""
    if not params:
        return
    backend = _backend.resolve(backend, params[0].device, "sgd")
    lr_float, lr_tensor = split_lr(lr, params[0].device)
    use_buf = momentum != 0
    args = (
        params, grads, momentum_buffers if use_buf else [], first_flags if use_buf else [], lr_float, lr_tensor,
        float(momentum), float(dampening), float(weight_decay), bool(nesterov), bool(maximize), grad_divisor,
        found_inf, bool(write_back_grads), backend,
    )
    _call_sgd_step(*args)
